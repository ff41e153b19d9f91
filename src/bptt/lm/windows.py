"""Truncation strategies for truncated BPTT: fixed, variable (AWD-LSTM) and randomized (ARTBP) windows.

Shape legend
------------
    L   length of the split, in ids
    N   batch size = number of parallel streams
    S   stream length, (L - 1) // N
    T   nominal window length (``seq_len``);  T_k the length of window k
    K   number of windows in an epoch

All three batchers use char-rnn's layout (:class:`bptt.lm.data.TBPTTBatches`):
the split is cut into N contiguous streams of S ids, a window is ``(x, y)``,
both ``(T_k, N)`` int64 with ``y[t] = x[t+1]`` within a stream, and window k
continues window k - 1 in every stream, so the final hidden state of one window
is the initial state of the next.  They differ in the window lengths:

``fixed``       T_k = T (this is TBPTTBatches; the last S mod T ids of each stream are skipped).
``variable``    AWD-LSTM (Merity, Keskar & Socher 2017, "Regularizing and
                Optimizing LSTM Language Models", sec. 4.1): base = T with
                probability p_full = 0.95, else T/2; T_k = max(min_len, ⌊𝒩(base, σ²)⌋)
                with σ = 5, clipped to ``max_len`` (optional) and to what is left of the stream.
                Windows tile each stream exactly: every position is visited once per epoch.
                AWD-LSTM scales the learning rate by ``lr_scale(k) = T_k / T`` for window k,
                so that, with a loss averaged over the T_k·N positions, every position
                weighs the same whatever its window's length.
``randomized``  ARTBP (Tallec & Ollivier 2017, "Unbiasing Truncated
                Backpropagation Through Time", arXiv:1705.08209), below.

Randomized truncation (ARTBP), exactly what is implemented
----------------------------------------------------------
After j steps of the current window (j = 1, 2, ...), the window is cut (the
next step starts a new window, whose initial state is carried forward but
receives no gradient) with probability c_j, decided in advance of the
backward pass (hence "anticipated").  Here

    c_j = 0                      for j < m          (m = ``min_len``, default ⌈T/2⌉)
    c_j = c = 1 / (T - m + 1)    for j ≥ m

so T_k = m + G with G geometric on {0, 1, ...}, P(G = g) = (1 - c)^g c, and
E[T_k] = m + (1 - c)/c = T.  (This schedule is our choice; the paper allows
any c_j < 1 chosen from the past.)  The end of a stream also ends a window,
which biases nothing since no loss lies beyond it.

Unbiasing happens in the backward recursion, not in the loss: within a window,
the gradient carried from step j back to step j - 1 is multiplied by

    r_j = 1 / (1 - c_j)           (``recurrent_scale(k)[j]``, j = 1 .. T_k - 1; r_0 = 1)

i.e. for a hidden state h, ``dh_{j-1} += r_j · (∂h_j/∂h_{j-1})ᵀ dh_j`` (and
the same factor on dc for an LSTM), while every loss term keeps weight 1.  With
ε_j = 1 when the window is cut after j steps, the factor on a path that
survives is (1 - ε_j)/(1 - c_j), and E[(1 - ε_j)/(1 - c_j) | past] = 1; by
the tower rule the expected gradient is the full-BPTT gradient for every lag
(tests/lm/test_lm_windows.py checks this exactly, enumerating every
truncation pattern of a short stream for a small tanh RNN).

Why not per-position loss weights: the correction for the contribution of
loss ℓ_u to the state at step t is Π_{t<j≤u} r_j, which depends on the lag
u - t, not on u alone.  Weights w_u on the loss terms give every lag of ℓ_u
the same factor; requiring Σ_{p≥d} P(position p) w_p = 1 for every lag d
forces w_p = 0 below the largest lag, so no loss weighting is unbiased
beyond a fixed lag.  The model's backward therefore needs the per-step factor
``recurrent_scale`` (a (T_k,) array); :func:`bptt.nn.losses.cross_entropy`'s
weights are not the place for it.  It is
:func:`bptt.nn.recurrence.sequence_backward`'s ``recurrent_scale`` argument,
reached through ``RNNBase.backward`` and ``CharLM.backward`` (``bptt train
--truncation randomized`` passes it; see docs/data.md).  Without it, ARTBP
windows still work as random-length truncation, but the gradient is biased
like plain TBPTT.

Every epoch's window lengths come from ``np.random.default_rng([seed, epoch])``,
so a run resumed at (epoch, k) sees exactly the same windows: no RNG state to save.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from bptt.lm.data import DataError, TBPTTBatches

__all__ = ["STRATEGIES", "Window", "FixedBatches", "VariableBatches", "RandomizedBatches", "make_batches"]

STRATEGIES = ("fixed", "variable", "randomized")


class Window(NamedTuple):
    """One window and what the training step needs besides ``(x, y)``."""

    x: np.ndarray  # (T_k, N) int64 inputs
    y: np.ndarray  # (T_k, N) int64 targets, y[t] = x[t + 1] within a stream
    lr_scale: float  # multiply the learning rate by this for this window's update (AWD: T_k / T)
    recurrent_scale: np.ndarray  # (T_k,) factor on the gradient carried from step j to j - 1 (ARTBP); ones otherwise


def _check_positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise DataError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class FixedBatches(TBPTTBatches):
    """:class:`TBPTTBatches` with the interface of the other strategies (every window has length T)."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, epoch: int = 0) -> None:
        super().__init__(ids, batch_size, seq_len)
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        """Nothing to draw: the windows are the same every epoch."""
        self.epoch = int(epoch)

    @property
    def lengths(self) -> np.ndarray:
        return np.full(len(self), self.seq_len, dtype=np.int64)

    def window(self, k: int) -> Window:
        x, y = self.batch(k)
        return Window(x, y, 1.0, np.ones(self.seq_len))


