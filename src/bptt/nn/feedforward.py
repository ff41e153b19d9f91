"""The Transformer's position-wise pieces: ReLU and GELU, the feed-forward block, positional encodings.

Shape legend: B any leading shape (positions and batch), E model width (d_model),
F feed-forward width (dim_feedforward), T positions, N batch, P max positions.

    relu(x) = max(x, 0)                                     relu'(x) = [x > 0]
    gelu(x) = x Φ(x),  Φ(x) = ½ (1 + erf(x/√2))             gelu'(x) = Φ(x) + x φ(x),  φ(x) = e^{−x²/2}/√(2π)
    gelu_tanh(x) = ½ x (1 + tanh u),  u = √(2/π) (x + 0.044715 x³)
                   gelu_tanh'(x) = ½ (1 + tanh u) + ½ x (1 − tanh² u) √(2/π) (1 + 3·0.044715 x²)

    FFN(x) = dropout(act(x W₁ᵀ + b₁)) W₂ᵀ + b₂             W₁ (F, E), W₂ (E, F)

Positional encodings add a (T, E) table to the embeddings of positions offset … offset+T−1:

    sinusoidal (d2l):  P[i, 2j] = sin(i / 10000^{2j/E}),  P[i, 2j+1] = cos(i / 10000^{2j/E})   (fixed)
    learned:           P = weight (P_max, E), a parameter; ∂L/∂weight[i] += Σ_N ∂L/∂y[i]
"""

from __future__ import annotations

import math

import numpy as np

from bptt.nn.cells import resolve_rng
from bptt.nn.layers import Dropout, Linear
from bptt.nn.module import Module, as_float_array
from bptt.runtime import policy
from bptt.runtime.wavefront import run_row_slices

__all__ = [
    "erf",
    "gelu_reference",
    "ReLU",
    "GELU",
    "get_activation",
    "PositionwiseFeedForward",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEmbedding",
    "sinusoidal_table",
]

_ERF = None


def erf(x: np.ndarray) -> np.ndarray:
    """The error function elementwise (NumPy has none): the C library's erf, compiled with Numba
    (one compilation per process), or ``math.erf`` one element at a time without Numba."""
    global _ERF
    if _ERF is None:
        try:
            import numba

            def _erf_scalar(v):
                return math.erf(v)

            _ERF = numba.vectorize(["float32(float32)", "float64(float64)"])(_erf_scalar)
        except ImportError:  # pragma: no cover - numba is a dependency; slow but exact fallback
            _ERF = np.vectorize(math.erf, otypes=[np.float64])
    return np.asarray(_ERF(x), dtype=x.dtype)


class ReLU(Module):
    """relu(x) = max(x, 0);  backward: dx = dy ⊙ [y > 0], read from the output y (y > 0 ⟺ x > 0).

    Keeps y, not a mask: the next layer (``linear2``) keeps the same array as its input, so the
    backward costs no memory of its own.  As ``torch.relu``, a NaN stays NaN and passes its gradient
    (torch's ``threshold_backward`` zeroes where y ≤ 0).
    ``np.maximum`` rather than ``np.where(x > 0, x, 0)``: a 7,680 × 512 float32 array took 1.1
    against 18 ms (NumPy 2.4, ``where`` with a broadcast 0 runs a slow generic loop)."""

    def __init__(self):
        super().__init__()
        self._ctx = None

    def forward(self, x):
        y = np.empty_like(x)
        n = x.shape[-1] if x.ndim else 1
        x2, y2 = x.reshape(-1, n), y.reshape(-1, n)
        zero = x.dtype.type(0)
        run_row_slices(len(x2), n * policy.ELEMENT_MACS, lambda s: np.maximum(x2[s], zero, out=y2[s]))
        self._ctx = y
        return y

    def backward(self, dy):
        y = self._saved(self._ctx)
        dy = np.asarray(dy)
        if dy.shape != y.shape or dy.ndim == 0:
            return np.where(y <= 0, dy.dtype.type(0), dy)
        from bptt import kernels  # lazily: importing Numba is slow

        dx = np.empty(dy.shape, np.result_type(dy, y))
        n = dy.shape[-1]
        dy2, y2, dx2 = (a.reshape(-1, n) for a in (dy, y, dx))

        def rows(s):
            if kernels.relu_backward(dy2[s], y2[s], dx2[s]) is None:  # no Numba, or mixed dtypes
                np.copyto(dx2[s], np.where(y2[s] <= 0, dy2.dtype.type(0), dy2[s]))

        run_row_slices(len(dx2), n * policy.ELEMENT_MACS, rows)
        return dx


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_reference(x: np.ndarray, approximate: str = "none"):
    """(y, dy/dx) of the GELU with NumPy, in x's dtype:

        exact:  y = x Φ(x),                dy/dx = Φ(x) + x φ(x)
        tanh:   y = ½ x (1 + tanh u),      dy/dx = ½ (1 + tanh u) + ½ x (1 − tanh² u) ∂u/∂x

    The reference of :func:`bptt.kernels.transformer.gelu_forward` (exact form only)."""
    dt = x.dtype.type
    one, half = dt(1), dt(0.5)
    if approximate == "tanh":
        t = np.tanh(dt(_SQRT_2_OVER_PI) * (x + dt(0.044715) * x ** 3))
        du = dt(_SQRT_2_OVER_PI) * (one + dt(3 * 0.044715) * x * x)  # ∂u/∂x
        return half * x * (one + t), half * (one + t) + half * x * (one - t * t) * du
    cdf = half * (one + erf(x * dt(1 / math.sqrt(2.0))))  # Φ(x)
    pdf = np.exp(dt(-0.5) * x * x) * dt(1 / math.sqrt(2.0 * math.pi))  # φ(x)
    return x * cdf, cdf + x * pdf


