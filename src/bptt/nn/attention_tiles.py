"""Scaled dot-product attention in cache-sized tiles, forward and backward: the same numbers as the
whole-array path of :mod:`bptt.nn.multihead`, with less memory traffic, on every core, and with the
causal mask's empty blocks skipped.

Shape legend: B the leading (batch, heads) shape, L query rows, S key columns, d head width,
b the score matrices in one tile.

Why tiles.  Computed whole, the scores s = q kᵀ of (N 16, h 6, T 256, d 64) are 25 MB: the product
writes them to memory, the softmax reads and writes them, the product with v reads them again, and
the backward does the same four times over.  With d = 64 each score costs only 64 multiply-adds, so
those passes, not the arithmetic, set the pace (the q kᵀ product alone ran at 76-108 GFLOP/s of
two cores' 300).  A tile is the b matrices whose scores fit in half of one core's L2 (b L S
numbers ≤ ``policy.ATTENTION_TILE_BYTES``): its scores are made, normalised and multiplied by v
while they sit in cache, and written back once (they are the weights the backward needs).  The
tiles are independent, so with two cores two threads take alternate tiles, each with one BLAS
thread (small products with two BLAS threads each wait on the other).

Why blocks.  With the causal mask (top-left aligned, L = S), query row i sees keys j ≤ i, so a
block of rows [r0, r1) needs keys [0, r1) only::

    s[r0:r1, :r1] = q[r0:r1] k[:r1]ᵀ                o[r0:r1] = ã[r0:r1, :r1] v[:r1]

and in the backward, key columns [c0, c1) are seen by rows [c0, L) only::

    dã[r0:r1, :r1] = do[r0:r1] v[:r1]ᵀ              dq[r0:r1] = ds[r0:r1, :r1] k[:r1]
    dv[c0:c1] = ã[c0:, c0:c1]ᵀ do[c0:]               dk[c0:c1] = ds[c0:, c0:c1]ᵀ q[c0:]

With nb blocks the products do (nb + 1) / (2 nb) of the square's work (5/8 for nb = 4).  The
scores above the blocks are never computed: the softmax kernels read a row only up to its
diagonal and write 0 beyond it, so they need the compiled kernels (the NumPy softmax reads
whole rows); :func:`usable` says whether the tiled path applies.
"""

from __future__ import annotations

import numpy as np

from bptt.runtime import policy, threads
from bptt.runtime.wavefront import run_parallel

__all__ = ["wanted", "usable", "attend_tiled", "attend_tiled_backward"]

_MIN_BLOCK_ROWS = 128  # rows of a causal block: smaller products lose more to BLAS's edges than they skip


def wanted(matrices: int, L: int, S: int, dtype) -> bool:
    """Whether attention over ``matrices`` (L, S) score matrices of ``dtype`` runs in tiles: scores of at
    least ``policy.ATTENTION_TILES_MIN_BYTES``, float32/float64, and the compiled softmax kernels there.

    A Transformer layer asks before it starts (:class:`bptt.nn.transformer.TransformerEncoderLayer`):
    when the answer is yes, its products run on one BLAS thread each, in this module's threads
    (:func:`bptt.runtime.threads.single_thread_blas`), because an OpenBLAS thread left spinning by
    a two-thread product takes a core from the tiles' second thread for the next ~0.1 s."""
    from bptt.kernels.mathfn import HAVE_NUMBA  # lazily: importing Numba is slow

    dtype = np.dtype(dtype)
    return (HAVE_NUMBA and dtype in (np.float32, np.float64) and matrices * L * S > 0
            and matrices * L * S * dtype.itemsize >= policy.ATTENTION_TILES_MIN_BYTES)


def usable(q, k, v) -> bool:
    """Whether :func:`attend_tiled` applies to q (B, L, d), k (B, S, d), v (B, S, dv): one dtype, a leading
    batch shape B, and :func:`wanted`."""
    if q.ndim < 3 or k.dtype != q.dtype or v.dtype != q.dtype or q.shape[:-2] != k.shape[:-2]:
        return False
    return wanted(int(np.prod(q.shape[:-2])), q.shape[-2], k.shape[-2], q.dtype)


