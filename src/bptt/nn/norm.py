"""Layer normalisation, forward and backward side by side.

Shape legend: B any leading shape (the rows), F the normalised trailing shape
(``normalized_shape``), n = prod(F) numbers per row.

Forward, per row x (n numbers)::

    μ = Σ x / n,   σ² = Σ (x − μ)² / n         (biased variance, as PyTorch)
    r = 1 / √(σ² + ε)                           "rstd"
    x̂ = (x − μ) r
    y = x̂ ⊙ γ + β                              γ = weight, β = bias (F)

and backward, the same read upwards (derivation in ``docs/transformer.md``)::

    ∂L/∂γ = Σ_B ∂L/∂y ⊙ x̂,   ∂L/∂β = Σ_B ∂L/∂y
    g = ∂L/∂y ⊙ γ
    ∂L/∂x = r (g − mean(g) − x̂ mean(g ⊙ x̂))     means over the n numbers of the row
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn.module import Module, as_float_array

__all__ = ["LayerNorm", "layer_norm_forward", "layer_norm_backward"]


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (B, n) normalised input
    rstd: np.ndarray  # (B, 1) 1/√(σ² + ε)


def layer_norm_forward(x2, eps):
    """x2 (B, n) → (x̂ (B, n), cache): the normalisation without the affine part."""
    mu = x2.mean(axis=1, keepdims=True)
    xc = x2 - mu
    var = np.mean(xc * xc, axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    return xhat, LayerNormCache(xhat, rstd)


def layer_norm_backward(dxhat, cache: LayerNormCache):
    """∂L/∂x̂ (B, n) → ∂L/∂x (B, n) = r (g − mean g − x̂ mean(g ⊙ x̂))."""
    xhat, rstd = cache
    return rstd * (dxhat - dxhat.mean(axis=1, keepdims=True) - xhat * np.mean(dxhat * xhat, axis=1, keepdims=True))


class LayerNorm(Module):
    """``nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)``.

    x (..., *F) → y of the same shape, normalised over the trailing ``F = normalized_shape``.
    Parameters ``weight`` (F) = 1 and ``bias`` (F) = 0 at init (when ``elementwise_affine``;
    ``bias=False`` drops β).  ``backward(dy)`` → dx.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, dtype=np.float32):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
        if not shape or any(int(s) != s or s < 1 for s in shape):
            raise ValueError(f"normalized_shape must be a positive int or a tuple of them, got {normalized_shape!r}")
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps, self.elementwise_affine = float(eps), bool(elementwise_affine)
        self._dtype = np.dtype(dtype)
        if self._dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self._dtype}")
        if self.elementwise_affine:
            self.add_param("weight", np.ones(self.normalized_shape, self._dtype))  # γ (F)
            if bias:
                self.add_param("bias", np.zeros(self.normalized_shape, self._dtype))  # β (F)
        self._ctx = None

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(self, x):
        """Compiled (:func:`bptt.kernels.transformer.layer_norm_forward`) when Numba is there, else
        :func:`layer_norm_forward` and the affine step in NumPy."""
        x = as_float_array(x, self._dtype, "input")
        F = self.normalized_shape
        if x.ndim < len(F) or x.shape[x.ndim - len(F):] != F:
            raise ValueError(f"LayerNorm expects input (..., {', '.join(map(str, F))}), got {x.shape}")
        n = int(np.prod(F))
        x2 = x.reshape(-1, n)
        weight, bias = self._own_params.get("weight"), self._own_params.get("bias")
        from bptt import kernels  # lazily: importing Numba is slow

        out = kernels.layer_norm_forward(x2, self.eps, weight, bias)
        if out is not None:
            y, xhat, rstd = out
            cache = LayerNormCache(xhat, rstd)
        else:
            xhat, cache = layer_norm_forward(x2, self.eps)
            y = None
            if weight is not None:
                y = xhat * weight.reshape(-1)
                if bias is not None:
                    y += bias.reshape(-1)
        self._ctx = (cache, x.shape)
        return (xhat if y is None else y).reshape(x.shape)

    def backward(self, dy):
        cache, shape = self._saved(self._ctx)
        n = cache.xhat.shape[1]
        dy2 = as_float_array(dy, self._dtype, "dy").reshape(-1, n)
        weight, dweight, dbias = (self._own_params.get("weight"), self._own_grads.get("weight"),
                                  self._own_grads.get("bias"))
        from bptt import kernels

        dx = kernels.layer_norm_backward(dy2, cache.xhat, cache.rstd, weight, dweight, dbias)
        if dx is None:
            dxhat = dy2
            if weight is not None:
                dweight += np.sum(dy2 * cache.xhat, axis=0).reshape(self.normalized_shape)
                if dbias is not None:
                    dbias += dy2.sum(axis=0).reshape(self.normalized_shape)
                dxhat = dy2 * weight.reshape(-1)
            dx = layer_norm_backward(dxhat, cache)
        return dx.reshape(shape)
