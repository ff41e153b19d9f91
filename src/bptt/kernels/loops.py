"""The loop drivers: a layer direction's whole time loop, forward and backward, compiled.

Shape legend: T time steps, N batch, H hidden units, G = g·H stacked gate
pre-activations (g = 1 RNN, 4 LSTM, 3 GRU: :func:`bptt.nn.gates.gate_count`), P the
width of h (P = H unless an LSTM has a projection), D input features, L layers, s
the step counter (s-th step run).

``sequence_impl(mode, dtype, required)`` returns ``(forward, backward)`` with the
contract of :func:`bptt.nn.recurrence.sequence_forward` /
:func:`bptt.nn.recurrence.sequence_backward` (the reference these equal), or None
(use the reference loop) when Numba is missing or fails to compile and
``required`` is False.  :class:`ForwardRun` / :class:`BackwardRun` run a layer a
chunk of steps at a time (for :mod:`bptt.runtime.wavefront`); :func:`layer_step`
runs one step through a whole stack (sampling).

Every time step is (1) one matrix product with the recurrent weights
(:func:`bptt.kernels.gemm.times`: hand loops, register-blocked panels or BLAS,
chosen per run by the sizes in :mod:`bptt.runtime.policy`) and (2) the
element-wise gate maths (:mod:`bptt.kernels.steps`).  The loop over a range of
steps is one compiled function (``_forward_loop`` / ``_backward_loop``), so no
Python runs per step and the GIL is not taken.  Where no BLAS callable from
compiled code was found (``gemm_function`` is None: other NumPy builds) and the
product is not one for hand loops or panels, the same loop runs in Python with
np.matmul per step (``_steps_numpy``).

States live in (T+1, N, P) arrays ``hs`` (and ``cs`` for the LSTM cell) in time
order: the state entering step t is ``hs[t + rev]`` and the one leaving it is
``hs[t + 1 − rev]`` (rev = 1 for the reverse direction).  So ``h_prev`` — the
(T, N, P) rows of ∂L/∂W_hh that the layer reads — is the contiguous view
``hs[rev : T + rev]`` and is never copied.

Masks (variable lengths), as in :mod:`bptt.nn.recurrence`: a padded step keeps its
state and outputs zero; backwards, the carried gradient passes it unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.kernels.gemm import Panels, aligned_empty, gemm_function, transposed
from bptt.kernels.mathfn import HAVE_NUMBA
from bptt.nn.gates import GATES, gate_count
from bptt.runtime import policy

__all__ = ["KernelCache", "ForwardRun", "BackwardRun", "sequence_forward", "sequence_backward", "available",
           "sequence_impl", "layer_step"]

if HAVE_NUMBA:
    from numba import njit

    from bptt.kernels.gemm import times
    from bptt.kernels.mathfn import JIT, wide_vectors
    from bptt.kernels.steps import (gru_bw, gru_bw_step, gru_fw, gru_fw_step, lstm_bw, lstm_bw_step, lstm_fw, lstm_fw_step,
                                    masked_sum, merge_grad, merge_step, rnn_bw, rnn_bw_step, rnn_fw, rnn_fw_step)


class KernelCache(NamedTuple):
    """What the fused backward needs.  Arrays are in time order (index t = step t)."""

    mode: str
    reverse: bool
    mask: np.ndarray | None  # (T, N) bool or None
    h_prev: np.ndarray  # (T, N, P) state entering step t (a view of hs)
    hs: np.ndarray  # (T+1, N, P) all states, see the module docstring
    cs: np.ndarray | None  # (T+1, N, H) LSTM cell states, same layout
    gates: np.ndarray  # (T, N, G) activated gates; RNN: h̃_t (T, N, H)
    aux: np.ndarray | None  # LSTM: tanh(c_t) (T, N, H); GRU: gh_n (T, N, H)
    m: np.ndarray | None  # LSTM with projection: m_t = o ⊙ tanh(c_t) (T, N, H)
    small: bool  # whether the products were of hand-loop size, calling no BLAS (backward does the same)
    panels: Panels | None = None  # the backward's packed W_hh, shared by the runs of one forward call (or None: its own)


# ============================================================================ the time loops, compiled
if HAVE_NUMBA:
    @njit(**JIT)
    def _forward_loop(kind, rev, t0, t1, gemm, one, zero, WhhT, b_hh, WhrT, hs, cs, y, gates, aux, m_all,
                      mask, has_mask, proj, WhhP, WhrP, tmp):
        """The forward loop over times [t0, t1) (kind 0 tanh, 1 relu, 2 LSTM, 3 GRU): per step the
        product a = h_{t−1} W_hhᵀ, then the fused step, which activates gates[t] (gx_t on entry)
        in place.  WhhT = W_hhᵀ (P, G), WhrT = W_hrᵀ (H, P); WhhP, WhrP the same packed for
        ``panel_times`` (or empty: BLAS or ``mm_acc``)."""
        wide_vectors()
        N, G = gates.shape[1], gates.shape[2]
        a = np.empty((N, G), gates.dtype)
        h_new = np.empty((N, hs.shape[2]), gates.dtype)
        for s in range(t1 - t0):
            t = t1 - 1 - s if rev else t0 + s
            times(gemm, one, zero, hs[t + rev], WhhT, WhhP, tmp, a)  # a = h_{t−1} W_hhᵀ
            if kind == 2:
                lstm_fw(t, rev, a, hs, cs, y, gates, aux, m_all, mask, has_mask, proj)
                if proj:
                    times(gemm, one, zero, m_all[t], WhrT, WhrP, tmp, h_new)  # h̃_t = m_t W_hrᵀ
                    merge_step(t, rev, h_new, hs, y, mask, has_mask)
            elif kind == 3:
                gru_fw(t, rev, a, b_hh, hs, y, gates, aux, mask, has_mask)
            else:
                rnn_fw(t, rev, a, hs, y, gates, mask, has_mask, kind == 1)

    @njit(**JIT)
    def _infer_loop(kind, rev, t0, t1, turn, g0, gemm, one, zero, gx, WhhT, b_hh, WhrT, hs, cs, y, aux, m_one,
                    mask, has_mask, proj, WhhP, WhrP, tmp):
        """``_forward_loop`` keeping nothing for a backward: the same product and the same step
        function per step, so the same outputs bit for bit, but the step's gates are activated
        in gx's row and left there, aux and m go to one-step scratch arrays (1, N, ·) that stay
        in cache, and the state to two rows hs (2, N, P) (cs (2, N, H)) used in turn, instead of
        (T, N, ·) and (T+1, N, P) arrays.

        Each step runs at time index 0 of one-step views gx[t:t+1], y[t:t+1], mask[t:t+1].  A
        step reads its state at hs[0 + r] and writes it at hs[1 − r] (r its ``rev`` argument,
        which picks nothing else), so r = turn alternating 0, 1, 0, … makes each step read the
        row the step before wrote.  ``turn`` (0 or 1) is the row holding the current state;
        gx and y may be windows of steps whose first row is step g0 (ForwardRun's ``window``)."""
        wide_vectors()
        N, G = gx.shape[1], gx.shape[2]
        a = np.empty((N, G), gx.dtype)
        h_new = np.empty((N, hs.shape[2]), gx.dtype)
        for s in range(t1 - t0):
            t = t1 - 1 - s if rev else t0 + s
            r = (turn + s) % 2  # hs[r] = h_{t−1} (and cs[r] = c_{t−1}); this step writes row 1 − r
            gx_t, y_t = gx[t - g0 : t - g0 + 1], y[t - g0 : t - g0 + 1]
            mask_t = mask[t : t + 1] if has_mask else mask
            times(gemm, one, zero, hs[r], WhhT, WhhP, tmp, a)  # a = h_{t−1} W_hhᵀ
            if kind == 2:
                lstm_fw(0, r, a, hs, cs, y_t, gx_t, aux, m_one, mask_t, has_mask, proj)
                if proj:
                    times(gemm, one, zero, m_one[0], WhrT, WhrP, tmp, h_new)  # h̃_t = m_t W_hrᵀ
                    merge_step(0, r, h_new, hs, y_t, mask_t, has_mask)
            elif kind == 3:
                gru_fw(0, r, a, b_hh, hs, y_t, gx_t, aux, mask_t, has_mask)
            else:
                rnn_fw(0, r, a, hs, y_t, gx_t, mask_t, has_mask, kind == 1)

    @njit(**JIT)
    def _backward_loop(kind, H, rev, t0, t1, gemm, one, zero, dy, dh, dc, W_hh, W_hr, hs, cs, gates, aux, dgx, dgh,
                       dh_all, mask, has_mask, proj, W_hhP, W_hrP, tmp):
        """The backward loop over times [t0, t1), read backwards (dh, dc updated in place):
        per step the fused step, then the product with W_hh carrying dh to step t−1.  H: the hidden
        units (the LSTM's dm (N, H) with a projection)."""
        wide_vectors()
        N, P = dy.shape[1], dy.shape[2]
        prod = np.empty((N, P), dy.dtype)
        dm = np.empty((N, H), dy.dtype)
        dgh_t = np.empty((N, dgx.shape[2]), dy.dtype)  # GRU: a step's whole dgh, for the product with W_hh
        row = np.empty(dgx.shape[2], dy.dtype)  # the backward steps' scratch gate row
        for s in range(t1 - t0):
            t = t0 + s if rev else t1 - 1 - s  # the forward order, read backwards
            if kind == 2:
                if proj:
                    masked_sum(t, dh, dy, dh_all, mask, has_mask)
                    times(gemm, one, zero, dh_all[t], W_hr, W_hrP, tmp, dm)  # dm = dh̃ W_hr
                lstm_bw(t, rev, dy, dh, dc, dm, cs, gates, aux, dgx, row, mask, has_mask, proj)
            elif kind == 3:
                gru_bw(t, rev, dy, dh, hs, gates, aux, dgx, dgh, dgh_t, row, mask, has_mask)
            else:
                rnn_bw(t, dy, dh, gates, dgx, row, mask, has_mask, kind == 1)
            if kind == 3 or has_mask:  # GRU: dh += dgh W_hh;  padded rows keep their dh
                times(gemm, one, zero, dgh_t if kind == 3 else dgx[t], W_hh, W_hhP, tmp, prod)
                merge_grad(t, prod, dh, mask, has_mask, kind == 3)
            else:
                times(gemm, one, zero, dgx[t], W_hh, W_hhP, tmp, dh)  # dh = da W_hh


_KIND = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
_NO_MASK = np.ones((1, 1), dtype=np.bool_)


# ============================================================================ Python drivers
def _prepare(mode, gx, weights, dtype):
    """gx as the run's own contiguous array (the steps activate its rows in place; the caller's is
    left alone), with b_hh folded in for the RNN/LSTM; → (gx, b_hh still to add or None)."""
    b_hh = weights.b_hh
    if b_hh is not None and mode != "gru":  # RNN/LSTM: b_hh joins the same sum (layers fold it already)
        return np.ascontiguousarray(gx, dtype=dtype) + b_hh.astype(dtype), None
    return np.array(gx, dtype=dtype, order="C"), b_hh


class ForwardRun:
    """The fused forward of one layer direction, run a range of time steps at a time.

    ``run = ForwardRun(mode, h0, c0, weights, gx, mask, reverse)`` takes the
    input projections gx (T, N, G) (b_hh folded in, except for the GRU), which
    the caller may fill chunk by chunk: ``run.steps(t0, t1)`` needs gx[t0:t1]
    and runs times [t0, t1) (in reverse order for the reverse direction), after
    the chunks before them.  ``run.result()`` → ``(y, h_n, c_n, cache)`` as
    :func:`sequence_forward`.  Chunks let :mod:`bptt.nn.rnn` start layer k+1 on
    the first steps of layer k's output while layer k goes on.  The run owns gx:
    each step activates its row in place, so after the run gx holds the gates (the
    cache's ``gates``), not the projections; pass a copy to keep them.

    ``keep=False`` runs for inference (``_infer_loop``): the same outputs bit for bit,
    but no per-step gates, aux values or states are kept, only y (T, N, P) and the
    current state, so ``result()`` gives no cache (None) and no backward can follow.
    It may also take gx as a window of fewer rows than the ``length`` T of the
    sequence: the caller then fills ``gx_rows(t0, t1)`` before each ``steps(t0, t1)``
    (chunks of at most the window's rows), and a (T, N, G) array is never made.  y is
    then a window of as many rows, the output of steps [t0, t1) in ``y[:t1 − t0]`` once
    ``steps(t0, t1)`` returns, for the caller to read before the next chunk.  ``y``: the
    array to write the output into, (T, N, P) or (window, N, P) contiguous (default: a new one).
    """

    def __init__(self, mode, h0, c0, weights, gx, mask=None, reverse=False, keep=True, length=None, panels=None,
                 y=None):
        self.mode, self.kind, self.gx = mode, _KIND[mode], gx
        T, N, G = gx.shape
        if length is not None and length != T:
            if keep:
                raise ValueError("a window of gx rows is for runs that keep no cache (keep=False)")
            T = length
        self.window = gx.shape[0] < T
        self.g0 = 0  # the step of gx's first row (a window moves with the chunks)
        dtype = gx.dtype
        self.W_hh = np.ascontiguousarray(weights.W_hh, dtype=dtype)
        P = self.W_hh.shape[1]
        self.H = H = G // gate_count(mode)
        self.rev = rev = int(bool(reverse))
        self.proj = weights.W_hr is not None
        self.W_hr = np.ascontiguousarray(weights.W_hr, dtype=dtype) if self.proj else None
        self.has_mask = mask is not None
        self.mask = np.ascontiguousarray(mask, dtype=np.bool_) if self.has_mask else _NO_MASK
        self.b = None
        if self.kind == 3:
            self.b = np.zeros(G, dtype) if weights.b_hh is None else np.ascontiguousarray(weights.b_hh, dtype=dtype)

        # keep: the states in time order (see module docstring) and every step's gates, activated
        # in gx's own rows (gx is ours: made for this run by the caller); else two state rows used
        # in turn, and each step's gates left in its gx row (see _infer_loop)
        self.keep = keep
        rows, steps, first = (T + 1, T, T if rev else 0) if keep else (2, 1, 0)
        self.turn = 0  # not keep: the row of hs (and cs) holding the current state
        self.hs = aligned_empty((rows, N, P), dtype)
        self.hs[first] = h0
        self.cs = None
        if self.kind == 2:
            self.cs = aligned_empty((rows, N, H), dtype)
            self.cs[first] = c0
        rows_y = gx.shape[0] if self.window else T  # a window of gx: y is one too
        if y is not None and (y.shape != (rows_y, N, P) or y.dtype != dtype or not y.flags.c_contiguous):
            raise ValueError(f"y must be a contiguous {dtype} array of shape {(rows_y, N, P)}")
        self.y = aligned_empty((rows_y, N, P), dtype) if y is None else y
        self.gates = gx if keep else None
        self.aux = aligned_empty((steps, N, H), dtype) if self.kind >= 2 else None
        self.m_all = aligned_empty((steps, N, H), dtype) if self.proj else None
        self.small = N * G * P <= policy.SMALL_MACS
        self.macs = N * G * P
        self._transposed = None  # (W_hhᵀ, W_hrᵀ) contiguous, made when BLAS or hand loops need them
        self.panels = panels if panels is not None else Panels()

    @property
    def WhhT(self):
        """W_hhᵀ (P, G) contiguous, transposed once per sequence: BLAS reads it untransposed (faster)."""
        if self._transposed is None:
            self._transposed = (transposed(self.W_hh), transposed(self.W_hr) if self.proj else self.gx[0, :0, :0])
        return self._transposed[0]

    @property
    def WhrT(self):
        """W_hrᵀ (H, P) contiguous, or an empty array without a projection."""
        self.WhhT  # noqa: B018 - makes both
        return self._transposed[1]

    def gx_rows(self, t0, t1):
        """The rows of gx that ``steps(t0, t1)`` reads, for the caller to fill: gx[t0:t1], or
        with a window its first t1 − t0 rows."""
        if not self.window:
            return self.gx[t0:t1]
        if t1 - t0 > self.gx.shape[0]:
            raise ValueError(f"a chunk of {t1 - t0} steps does not fit a window of {self.gx.shape[0]}")
        self.g0 = t0
        return self.gx[: t1 - t0]

    def steps(self, t0, t1):
        """Run times [t0, t1) (t1−1 down to t0 in the reverse direction)."""
        kind, rev, proj, dtype = self.kind, self.rev, self.proj, self.gx.dtype
        if self.window and self.g0 != t0:
            raise RuntimeError(f"steps({t0}, {t1}): the gx window holds the chunk from step {self.g0}")
        panels = self.panels.get(self.macs, (self.W_hh.T, self.W_hr.T if proj else None))
        gemm = None if self.small or panels else gemm_function(dtype)  # None: the steps call no BLAS
        if self.small or panels or gemm is not None:
            none = self.gx[:0, :0, :0]
            WhhP, WhrP, tmp = panels or (none, none, none.reshape(0, 0))
            WhhT, WhrT = (tmp[:0, :0], tmp[:0, :0]) if panels else (self.WhhT, self.WhrT)  # panels read WhhP, WhrP
            if not self.keep:
                with policy.step_blas_limit(self.macs, blas=gemm is not None):
                    _infer_loop(
                        kind, rev, t0, t1, self.turn, self.g0, gemm, dtype.type(1), dtype.type(0), self.gx, WhhT,
                        self.b if kind == 3 else none.reshape(0), WhrT, self.hs,
                        self.cs if self.cs is not None else none, self.y,
                        self.aux if self.aux is not None else none, self.m_all if proj else none, self.mask,
                        self.has_mask, proj, WhhP, WhrP, tmp,
                    )
                self.turn = (self.turn + t1 - t0) % 2
                return
            with policy.step_blas_limit(self.macs, blas=gemm is not None):
                _forward_loop(
                    kind, rev, t0, t1, gemm, dtype.type(1), dtype.type(0), WhhT,
                    self.b if kind == 3 else none.reshape(0), WhrT, self.hs,
                    self.cs if self.cs is not None else none, self.y, self.gates,
                    self.aux if self.aux is not None else none, self.m_all if proj else none, self.mask,
                    self.has_mask, proj, WhhP, WhrP, tmp,
                )
            return
        with policy.step_blas_limit(self.macs):
            self._steps_numpy(t0, t1)

    def _steps_numpy(self, t0, t1):
        """``_forward_loop`` (or, not keeping, ``_infer_loop``) in Python with np.matmul per step:
        no BLAS callable from compiled code."""
        kind, rev, proj, dtype = self.kind, self.rev, self.proj, self.gx.dtype
        N, G = self.gx.shape[1], self.gx.shape[2]
        a = np.empty((N, G), dtype)
        h_new = np.empty((N, self.hs.shape[2]), dtype) if proj else None
        hs, cs, aux = self.hs, self.cs, self.aux
        m_all = self.m_all if proj else aux
        for s, t in enumerate(range(t1 - 1, t0 - 1, -1) if rev else range(t0, t1)):
            # (the step's time index, its rev, and its time-indexed arrays: see _infer_loop when not keeping)
            i, r, gates, y, mask = t, rev, self.gx, self.y, self.mask
            if not self.keep:
                w = t - self.g0  # the step's row in the gx and y windows
                i, r, gates, y = 0, (self.turn + s) % 2, gates[w : w + 1], y[w : w + 1]
                mask = mask[t : t + 1] if self.has_mask else mask
            np.matmul(hs[i + r], self.WhhT, out=a)  # a = h_{t−1} W_hhᵀ  (BLAS)
            if kind == 2:
                lstm_fw_step(i, r, a, hs, cs, y, gates, aux, m_all, mask, self.has_mask, proj)
                if proj:
                    np.matmul(m_all[i], self.WhrT, out=h_new)  # h̃_t = m_t W_hrᵀ
                    merge_step(i, r, h_new, hs, y, mask, self.has_mask)
            elif kind == 3:
                gru_fw_step(i, r, a, self.b, hs, y, gates, aux, mask, self.has_mask)
            else:
                rnn_fw_step(i, r, a, hs, y, gates, mask, self.has_mask, kind == 1)
        if not self.keep:
            self.turn = (self.turn + t1 - t0) % 2

    def result(self):
        """(y, h_n, c_n, cache); the cache is None when the run keeps none (``keep=False``), and y
        the last chunk's window when gx is a window."""
        if not self.keep:
            return self.y, self.hs[self.turn], None if self.cs is None else self.cs[self.turn], None
        T, rev = self.y.shape[0], self.rev
        h_n = self.hs[0] if rev else self.hs[T]
        c_n = None if self.cs is None else (self.cs[0] if rev else self.cs[T])
        cache = KernelCache(self.mode, bool(rev), self.mask if self.has_mask else None, self.hs[rev : T + rev],
                            self.hs, self.cs, self.gates, self.aux, self.m_all, self.small, self.panels.for_backward())
        return self.y, h_n, c_n, cache


def sequence_forward(mode, gx, h0, c0, weights, mask=None, reverse=False):
    """Fused :func:`bptt.nn.recurrence.sequence_forward`: same arguments, same results."""
    dtype = np.asarray(gx).dtype
    gx, b_hh = _prepare(mode, gx, weights, dtype)
    run = ForwardRun(mode, h0, c0, weights._replace(b_hh=b_hh), gx, mask, reverse)
    run.steps(0, gx.shape[0])
    return run.result()


class BackwardRun:
    """The fused backward of one layer direction, a range of time steps at a time.

    ``run = BackwardRun(dy, dh_n, dc_n, cache, weights)``; the caller may fill
    dy (T, N, P) chunk by chunk: ``run.steps(t0, t1)`` needs dy[t0:t1] and runs
    times t1−1 down to t0 (t0 up to t1−1 in the reverse direction), after the
    chunks that come before them in that order.  ``run.result()`` →
    ``(dgx, dgh, dh_0, dc_0, dW_hr)`` as :func:`sequence_backward`.  dgx is
    written over ``cache.gates``: a cache serves one backward pass.
    """

    def __init__(self, dy, dh_n, dc_n, cache: KernelCache, weights):
        self.cache = cache
        self.dtype = dtype = cache.gates.dtype
        self.dy = dy
        T, N, P = dy.shape
        self.kind = kind = _KIND[cache.mode]
        self.W_hh = np.ascontiguousarray(weights.W_hh, dtype=dtype)
        G = self.W_hh.shape[0]
        self.H = H = G // gate_count(cache.mode)
        self.rev = int(cache.reverse)
        self.proj = weights.W_hr is not None
        self.W_hr = np.ascontiguousarray(weights.W_hr, dtype=dtype) if self.proj else None
        self.has_mask = cache.mask is not None
        self.mask = cache.mask if self.has_mask else _NO_MASK
        self.dh = np.zeros((N, P), dtype) if dh_n is None else np.array(dh_n, dtype=dtype)  # a copy updated in place
        self.dc = None
        if kind == 2:
            self.dc = np.zeros((N, H), dtype) if dc_n is None else np.array(dc_n, dtype=dtype)
        # ∂L/∂a_t overwrites the activated gates of step t, which the backward step reads just
        # before (the forward cache is consumed): one (T, N, G) buffer less at the peak
        self.dgx = cache.gates
        # dgh: the GRU's keeps only its n-part, da_n ⊙ r (T, N, H), where it differs from dgx (its r- and
        # z-parts are dgx's), written over the forward's gh_n = h_{t−1} W_hnᵀ + b_hn (cache.aux), which
        # step t reads just before (gru_bw_step); else dgh is dgx.  No buffer of its own: the GRU's 2×512
        # training step peaked at 107.6 MB with a (T, N, G) dgh, 88.2 with a (T, N, H) one, 78.4 now.
        self.dgh = cache.aux if kind == 3 else self.dgx
        self.dh_all = np.empty((T, N, P), dtype) if self.proj else None
        self.macs = N * G * P
        self.panels = cache.panels if cache.panels is not None else Panels()

    def steps(self, t0, t1):
        """Run times t1−1 down to t0 (t0 up to t1−1 in the reverse direction)."""
        c, kind, rev, proj = self.cache, self.kind, self.rev, self.proj
        dy, dh, dc, dgx, dgh, dh_all, mask, has_mask = (self.dy, self.dh, self.dc, self.dgx, self.dgh, self.dh_all,
                                                        self.mask, self.has_mask)
        panels = self.panels.get(self.macs, (self.W_hh, self.W_hr if proj else None))
        gemm = None if c.small or panels else gemm_function(self.dtype)  # None: the steps call no BLAS
        if c.small or panels or gemm is not None:
            dummy = dgx[:0, :0, :0]
            W_hhP, W_hrP, tmp = panels or (dummy, dummy, dummy.reshape(0, 0))
            with policy.step_blas_limit(self.macs, blas=gemm is not None):
                _backward_loop(
                    kind, self.H, rev, t0, t1, gemm, self.dtype.type(1), self.dtype.type(0), dy, dh,
                    dc if dc is not None else dgx[0, :0, :0], self.W_hh, self.W_hr if proj else dgx[0, :0, :0], c.hs,
                    c.cs if c.cs is not None else dummy, c.gates, c.aux if c.aux is not None else dummy, dgx, dgh,
                    dh_all if proj else dummy, mask, has_mask, proj, W_hhP, W_hrP, tmp,
                )
            return
        with policy.step_blas_limit(self.macs):
            self._steps_numpy(t0, t1)

    def _steps_numpy(self, t0, t1):
        """``_backward_loop`` in Python with np.matmul per step: no BLAS callable from compiled code."""
        c, kind, rev, proj = self.cache, self.kind, self.rev, self.proj
        dy, dh, dc, dgx, dgh, dh_all, mask, has_mask = (self.dy, self.dh, self.dc, self.dgx, self.dgh, self.dh_all,
                                                        self.mask, self.has_mask)
        N, P = dh.shape
        prod = np.empty((N, P), self.dtype)
        dm = np.empty((N, self.H), self.dtype) if proj else dh
        dgh_t = np.empty((N, dgx.shape[2]), self.dtype)  # GRU: a step's whole dgh (see gru_bw_step)
        row = np.empty(dgx.shape[2], self.dtype)  # the backward steps' scratch gate row
        for t in (range(t0, t1) if rev else range(t1 - 1, t0 - 1, -1)):  # the forward order, read backwards
            if kind == 2:
                if proj:
                    masked_sum(t, dh, dy, dh_all, mask, has_mask)
                    np.matmul(dh_all[t], self.W_hr, out=dm)  # dm = dh̃ W_hr
                lstm_bw_step(t, rev, dy, dh, dc, dm, c.cs, c.gates, c.aux, dgx, row, mask, has_mask, proj)
            elif kind == 3:
                gru_bw_step(t, rev, dy, dh, c.hs, c.gates, c.aux, dgx, dgh, dgh_t, row, mask, has_mask)
            else:
                rnn_bw_step(t, dy, dh, c.gates, dgx, row, mask, has_mask, kind == 1)
            if kind == 3 or has_mask:  # GRU: dh += dgh W_hh;  padded rows keep their dh
                np.matmul(dgh_t if kind == 3 else dgx[t], self.W_hh, out=prod)
                merge_grad(t, prod, dh, mask, has_mask, kind == 3)
            else:
                np.matmul(dgx[t], self.W_hh, out=dh)  # dh = da W_hh

    def result(self):
        """(dgx, dgh, dh_0, dc_0, dW_hr) as :func:`sequence_backward`, but for the GRU dgh is only the
        part that differs from dgx, its n-part (T, N, H) (see ``__init__``)."""
        dW_hr = None
        if self.proj:  # ∂L/∂W_hr = Σ_t dh̃_tᵀ m_t, one product over all steps
            P = self.dh.shape[1]
            dW_hr = self.dh_all.reshape(-1, P).T @ self.cache.m.reshape(-1, self.H)
        return self.dgx, self.dgh, self.dh, self.dc, dW_hr


def sequence_backward(dy, dh_n, dc_n, cache: KernelCache, weights):
    """Fused :func:`bptt.nn.recurrence.sequence_backward`: same arguments, same results
    (the cache's gate buffer becomes dgx, so a cache serves one backward pass)."""
    dy = np.ascontiguousarray(dy, dtype=cache.gates.dtype)
    run = BackwardRun(dy, dh_n, dc_n, cache, weights)
    run.steps(0, dy.shape[0])
    dgx, dgh, dh0, dc0, dW_hr = run.result()
    if run.kind == 3:  # the GRU's whole dgh = [da_r, da_z, da_n ⊙ r]: dgx's r- and z-parts, then its n-part
        dgh = np.concatenate([dgx[:, :, : 2 * run.H], dgh], axis=2)
    return dgx, dgh, dh0, dc0, dW_hr


# ============================================================================ availability
_STATE: dict = {}  # (mode, dtype) -> None when ready, else the reason it is not


def _warm_up(mode, dtype):
    """Compile (or load from Numba's on-disk cache) the kernels of one mode and dtype."""
    from bptt.nn.recurrence import Weights

    rng = np.random.default_rng(0)
    g = gate_count(mode)
    for N, H in ((1, 2), (64, 32)):  # the compiled-loop path, then the BLAS-loop path
        P = H
        W = Weights(rng.standard_normal((g * H, P)).astype(dtype), rng.standard_normal(g * H).astype(dtype),
                    rng.standard_normal((P, H)).astype(dtype) if mode == "lstm" else None)
        gx = rng.standard_normal((2, N, g * H)).astype(dtype)
        c0 = np.zeros((N, H), dtype) if mode == "lstm" else None
        y, _, _, cache = sequence_forward(mode, gx, np.zeros((N, P), dtype), c0, W, np.ones((2, N), bool), False)
        sequence_backward(np.ones_like(y), None, None, cache, W)
        gx, b_hh = _prepare(mode, gx, W, dtype)  # the inference loop (ForwardRun(keep=False))
        ForwardRun(mode, np.zeros((N, P), dtype), c0, W._replace(b_hh=b_hh), gx, np.ones((2, N), bool),
                   keep=False).steps(0, 2)


def available(mode="lstm", dtype=np.float32) -> bool:
    """True when the fused kernels of ``mode``/``dtype`` compile (the first call compiles or loads the cache)."""
    key = (mode, np.dtype(dtype))
    if key not in _STATE:
        if not HAVE_NUMBA:
            _STATE[key] = "numba is not installed"
        elif mode not in GATES or key[1] not in (np.float32, np.float64):
            _STATE[key] = f"no fused kernel for mode={mode!r}, dtype={key[1]}"
        else:
            try:
                _warm_up(mode, key[1])
                _STATE[key] = None
            except Exception as exc:  # compilation failed: fall back to the reference loop
                _STATE[key] = f"{type(exc).__name__}: {exc}"
    return _STATE[key] is None


def sequence_impl(mode, dtype, required=False):
    """``(sequence_forward, sequence_backward)`` for ``mode`` and ``dtype``, or None.

    None means "use bptt.nn.recurrence" (Numba missing or failing to compile); with
    ``required=True`` that raises RuntimeError instead.
    """
    if available(mode, dtype):
        return sequence_forward, sequence_backward
    if required:
        raise RuntimeError(f"fused kernels are not available: {_STATE[(mode, np.dtype(dtype))]}")
    return None


# ============================================================================ one step of a stacked layer
def layer_step(mode, params, x, h0, c0):
    """One time step through every layer of a unidirectional stack, for sampling.

    params: per layer (W_ih (G, D_k), b_ih, W_hh (G, P), b_hh, W_hr or None);
    x (N, D); h0 (L, N, P); c0 (L, N, H) or None.
    Returns y (N, P), h_n (L, N, P), c_n (L, N, H) or None — what
    ``RNNBase.forward`` returns for a one-step sequence, without its bookkeeping:
    per layer two BLAS products (x W_ihᵀ, h W_hhᵀ) and one fused step, T = 1.
    """
    kind = _KIND[mode]
    dtype = x.dtype
    N = x.shape[0]
    L, _, P = h0.shape
    h_n = np.empty_like(h0)
    c_n = None if c0 is None else np.empty_like(c0)
    W_hh = params[-1][2]
    with policy.sampling_blas_limit(W_hh.nbytes, N * W_hh.shape[0] * P):  # (memory-bound products: see there)
        return _layer_step(kind, params, x, h0, c0, h_n, c_n, dtype, N, L, P)


def _layer_step(kind, params, x, h0, c0, h_n, c_n, dtype, N, L, P):
    inp = x
    for k in range(L):
        W_ih, b_ih, W_hh, b_hh, W_hr = params[k]
        G = W_hh.shape[0]
        gx = np.empty((1, N, G), dtype)
        np.matmul(inp, W_ih.T, out=gx[0])  # x W_ihᵀ
        if b_ih is not None:
            gx[0] += b_ih
        a = np.empty((N, G), dtype)
        np.matmul(h0[k], W_hh.T, out=a)  # h_{t−1} W_hhᵀ
        hs = np.empty((2, N, P), dtype)
        hs[0] = h0[k]
        y = np.empty((1, N, P), dtype)
        if kind == 3:
            b = np.zeros(G, dtype) if b_hh is None else b_hh
            aux = np.empty((1, N, P), dtype)
            gru_fw(0, 0, a, b, hs, y, gx, aux, _NO_MASK, False)  # the gates activated in gx
        else:
            if b_hh is not None:
                gx[0] += b_hh
            if kind == 2:
                H = c0.shape[2]
                cs = np.empty((2, N, H), dtype)
                cs[0] = c0[k]
                aux = np.empty((1, N, H), dtype)
                proj = W_hr is not None
                m = np.empty((1, N, H), dtype) if proj else aux
                lstm_fw(0, 0, a, hs, cs, y, gx, aux, m, _NO_MASK, False, proj)
                if proj:
                    np.matmul(m[0], W_hr.T, out=hs[1])  # h̃ = m W_hrᵀ
                    y[0] = hs[1]
                c_n[k] = cs[1]
            else:
                rnn_fw(0, 0, a, hs, y, gx, _NO_MASK, False, kind == 1)
        h_n[k] = hs[1]
        inp = y[0]
    return inp, h_n, c_n