class GELU(Module):
    """``nn.GELU(approximate='none' | 'tanh')``: x Φ(x) with the exact erf, or the tanh form.

    The forward keeps dy/dx (one array), so the backward is one product: dx = dy ⊙ dy/dx; in eval
    mode (compiled form) it keeps x instead and derives dy/dx only if a backward comes.
    The exact form runs compiled (:func:`bptt.kernels.transformer.gelu_forward`) when Numba is
    there, else :func:`gelu_reference`."""

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self._ctx = None

    def extra_repr(self):
        return f"approximate={self.approximate!r}"

    def forward(self, x):
        out = None
        if self.approximate == "none":
            from bptt import kernels  # lazily: importing Numba is slow

            # in eval mode y alone (the derivative's exponential was half the kernel's time in an evaluation
            # pass), keeping x: a backward in eval mode, which is allowed, derives dy/dx from it then
            out = kernels.gelu_forward(x, need_grad=self.training)
            if out is not None and out[1] is None:
                self._ctx = ("x", x)
                return out[0]
        y, self._ctx = out if out is not None else gelu_reference(x, self.approximate)
        return y

    def _derivative(self):
        """dy/dx of the last forward: kept, or (eval mode) computed now from its input."""
        ctx = self._saved(self._ctx)
        if isinstance(ctx, tuple):
            from bptt import kernels

            x = ctx[1]
            ctx = self._ctx = kernels.gelu_forward(x)[1]
        return ctx

    def backward(self, dy):
        dydx = self._derivative()
        dy = np.asarray(dy)
        if dy.shape != dydx.shape or dy.ndim == 0:
            return dy * dydx
        dx = np.empty(dy.shape, np.result_type(dy, dydx))
        n = dy.shape[-1]
        dy2, d2, dx2 = (a.reshape(-1, n) for a in (dy, dydx, dx))
        run_row_slices(len(dx2), n * policy.ELEMENT_MACS, lambda s: np.multiply(dy2[s], d2[s], out=dx2[s]))
        return dx


def get_activation(activation) -> Module:
    """"relu" | "gelu" (exact) | "gelu_tanh", or a ReLU/GELU module (e.g. GELU('tanh'))."""
    if isinstance(activation, (ReLU, GELU)):
        return activation
    table = {"relu": lambda: ReLU(), "gelu": lambda: GELU("none"), "gelu_tanh": lambda: GELU("tanh")}
    if activation not in table:
        raise ValueError(f"activation must be 'relu', 'gelu', 'gelu_tanh' or a ReLU/GELU module, got {activation!r}")
    return table[activation]()


class PositionwiseFeedForward(Module):
    """FFN(x) = dropout(act(x W₁ᵀ + b₁)) W₂ᵀ + b₂, applied to every position alike.

    x (..., E) → (..., E).  Children ``linear1`` (F, E), ``dropout``, ``linear2`` (E, F): the names
    PyTorch's Transformer layers use (the layers register these same children under their own names).
    """

    def __init__(self, d_model, dim_feedforward, dropout=0.0, activation="relu", bias=True, dtype=np.float32,
                 rng=None):
        super().__init__()
        rng = resolve_rng(rng)
        self.linear1 = self.add_module("linear1", Linear(d_model, dim_feedforward, bias=bias, dtype=dtype, rng=rng))
        self.dropout = self.add_module("dropout", Dropout(dropout, rng=rng))
        self.linear2 = self.add_module("linear2", Linear(dim_feedforward, d_model, bias=bias, dtype=dtype, rng=rng))
        self.activation = self.add_module("activation", get_activation(activation))  # a child: eval() reaches it

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def backward(self, dy):
        return self.linear1.backward(self.activation.backward(self.dropout.backward(self.linear2.backward(dy))))