class _DrawnWindows:
    """Windows of drawn lengths that tile each stream exactly; subclasses define :meth:`_draw`."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, epoch: int = 0) -> None:
        N = _check_positive_int("batch_size", batch_size)
        T = _check_positive_int("seq_len", seq_len)
        if not isinstance(ids, np.ndarray):
            ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise DataError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        need = N * T + 1
        if len(ids) < need:
            raise DataError(
                f"split too short for one window: needs at least batch_size*seq_len+1 = {N}*{T}+1 = {need} "
                f"ids, has {len(ids)}; use a smaller --batch-size/--seq-len or more data"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.ids, self.batch_size, self.seq_len, self.seed = ids, N, T, int(seed)
        self.stream_len = S = (len(ids) - 1) // N
        self._starts = np.arange(N, dtype=np.int64) * S  # (N,) first id of each stream
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the window lengths of ``epoch`` (the same for the same seed and epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise DataError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch])
        lengths, pos, S = [], 0, self.stream_len
        while pos < S:
            n = min(int(self._draw(rng)), S - pos)  # the end of the stream ends the last window
            lengths.append(n)
            pos += n
        self.lengths = np.array(lengths, dtype=np.int64)  # (K,) T_k
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)  # (K,) window starts

    def _draw(self, rng: np.random.Generator) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tokens_per_epoch(self) -> int:
        """(input, target) pairs per epoch: every position of every stream, ``S * N``."""
        return self.stream_len * self.batch_size

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``k``: ``(x, y)``, both ``(T_k, N)`` int64."""
        K = len(self)
        if not -K <= k < K:
            raise IndexError(f"window {k} out of range for {K} windows")
        k %= K
        idx = self._starts[None, :] + self.offsets[k] + np.arange(self.lengths[k] + 1, dtype=np.int64)[:, None]
        chunk = np.asarray(self.ids[idx], dtype=np.int64)  # (T_k + 1, N): gathers only these ids
        return chunk[:-1], chunk[1:]

    __getitem__ = batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for k in range(len(self)):
            yield self.batch(k)

    def lr_scale(self, k: int) -> float:
        return 1.0

    def recurrent_scale(self, k: int) -> np.ndarray:
        return np.ones(int(self.lengths[k]))

    def window(self, k: int) -> Window:
        x, y = self.batch(k)
        return Window(x, y, self.lr_scale(k), self.recurrent_scale(k))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} windows of mean length {self.lengths.mean():.1f} "
                f"(T={self.seq_len}) x N={self.batch_size}, stream length {self.stream_len}, epoch {self.epoch})")