def _tiles(lead: tuple, L: int, S: int, itemsize: int) -> list[tuple]:
    """Index tuples into the leading shape B, each selecting b ≥ 1 consecutive matrices of its
    last axis: together every matrix once, in order."""
    per = max(1, policy.ATTENTION_TILE_BYTES // (L * S * itemsize))
    inner = lead[-1]
    return [outer + (slice(j, min(j + per, inner)),) for outer in np.ndindex(*lead[:-1])
            for j in range(0, inner, per)]


def _blocks(L: int, S: int, causal: bool) -> list[tuple[int, int, int]]:
    """Blocks (r0, r1, end): query rows [r0, r1) need keys [0, end), and so key columns [r0, end) are
    seen by rows [r0, L) only.  With the causal mask (L = S) up to four blocks of at least
    _MIN_BLOCK_ROWS rows, end = r1; otherwise one block (0, L, S)."""
    if not causal or L != S:
        return [(0, L, S)]
    nb = max(1, min(4, L // _MIN_BLOCK_ROWS))
    edges = [L * i // nb for i in range(nb + 1)]
    return [(r0, r1, r1) for r0, r1 in zip(edges[:-1], edges[1:])]


def _run(jobs_for, keys):
    """``jobs_for(keys_part)`` for two alternating halves of ``keys`` in two threads (each with one
    BLAS thread) when two cores are there and there are tiles for both; else all in this thread."""
    parts = min(threads.blas_threads(), 2, len(keys))
    if parts < 2:
        jobs_for(keys)
        return
    with threads.cores_each(1):
        run_parallel([lambda ks=keys[i::parts]: jobs_for(ks) for i in range(parts)])


def attend_tiled(q, k, v, bias, causal, scale, drop, nan_if_all_masked, softmax, out):
    """o = (softmax(q kᵀ · scale + bias) ⊙ drop) v, tile by tile → the weights a (B, L, S), before dropout.

    q (B, L, d), k (B, S, d), v (B, S, dv), any of them strided views; ``bias`` None or an additive
    mask broadcastable to (B, L, S); ``causal`` (with bias None): row i sees keys j ≤ i;
    ``drop`` None or the dropout mask r / (1 − p) (B, L, S); ``softmax(s, scale, causal, nan)`` the
    in-place kernel; ``out`` (B, L, dv), possibly a strided view, receives o."""
    L, S = q.shape[-2], k.shape[-2]
    a = np.empty(q.shape[:-1] + (S,), q.dtype)
    bias = None if bias is None else np.broadcast_to(bias, a.shape)
    blocks = _blocks(L, S, causal)

    def tiles(keys):
        for key in keys:
            s, qt, kt, vt, ot = a[key], q[key], k[key], v[key], out[key]
            for r0, r1, end in blocks:
                np.matmul(qt[..., r0:r1, :], kt[..., :end, :].swapaxes(-1, -2), out=s[..., r0:r1, :end])
            if bias is None:
                softmax(s, scale, causal, nan_if_all_masked)
            else:  # one block: the whole tile was computed
                s *= s.dtype.type(scale)
                s += bias[key]
                softmax(s, 1.0, False, nan_if_all_masked)
            for r0, r1, end in blocks:
                at = s[..., r0:r1, :end] if drop is None else s[..., r0:r1, :end] * drop[key][..., r0:r1, :end]
                np.matmul(at, vt[..., :end, :], out=ot[..., r0:r1, :])

    _run(tiles, _tiles(q.shape[:-2], L, S, q.itemsize))
    return a


def attend_tiled_backward(do, q, k, v, a, drop, dweights, scale, causal, softmax_backward, out):
    """Backward of :func:`attend_tiled`: ∂L/∂o (B, L, dv) (and ∂L/∂ã or None) → dq, dk, dv written
    into ``out`` (three arrays or strided views shaped as q, k, v)::

        ∂L/∂v = ãᵀ do,   ∂L/∂ã = do vᵀ,   ∂L/∂s = a ⊙ (∂L/∂a − Σ_S a ⊙ ∂L/∂a) · scale,
        ∂L/∂q = ∂L/∂s k,   ∂L/∂k = ∂L/∂sᵀ q        (∂L/∂a = ∂L/∂ã ⊙ drop)

    ``causal`` as in the forward (the blocks are the forward's)."""
    dq, dk, dv = out
    L, S = q.shape[-2], k.shape[-2]
    if dweights is not None:
        dweights = np.broadcast_to(dweights, a.shape)
    blocks = _blocks(L, S, causal)
    keys = _tiles(q.shape[:-2], L, S, q.itemsize)
    most = max(key[-1].stop - key[-1].start for key in keys)

    def tiles(keys):
        scratch = np.empty((most, L, S), q.dtype)  # this thread's ∂L/∂ã, then ∂L/∂s, one tile at a time
        for key in keys:
            at, qt, kt, vt, dot = a[key], q[key], k[key], v[key], do[key]
            if drop is not None:
                at = at * drop[key]
            for r0, _, end in blocks:  # key columns [r0, end), seen by rows [r0, L)
                np.matmul(at[..., r0:, r0:end].swapaxes(-1, -2), dot[..., r0:, :], out=dv[key][..., r0:end, :])
            ds = scratch[:at.shape[0]]
            for r0, r1, end in blocks:
                d = ds[..., r0:r1, :end]
                np.matmul(dot[..., r0:r1, :], vt[..., :end, :].swapaxes(-1, -2), out=d)
                if dweights is not None:
                    d += dweights[key][..., r0:r1, :end]
                if drop is not None:
                    d *= drop[key][..., r0:r1, :end]
            softmax_backward(a[key], ds, scale, causal)  # in place: ∂L/∂s, 0 beyond each row's diagonal
            for r0, r1, end in blocks:
                np.matmul(ds[..., r0:r1, :end], kt[..., :end, :], out=dq[key][..., r0:r1, :])
                np.matmul(ds[..., r0:, r0:end].swapaxes(-1, -2), qt[..., r0:, :], out=dk[key][..., r0:end, :])

    _run(tiles, keys)