def sinusoidal_table(P: int, E: int, dtype=np.float64) -> np.ndarray:
    """(P, E): P[i, 2j] = sin(i / 10000^{2j/E}), P[i, 2j+1] = cos(i / 10000^{2j/E}) (d2l's definition;
    an odd E keeps the last sine column and drops its cosine)."""
    i = np.arange(P, dtype=np.float64)[:, None]
    angle = i / np.power(10000.0, np.arange(0, E, 2, dtype=np.float64) / E)  # (P, ⌈E/2⌉)
    table = np.zeros((P, E))
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : E // 2])
    return table.astype(dtype)


class _PositionalBase(Module):
    """x + P[offset : offset+T], then dropout.  x (T, N, E), batch_first (N, T, E), or unbatched (T, E)."""

    def __init__(self, d_model, max_len, dropout, batch_first, dtype, rng):
        super().__init__()
        self.d_model, self.max_len, self.batch_first = int(d_model), int(max_len), bool(batch_first)
        self._dtype = np.dtype(dtype)
        self.drop = self.add_module("dropout", Dropout(dropout, rng=resolve_rng(rng)))
        self._ctx = None

    def _rows(self, x, offset):
        """(T, 1, E) or (1, T, E) or (T, E): the table rows for the positions of x, ready to broadcast."""
        if x.ndim not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input (T, N, {self.d_model}) (or batch-first / unbatched), got {x.shape}")
        T = x.shape[1] if (x.ndim == 3 and self.batch_first) else x.shape[0]
        if offset < 0 or offset + T > self.max_len:
            raise ValueError(f"positions {offset}..{offset + T - 1} exceed max_len {self.max_len}")
        self._ctx = (offset, T, x.ndim)
        return T, (lambda r: r if x.ndim == 2 else (r[None] if self.batch_first else r[:, None]))

    def _time_sum(self, dy, ndim):
        """Σ over the batch axis: (T, E)."""
        if ndim == 2:
            return dy
        return dy.sum(axis=0 if self.batch_first else 1)


class SinusoidalPositionalEncoding(_PositionalBase):
    """d2l's fixed sinusoidal encoding: y = dropout(x + P[offset : offset+T]).  No parameters.

    ``forward(x, offset=0)``; ``backward(dy)`` → dx (the table is constant, so dx = dropout'(dy))."""

    def __init__(self, d_model, max_len=1000, dropout=0.0, batch_first=False, dtype=np.float32, rng=None):
        super().__init__(d_model, max_len, dropout, batch_first, dtype, rng)
        self.table = sinusoidal_table(self.max_len, self.d_model, self._dtype)  # (P, E), not a parameter

    def forward(self, x, offset=0):
        x = as_float_array(x, self._dtype, "input")
        T, place = self._rows(x, int(offset))
        return self.drop(x + place(self.table[offset : offset + T]))

    def backward(self, dy):
        self._saved(self._ctx)
        return self.drop.backward(as_float_array(dy, self._dtype, "dy"))


class LearnedPositionalEmbedding(_PositionalBase):
    """y = dropout(x + weight[offset : offset+T]) with a learned ``weight`` (P, E), init N(0, 0.02²)
    (GPT-2's).  ``backward(dy)`` accumulates ∂L/∂weight and returns dx."""

    def __init__(self, max_len, d_model, dropout=0.0, batch_first=False, dtype=np.float32, rng=None, std=0.02):
        rng = resolve_rng(rng)
        super().__init__(d_model, max_len, dropout, batch_first, dtype, rng)
        self.add_param("weight", (std * rng.standard_normal((self.max_len, self.d_model))).astype(self._dtype))

    def forward(self, x, offset=0):
        x = as_float_array(x, self._dtype, "input")
        T, place = self._rows(x, int(offset))
        return self.drop(x + place(self._own_params["weight"][offset : offset + T]))

    def backward(self, dy):
        offset, T, ndim = self._saved(self._ctx)
        dx = self.drop.backward(as_float_array(dy, self._dtype, "dy"))
        self._own_grads["weight"][offset : offset + T] += self._time_sum(dx, ndim)
        return dx