class VariableBatches(_DrawnWindows):
    """AWD-LSTM's variable-length windows; see the module docstring.

    ``lr_scale(k) = T_k / T`` is the learning-rate factor AWD-LSTM applies to window k.
    """

    def __init__(self, ids, batch_size, seq_len, *, seed=0, epoch=0, p_full: float = 0.95, std: float = 5.0,
                 min_len: int | None = None, max_len: int | None = None) -> None:
        if not 0.0 <= p_full <= 1.0:
            raise DataError(f"p_full must be a probability in [0, 1], got {p_full}")
        if not (math.isfinite(std) and std >= 0):
            raise DataError(f"std must be finite and >= 0, got {std}")
        T = _check_positive_int("seq_len", seq_len)
        self.p_full, self.std = float(p_full), float(std)
        self.min_len = min(5, T) if min_len is None else _check_positive_int("min_len", min_len)
        self.max_len = None if max_len is None else _check_positive_int("max_len", max_len)
        if self.max_len is not None and self.max_len < self.min_len:
            raise DataError(f"max_len ({self.max_len}) must be >= min_len ({self.min_len})")
        super().__init__(ids, batch_size, seq_len, seed=seed, epoch=epoch)

    def _draw(self, rng):
        base = self.seq_len if rng.random() < self.p_full else self.seq_len / 2
        n = max(self.min_len, int(rng.normal(base, self.std)))  # int() truncates, as AWD-LSTM's code does
        return n if self.max_len is None else min(n, self.max_len)

    def lr_scale(self, k: int) -> float:
        return float(self.lengths[k]) / self.seq_len


class RandomizedBatches(_DrawnWindows):
    """ARTBP's randomly truncated windows and their compensation factors; see the module docstring.

    ``cut_probability(j)`` is c_j, the probability that a window that has run j
    steps ends there; ``recurrent_scale(k)`` the factors r_j = 1 / (1 - c_j) the
    model's backward must apply.  ``max_len`` forces a cut after that many steps
    (c = 1 there): it bounds memory but gives up unbiasedness for lags >= max_len.
    """

    def __init__(self, ids, batch_size, seq_len, *, seed=0, epoch=0, min_len: int | None = None,
                 max_len: int | None = None) -> None:
        T = _check_positive_int("seq_len", seq_len)
        if T < 2:
            raise DataError("randomized truncation needs seq_len >= 2 (a mean window length above the minimum of 1)")
        self.min_len = -(-T // 2) if min_len is None else _check_positive_int("min_len", min_len)
        if self.min_len >= T:
            raise DataError(f"min_len ({self.min_len}) must be < seq_len ({T}) so that the mean length can be seq_len")
        self.max_len = None if max_len is None else _check_positive_int("max_len", max_len)
        if self.max_len is not None and self.max_len < T:
            raise DataError(f"max_len ({self.max_len}) must be >= seq_len ({T})")
        self.c = 1.0 / (T - self.min_len + 1)
        super().__init__(ids, batch_size, seq_len, seed=seed, epoch=epoch)

    def cut_probability(self, j: int) -> float:
        """c_j: probability that a window is cut after exactly j >= 1 steps, given that it got there."""
        if j < 1:
            raise ValueError(f"j counts the steps taken, >= 1; got {j}")
        if self.max_len is not None and j >= self.max_len:
            return 1.0
        return 0.0 if j < self.min_len else self.c

    def _draw(self, rng):
        n = self.min_len + int(rng.geometric(self.c)) - 1  # numpy's geometric counts trials, >= 1
        return n if self.max_len is None else min(n, self.max_len)

    def compensation(self, length: int) -> np.ndarray:
        """(length,) r_j = 1 / (1 - c_j) for j >= 1, r_0 = 1: the factors for a window of that length."""
        j = np.arange(int(length))
        r = np.where(j >= self.min_len, 1.0 / (1.0 - self.c), 1.0)
        r[0] = 1.0  # nothing is carried into the first step of a window
        return r

    def recurrent_scale(self, k: int) -> np.ndarray:
        return self.compensation(int(self.lengths[k]))


def make_batches(strategy: str, ids: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, epoch: int = 0,
                 **options):
    """The batcher for ``strategy`` ("fixed", "variable", "randomized"); ``options`` go to its constructor."""
    classes = {"fixed": FixedBatches, "variable": VariableBatches, "randomized": RandomizedBatches}
    if strategy not in classes:
        raise DataError(f"unknown truncation strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if strategy == "fixed" and options:
        raise DataError(f"fixed windows take no options, got {', '.join(sorted(options))}")
    return classes[strategy](ids, batch_size, seq_len, seed=seed, epoch=epoch, **options)
