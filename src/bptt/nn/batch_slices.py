"""A recurrent layer's batch slices: the batch cut in parts, one thread each through the whole stack.

Shape legend: T time steps, n the rows of a batch slice (of N), D input features, G stacked gates.

Slices of the batch are independent through every step of every layer; only the weight gradients
sum over them.  :class:`bptt.nn.rnn.RNNBase` runs its forward and backward this way when
:func:`bptt.runtime.policy.batch_parts` says so: the first slice accumulates into the layer's own
gradients, every other one into a :class:`ZerosOnDemand` of its own, added in slice order at the end.

A slice reads the layer's input x[:, s] and writes its input gradient dx[:, s] in place, as views
of the whole batch's arrays (each step's n rows contiguous, the steps N rows apart), not as copies:
:func:`add_gram` and :func:`matmul_into` run a product over such a view a few steps at a time
(``PIECE_ROWS``), so neither a (T, n, D) copy of x nor a slice's own dx joined afterwards is made.
:func:`select_streams` and :func:`join_streams` cut a recurrent state into the slices' rows and join them.
"""

from __future__ import annotations

import numpy as np

from bptt.runtime.threads import single_thread_blas
from bptt.runtime.wavefront import run_parallel

__all__ = ["ZerosOnDemand", "run_slices", "add_gram", "matmul_into", "PIECE_ROWS", "select_streams", "join_streams"]

# The rows of one piece of a product over a slice's strided view: enough for BLAS to run near its
# best, few enough that a piece's copy or scratch stays small.
PIECE_ROWS = 1024


class ZerosOnDemand(dict):
    """A batch slice's own gradient arrays, shaped as those of ``like`` (a dict of arrays), each made
    (zeros) when the slice's backward first reaches it: a layer's, as that layer's weight gradients
    come, when the layers above have freed their caches, not all at the start of the backward, the
    peak of a training step (GRU 2×512 in two slices: 111.5 → 100.0 MB)."""

    def __init__(self, like):
        super().__init__()
        self._like = like

    def __missing__(self, name):
        g = self[name] = np.zeros_like(self._like[name])
        return g

    def get(self, name, default=None):
        return self[name] if name in self._like else default


def run_slices(jobs):
    """Run one job per batch slice, each in a thread with one BLAS thread (see
    :func:`bptt.runtime.policy.batch_parts`) → (their results, and the first three fields of the
    results joined along the batch axis, None where the slices have None)."""
    with single_thread_blas():
        results = run_parallel(jobs)
    joined = tuple(None if results[0][i] is None else np.concatenate([r[i] for r in results], axis=1) for i in range(3))
    return results, joined


def _pieces(T, n):
    """The steps [t0, t1) of each piece of about PIECE_ROWS rows of a (T, n, ·) array."""
    step = max(1, PIECE_ROWS // max(n, 1))
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


def add_gram(g, a, x):
    """g (G, D) += aᵀ X for a (T·n, G) and X (T, n, D), a weight gradient such as ∂L/∂W_ih = dgxᵀ X:
    one product when X is contiguous, else piece by piece, each piece of X copied in turn."""
    T, n, D = x.shape
    if x.flags.c_contiguous:
        g += a.T @ x.reshape(T * n, D)
        return
    for t0, t1 in _pieces(T, n):
        g += a[t0 * n : t1 * n].T @ x[t0:t1].reshape(-1, D)


def matmul_into(a, W, out, add=False):
    """out (T, n, D) = a (T, n, G) W (G, D), or += with ``add``: one product when ``out`` is contiguous,
    else (a batch slice's view) piece by piece through one scratch piece."""
    T, n, G = a.shape
    if out.flags.c_contiguous:
        o, p = out.reshape(T * n, -1), a.reshape(T * n, G)
        if add:
            o += p @ W
        else:
            np.matmul(p, W, out=o)
        return
    pieces = _pieces(T, n)
    scratch = np.empty(((pieces[0][1] - pieces[0][0]) * n, W.shape[1]), out.dtype)
    for t0, t1 in pieces:
        piece = scratch[: (t1 - t0) * n]
        np.matmul(a[t0:t1].reshape(-1, G), W, out=piece)
        if add:
            out[t0:t1] += piece.reshape(t1 - t0, n, -1)
        else:
            out[t0:t1] = piece.reshape(t1 - t0, n, -1)


def select_streams(state, idx):
    """Streams ``idx`` (a slice or index array over N) of a recurrent state: h (L·K, N, P), an LSTM's
    (h, c), or None."""
    if state is None:
        return None
    return tuple(a[:, idx] for a in state) if isinstance(state, tuple) else state[:, idx]


def join_streams(states):
    """The states of consecutive groups of streams joined into one, along N (the inverse of
    :func:`select_streams` over slices that cover the batch in order); None if any is None."""
    if any(s is None for s in states):
        return None
    if isinstance(states[0], tuple):
        return tuple(np.concatenate(parts, axis=1) for parts in zip(*states, strict=True))
    return np.concatenate(states, axis=1)
