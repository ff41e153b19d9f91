"""Stateless forward/backward pairs for the non-recurrent pieces.

Shape legend: N rows (any leading shape flattened), D input features,
K output features, V vocabulary (embedding rows), E embedding size.

Each ``*_forward`` returns its output and what its ``*_backward`` needs.
"""

from __future__ import annotations

import numpy as np

from bptt.runtime import policy  # read at run time (tests monkeypatch threads.blas_threads, which it reads)
from bptt.runtime.wavefront import run_parallel, run_row_slices  # one job runs in the calling thread: no overhead

__all__ = [
    "affine_forward",
    "affine_forward_then",
    "affine_backward",
    "embedding_forward",
    "embedding_backward",
    "dropout_mask",
    "lengths_to_mask",
]


def _rows(a) -> int:
    """The number of rows of ``a`` (..., F): the product of its leading sizes (also when F = 0)."""
    return int(np.prod(a.shape[:-1], dtype=np.int64))


def affine_forward(x, W, b):
    """y = x Wᵀ + b.   x (..., D), W (K, D), b (K,) or None → y (..., K).

    One 2-d product (not a stack of them), by slices of rows in parallel threads
    where :func:`bptt.runtime.policy.row_slices` gives several."""
    return affine_forward_then(x, W, b, None)[0]


def affine_forward_then(x, W, b, then):
    """:func:`affine_forward`, and ``then(rows, y2[rows])`` on each slice of rows of y2 (the output
    as (rows of x, K)) in the thread that made it, right after its product: → (y (..., K), the
    results of ``then`` in row order), or (y, []) when ``then`` is None.

    What follows the product then shares its threads: a language model's loss over its logits
    runs in the decoder's threads instead of on one core after them (a thread handed work
    starts 0.1 ms late on this machine, a tenth of the 2,500 × 65 logits' product and loss)."""
    K, D = W.shape
    x2 = x.reshape(_rows(x), D)  # (not -1: D may be 0)
    y2 = np.empty((x2.shape[0], K), np.result_type(x2, W))

    def rows(s):
        np.matmul(x2[s], W.T, out=y2[s])
        if b is not None:
            y2[s] += b
        return None if then is None else then(s, y2[s])

    results = run_parallel([lambda s=s: rows(s) for s in policy.row_slices(len(x2), K * D)])
    return y2.reshape(*x.shape[:-1], K), ([] if then is None else results)


def affine_backward(dy, x, W, dW, db):
    """Backward of y = x Wᵀ + b: accumulates dW += dyᵀ x, db += Σ dy; returns dx = dy W.

    By slices of rows in parallel threads where :func:`bptt.runtime.policy.row_slices` gives several:
    each slice's dyᵀ x and Σ dy are added in slice order (a fixed order)."""
    K, D = W.shape
    dy2, x2 = dy.reshape(_rows(dy), K), x.reshape(_rows(x), D)
    dx2 = np.empty((dy2.shape[0], D), np.result_type(dy2, W))

    def rows(s):
        np.matmul(dy2[s], W, out=dx2[s])
        return dy2[s].T @ x2[s], None if db is None else dy2[s].sum(axis=0)

    for dW_part, db_part in run_parallel([lambda s=s: rows(s) for s in policy.row_slices(len(dy2), K * D)]):
        dW += dW_part
        if db is not None:
            db += db_part
    return dx2.reshape(*dy.shape[:-1], D)


def embedding_forward(ids, W):
    """y = W[ids].   ids (...) integers in [0, V), W (V, E) → y (..., E)."""
    return W[ids]


def embedding_backward(dy, ids, dW):
    """Scatter-add: dW[v] += Σ_{positions with ids = v} dy (repeated ids accumulate)."""
    E = dW.shape[1]
    scatter_add_rows(dW, ids.reshape(-1), dy.reshape(-1, E))


def scatter_add_rows(out, ids, rows):
    """out[ids[i]] += rows[i] for every i (repeated ids accumulate): ``np.add.at``, compiled."""
    from bptt import kernels  # lazily: importing Numba is slow

    kernels.scatter_add_rows(out, ids, rows)


# Masks of more numbers than this are drawn in blocks of it, each block from a generator of its own seeded
# from ``rng``: the blocks can then be drawn side by side (in bptt's threads, where BLAS is held to one
# thread: a Transformer layer's row slices), and the numbers do not depend on how many threads there are.
DROPOUT_BLOCK = 1 << 20


def dropout_mask(shape, p, rng: np.random.Generator, dtype):
    """Inverted dropout: keep with probability 1 − p and scale by 1/(1 − p),
    so the layer is the identity in expectation and needs no change at eval time.
    The same mask multiplies the forward activations and the backward gradients.

    The mask is the uniform draws u ≥ p, in C order: float32 masks from float32 draws (24 random bits
    each, half the generator's work of float64 ones), a mask of more than ``DROPOUT_BLOCK`` numbers
    block by block (see there).  With NumPy's default generator (PCG64) the draws come compiled from its
    raw output (:func:`bptt.kernels.fused.keep_scaled_draws`): the same numbers, a third cheaper."""
    dtype = np.dtype(dtype)
    if p >= 1.0:
        return np.zeros(shape, dtype)
    u = np.empty(shape, np.float32 if dtype == np.float32 else np.float64)
    flat = u.reshape(-1)
    scale = u.dtype.type(1.0) / u.dtype.type(1.0 - p)  # 1 / (1 − p), rounded as the mask's dtype
    from bptt import kernels  # lazily: importing Numba is slow

    def fill(gen, block):
        if kernels.keep_scaled_draws(gen, p, scale, block):  # the same numbers from the raw bits, compiled
            return
        gen.random(out=block, dtype=u.dtype)
        if not kernels.keep_scaled(block, p, scale):
            np.multiply(block >= p, scale, out=block)

    if flat.size <= DROPOUT_BLOCK:
        fill(rng, flat)
    else:
        starts = range(0, flat.size, DROPOUT_BLOCK)
        seeds = rng.integers(1 << 63, size=len(starts))
        make = type(rng.bit_generator)

        def blocks(s):
            for i in range(len(starts))[s]:
                fill(np.random.Generator(make(int(seeds[i]))), flat[starts[i]:starts[i] + DROPOUT_BLOCK])

        run_row_slices(len(starts), DROPOUT_BLOCK * policy.ELEMENT_MACS, blocks)
    return u.astype(dtype, copy=False)


def lengths_to_mask(lengths, T: int, N: int):
    """(T, N) bool mask, True where t < lengths[n]; None when every length is T.

    Lengths may come in any order (like ``pack_padded_sequence(enforce_sorted=False)``).
    """
    if lengths is None:
        return None
    arr = np.asarray(lengths)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.shape != (N,):
        raise ValueError(f"lengths must have shape ({N},) (one per batch item), got {arr.shape}")
    if not np.all(arr == np.round(arr)):
        raise ValueError("lengths must be whole numbers")
    arr = arr.astype(np.int64)
    if arr.min() < 1 or arr.max() > T:
        raise ValueError(f"lengths must be in [1, {T}] (the padded length), got [{arr.min()}, {arr.max()}]")
    if np.all(arr == T):
        return None
    return np.arange(T)[:, None] < arr[None, :]
