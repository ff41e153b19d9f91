"""Losses that return their own gradient: ``loss, dL/dinput = f(input, target)``.

Shapes::

    N   batch size
    T   time steps (sequence length)
    V   number of classes (vocabulary size)
    ... any number of leading dimensions, e.g. (N,), (N, T) or (T, N)

    logits   (..., V)   float32 or float64, unnormalised scores z
    targets  (...)      integer class indices y in [0, V), or ignore_index
    mask     (...)      bool, or float weights w ≥ 0 (0 excludes a position)

Every loss returns a Python float and a gradient with the input's shape and
dtype, ready to hand to the model's ``backward``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["log_softmax", "softmax", "cross_entropy", "mse"]

_REDUCTIONS = ("mean", "sum")


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log softmax(z)_i = z_i − m − log Σ_j exp(z_j − m), with m = max_j z_j.

    Subtracting the max keeps exp() from overflowing; the result is exact in
    real arithmetic.  Same shape and dtype as ``logits``.
    """
    z = np.asarray(logits)
    shifted = z - np.max(z, axis=axis, keepdims=True)
    lse = np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    shifted -= lse
    return shifted


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax(z)_i = exp(z_i − m) / Σ_j exp(z_j − m), with m = max_j z_j (overflow-free)."""
    z = np.asarray(logits)
    e = z - np.max(z, axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def _float_input(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    return arr


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")


def cross_entropy(
    logits: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    need_grad: bool = True,
) -> tuple[float, np.ndarray | None]:
    r"""Softmax cross-entropy over the last axis, with masking; returns ``(loss, dL/dlogits)``.

    For each position n with logits z_n (V,) and target y_n, let
    ŷ_n = softmax(z_n) and w_n the mask weight (1 without a mask).  A position
    is *counted* when y_n ≠ ignore_index and w_n ≠ 0.  With C the counted set::

        L = −Σ_{n∈C} w_n log softmax(z_n)_{y_n} / W,     W = Σ_{n∈C} w_n   ("mean")
        L = −Σ_{n∈C} w_n log softmax(z_n)_{y_n}                             ("sum")

        ∂L/∂z_n = w_n (ŷ_n − onehot(y_n)) / W     for n ∈ C  (W = 1 for "sum")
        ∂L/∂z_n = 0                               otherwise

    With a bool mask (or none), W is the number of counted positions, and
    "mean" is exactly ``torch.nn.functional.cross_entropy(..., ignore_index=...)``
    (with logits moved to axis 1 for more than 2 dimensions).  If nothing is
    counted (W = 0), "mean" returns 0.0 and a zero gradient, where PyTorch
    returns nan.

    Args:
        logits: (..., V) float32/float64.
        targets: (...) integers in [0, V), or ``ignore_index``.  Positions whose
            mask is 0 are excluded and may hold any integer (e.g. padding).
        mask: optional (...) bool or non-negative float weights.
        ignore_index: target value to exclude (like PyTorch's).
        reduction: "mean" or "sum".
        need_grad: False returns ``(loss, None)`` and skips the gradient (evaluation).

    Without a mask or ignored targets, the loss (and gradient) come from one
    compiled pass over the logits (:func:`bptt.kernels.softmax_cross_entropy`),
    the same formulas as below up to rounding.

    Raises ValueError for mismatched shapes, non-integer targets, counted
    targets outside [0, V), negative or non-finite mask weights, or an unknown
    reduction.
    """
    _check_reduction(reduction)
    z = _float_input(logits, "logits")
    y = np.asarray(targets)
    if z.ndim < 1 or z.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {z.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"targets must be an integer array, got dtype {y.dtype}")
    if y.shape != z.shape[:-1]:
        raise ValueError(f"targets shape {y.shape} does not match logits shape {z.shape} (expected {z.shape[:-1]})")
    V = z.shape[-1]
    z2 = z.reshape(-1, V)
    y1 = y.reshape(-1)
    M = y1.shape[0]

    counted = y1 != ignore_index
    if mask is None:
        w = None
    else:
        m = np.asarray(mask)
        if m.shape != y.shape:
            raise ValueError(f"mask shape {m.shape} does not match targets shape {y.shape}")
        if m.dtype == bool:
            counted &= m.reshape(-1)
            w = None
        else:
            if not np.issubdtype(m.dtype, np.number) or np.issubdtype(m.dtype, np.complexfloating):
                raise ValueError(f"mask must be bool or real weights, got dtype {m.dtype}")
            w = m.reshape(-1).astype(z.dtype)
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError("mask weights must be finite and non-negative")
            counted &= w != 0

    bad = counted & ((y1 < 0) | (y1 >= V))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        idx = np.unravel_index(i, y.shape) if y.ndim else ()
        raise ValueError(
            f"target {int(y1[i])} at position {tuple(int(k) for k in idx)} is out of range [0, {V}) "
            f"(and is not ignore_index={ignore_index})"
        )

    if w is None and counted.all() and M:
        from bptt import kernels# lazily: importing Numba is slow

        denom = float(M) if reduction == "mean" else 1.0
        grad = np.empty_like(z2) if need_grad else None
        total = kernels.softmax_cross_entropy(z2, y1, grad, 1.0 / denom)
        if total is not None:
            return total / denom, None if grad is None else grad.reshape(z.shape)

    rows = np.arange(M)
    y_safe = np.where(counted, y1, 0)
    # per-position weight, 0 where not counted (float64 sums for the loss itself)
    weight = counted.astype(z.dtype) if w is None else np.where(counted, w, 0).astype(z.dtype)
    total = float(np.sum(weight, dtype=np.float64))
    if reduction == "mean":
        if total == 0.0:
            return 0.0, np.zeros_like(z)
        denom = total
    else:
        denom = 1.0

    grad = log_softmax(z2, axis=-1)  # (M, V); turned into the gradient in place
    loss = -float(np.sum(grad[rows, y_safe] * weight, dtype=np.float64)) / denom
    if not need_grad:
        return loss, None
    np.exp(grad, out=grad)  # ŷ
    grad[rows, y_safe] -= 1.0
    weight /= weight.dtype.type(denom)
    grad *= weight[:, None]
    return loss, grad.reshape(z.shape)


def mse(pred: np.ndarray, target: np.ndarray, reduction: str = "mean") -> tuple[float, np.ndarray]:
    r"""Squared error; returns ``(loss, dL/dpred)``.

    With K = pred.size::

        L = Σ_i (p_i − t_i)² / K      ("mean", as ``torch.nn.functional.mse_loss``)
        L = Σ_i (p_i − t_i)²          ("sum")
        ∂L/∂p_i = 2 (p_i − t_i) / K   (K = 1 for "sum")

    ``pred`` and ``target`` must have the same shape (no broadcasting).  An
    empty input gives 0.0 (PyTorch: nan for "mean").
    """
    _check_reduction(reduction)
    p = _float_input(pred, "pred")
    t = np.asarray(target)
    if not (np.issubdtype(t.dtype, np.number) or t.dtype == bool) or np.issubdtype(t.dtype, np.complexfloating):
        raise ValueError(f"target must be a real numeric array, got dtype {t.dtype}")
    if t.shape != p.shape:
        raise ValueError(f"target shape {t.shape} does not match pred shape {p.shape}")
    diff = np.subtract(p, t, dtype=p.dtype)
    loss = float(np.sum(np.square(diff), dtype=np.float64))
    k = p.size if reduction == "mean" else 1
    if k == 0:
        return 0.0, diff
    diff *= p.dtype.type(2.0 / k)
    return loss / k, diff
