"""Linear, Embedding, Dropout: the feed-forward layers around the recurrent ones.

Shape legend: N rows (any leading shape), D input features, K output features, V vocabulary,
E embedding size.  Each forward keeps what its backward needs; each backward accumulates
into ``.grads`` and returns the gradient of its input.
"""

from __future__ import annotations

import numpy as np

from bptt.nn.cells import resolve_rng, uniform_init
from bptt.nn.module import Module, as_float_array
from bptt.nn.ops import affine_backward, affine_forward_then, dropout_mask, embedding_backward, embedding_forward

__all__ = ["Linear", "Embedding", "Dropout"]


class Linear(Module):
    """y = x Wᵀ + b.   x (..., D) → y (..., K);  weight (K, D), bias (K,).

    Initialised U(−1/√D, 1/√D) like PyTorch's default; with D = 0 (allowed, as in PyTorch: the
    output is the bias, or 0) the empty weight needs no init and the bias is 0.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._dtype = np.dtype(dtype)
        rng = resolve_rng(rng)
        k = 1.0 / np.sqrt(self.in_features) if self.in_features else 0.0
        self.add_param("weight", uniform_init(rng, (self.out_features, self.in_features), k, self._dtype))  # (K, D)
        if bias:
            self.add_param("bias", uniform_init(rng, (self.out_features,), k, self._dtype))  # (K,)
        self._ctx = None

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}"

    def forward(self, x):
        return self.forward_then(x, None)[0]

    def forward_then(self, x, then):
        """(y, results): :meth:`forward`, with ``then(rows, y_rows)`` run on each slice of the output's
        rows in the thread that made it (:func:`bptt.nn.ops.affine_forward_then`)."""
        x = as_float_array(x, self._dtype, "input")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects input (..., {self.in_features}), got {x.shape}")
        self._ctx = x
        return affine_forward_then(x, self._own_params["weight"], self._own_params.get("bias"), then)

    def backward(self, dy):
        x = self._saved(self._ctx)
        dy = as_float_array(dy, self._dtype, "dy")
        return affine_backward(dy, x, self._own_params["weight"], self._own_grads["weight"], self._own_grads.get("bias"))


class Embedding(Module):
    """y = W[ids].   ids (...) integers in [0, V) → y (..., E);  weight (V, E), init N(0, 1)."""

    def __init__(self, num_embeddings, embedding_dim, dtype=np.float32, rng=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self._dtype = np.dtype(dtype)
        rng = resolve_rng(rng)
        self.add_param("weight", rng.standard_normal((self.num_embeddings, self.embedding_dim)).astype(self._dtype))
        self._ctx = None

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, ids):
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Embedding expects integer ids, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise ValueError(f"Embedding ids must be in [0, {self.num_embeddings}), got [{ids.min()}, {ids.max()}]")
        self._ctx = ids
        return embedding_forward(ids, self._own_params["weight"])

    def backward(self, dy):
        """Accumulates ∂L/∂W; ids have no gradient, so this returns None."""
        ids = self._saved(self._ctx)
        embedding_backward(as_float_array(dy, self._dtype, "dy"), ids, self._own_grads["weight"])
        return None


class Dropout(Module):
    """Inverted dropout: in training y = x ⊙ mask / (1 − p), mask ~ Bernoulli(1 − p); identity in eval."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = resolve_rng(rng)
        self._mask = None

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        self._mask = dropout_mask(x.shape, self.p, self.rng, x.dtype)
        return x * self._mask

    def backward(self, dy):
        return dy if self._mask is None else dy * self._mask


# ============================================================================ recurrent layers
