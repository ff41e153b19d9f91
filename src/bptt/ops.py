"""Stateless forward/backward pairs for the non-recurrent pieces.

Shape legend: N rows (any leading shape flattened), D input features,
K output features, V vocabulary (embedding rows), E embedding size.

Each ``*_forward`` returns its output and what its ``*_backward`` needs.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "affine_forward",
    "affine_backward",
    "embedding_forward",
    "embedding_backward",
    "dropout_mask",
]


def affine_forward(x, W, b):
    """y = x Wᵀ + b.   x (..., D), W (K, D), b (K,) or None → y (..., K)."""
    y = (x.reshape(-1, W.shape[1]) @ W.T).reshape(*x.shape[:-1], W.shape[0])  # one 2-d product, not a stack
    if b is not None:
        y += b
    return y


def affine_backward(dy, x, W, dW, db):
    """Backward of y = x Wᵀ + b: accumulates dW += dyᵀ x, db += Σ dy; returns dx = dy W."""
    K, D = W.shape
    dy2, x2 = dy.reshape(-1, K), x.reshape(-1, D)
    dW += dy2.T @ x2
    if db is not None:
        db += dy2.sum(axis=0)
    return (dy2 @ W).reshape(*dy.shape[:-1], D)


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


def dropout_mask(shape, p, rng: np.random.Generator, dtype):
    """Inverted dropout: keep with probability 1 − p and scale by 1/(1 − p),
    so the layer is the identity in expectation and needs no change at eval time.
    The same mask multiplies the forward activations and the backward gradients."""
    if p >= 1.0:
        return np.zeros(shape, dtype)
    keep = rng.random(shape) >= p
    return keep.astype(dtype) / dtype.type(1.0 - p)
