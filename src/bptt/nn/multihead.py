"""Scaled dot-product attention and multi-head attention, forward and backward side by side.

Shape legend: N batch, L target (query) positions, S source (key/value) positions,
E embed_dim, h heads, d = E/h head width, Dk kdim, Dv vdim (key and value input widths),
B any leading batch shape.

Scaled dot-product attention (one head, or a stack of heads in B)::

    s = q kᵀ · scale + m            q (B, L, d), k (B, S, d), m additive mask (…, L, S)   (B, L, S)
    a = softmax_S(s)                 attention weights                                      (B, L, S)
    ã = a ⊙ r / (1 − p)             dropout on the weights (training only)                  (B, L, S)
    o = ã v                          v (B, S, dv)                                            (B, L, dv)

and backward, the same read upwards::

    ∂L/∂ã = ∂L/∂o vᵀ,   ∂L/∂v = ãᵀ ∂L/∂o,   ∂L/∂a = ∂L/∂ã ⊙ r / (1 − p)
    ∂L/∂s = a ⊙ (∂L/∂a − Σ_S a ⊙ ∂L/∂a)          (0 wherever a = 0, so masked slots get nothing)
    ∂L/∂q = ∂L/∂s k · scale,   ∂L/∂k = ∂L/∂sᵀ q · scale

Multi-head attention projects, splits the features into h heads of width d, attends per
head, merges and projects again::

    Q = query W_qᵀ + b_q,  K = key W_kᵀ + b_k,  V = value W_vᵀ + b_v        (N, L|S, E)
    Q, K, V → (N, h, L|S, d)                      head j owns features [j·d, (j+1)·d)
    O = sdpa(Q, K, V, m) with scale 1/√d       → (N, L, E) merged
    out = O W_oᵀ + b_o                                                          (N, L, E)

Derivations: ``docs/transformer.md``.

Masks follow PyTorch, and the two functions differ (as PyTorch's do):

* :func:`scaled_dot_product_attention` (like ``F.scaled_dot_product_attention``): a bool
  ``attn_mask`` is True where a query MAY attend; a float mask is added to the scores.
* :class:`MultiheadAttention` (like ``nn.MultiheadAttention``): a bool ``attn_mask`` or
  ``key_padding_mask`` is True where attention is NOT allowed; float masks are added.

A query row whose every key is masked out: PyTorch 2.13 returns zeros for that row from
``F.scaled_dot_product_attention`` (and so from ``nn.MultiheadAttention`` with
``need_weights=False``, the path the Transformer layers take), but NaN output and NaN
weights from ``nn.MultiheadAttention`` with ``need_weights=True`` (a plain softmax of
−∞'s).  bptt does the same in each case (tested against torch).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn import attention_tiles
from bptt.nn.cells import resolve_rng
from bptt.nn.layers import Linear
from bptt.nn.module import Module, as_float_array
from bptt.nn.ops import affine_backward, affine_forward, dropout_mask

__all__ = [
    "SDPACache",
    "softmax_rows",
    "softmax_rows_backward",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "causal_mask",
    "MultiheadAttention",
]


def causal_mask(L: int, S: int | None = None) -> np.ndarray:
    """(L, S) bool, True ABOVE the diagonal: query i may not see key j > i.

    This is the ``nn.MultiheadAttention`` convention (True = masked out), the boolean form of
    ``nn.Transformer.generate_square_subsequent_mask`` (whose −∞ sit at the same places).
    """
    S = L if S is None else S
    return np.triu(np.ones((L, S), dtype=bool), k=1)


def softmax_rows(s: np.ndarray, scale=1.0, causal: bool = False, dead_rows_nan: bool = False) -> np.ndarray:
    """a = softmax over the last axis of scale · s, computed in place in s (…, L, S); the NumPy
    reference of :func:`bptt.kernels.transformer.softmax_rows`.

    ``causal``: row i sees keys j ≤ i only (the others are set to −∞ first, so get weight 0).
    Scores may hold −∞ (masked slots).  A row of only −∞ has no softmax: it becomes zeros
    (PyTorch's scaled_dot_product_attention) or, with ``dead_rows_nan``, NaN (a plain softmax,
    as in nn.MultiheadAttention with need_weights=True)."""
    if scale != 1.0:
        s *= s.dtype.type(scale)
    if causal:
        s[..., causal_mask(*s.shape[-2:])] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    dead = np.isneginf(m)  # (…, L, 1) rows with every key masked out
    any_dead = bool(dead.any())
    if any_dead and not dead_rows_nan:
        m = np.where(dead, 0.0, m)  # exp(−∞ − 0) = 0: the row sums to 0 ...
    with np.errstate(invalid="ignore"):  # the NaN of a dead row is wanted here
        s -= m  # NaN for a dead row when m = −∞ (−∞ − (−∞))
        np.exp(s, out=s)  # in place: no (…, L, S) temporaries
    z = s.sum(axis=-1, keepdims=True)
    if any_dead and not dead_rows_nan:
        z = np.where(dead, 1.0, z)  # ... and 0 / 1 = 0
    s /= z
    return s


def softmax_rows_backward(a: np.ndarray, da: np.ndarray, scale=1.0, causal: bool = False) -> np.ndarray:
    """∂L/∂a → ∂L/∂s for a = softmax(scale · s), computed in place in da (…, L, S):

        ∂L/∂s = scale · a ⊙ (∂L/∂a − Σ_S a ⊙ ∂L/∂a)      (0 wherever a = 0, so masked slots get nothing)

    The NumPy reference of :func:`bptt.kernels.transformer.softmax_rows_backward`; ``causal`` changes
    nothing here (a is 0 above the diagonal already) and is taken for the kernel's signature."""
    row = np.einsum("...ls,...ls->...l", a, da)[..., None]  # Σ_S a ⊙ da without an (…, L, S) temporary
    da -= row
    da *= a
    if scale != 1.0:
        da *= da.dtype.type(scale)
    return da


def _softmax(s, scale, causal, dead_rows_nan):
    """softmax_rows, compiled when Numba is there (bptt.kernels.transformer), else the NumPy reference."""
    from bptt import kernels  # lazily: importing Numba is slow

    a = kernels.softmax_rows(s, scale, causal, dead_rows_nan)
    return a if a is not None else softmax_rows(s, scale, causal, dead_rows_nan)


def _softmax_backward(a, da, scale, causal):
    from bptt import kernels

    ds = kernels.softmax_rows_backward(a, da, scale, causal)
    return ds if ds is not None else softmax_rows_backward(a, da, scale, causal)


class SDPACache(NamedTuple):
    q: np.ndarray  # (B, L, d)
    k: np.ndarray  # (B, S, d)
    v: np.ndarray  # (B, S, dv)
    weights: np.ndarray  # (B, L, S) a = softmax(s), before dropout
    drop: np.ndarray | None  # (B, L, S) dropout mask r / (1 − p), or None
    scale: float
    causal: bool  # the mask was the causal one alone (applied inside the softmax, not as a bias)


def _additive(mask, dtype, name: str, true_means_masked: bool) -> np.ndarray:
    """A bool or float mask as the float added to the scores (0 or −∞ for a bool mask)."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        blocked = arr if true_means_masked else ~arr
        return np.where(blocked, -np.inf, 0.0).astype(dtype)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be a bool or floating-point array, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _is_causal_bias(bias: np.ndarray) -> bool:
    """Whether an additive (L, S) mask is exactly the causal one: −∞ above the diagonal, 0 elsewhere."""
    if bias.ndim != 2:
        return False
    above = causal_mask(*bias.shape)
    return bool(np.isneginf(bias[above]).all() and (bias[~above] == 0).all())


def _attend(q, k, v, bias, causal, scale, p, training, rng, nan_if_all_masked, out=None):
    """The shared core: o = dropout(softmax(q kᵀ·scale + bias)) v  → (o, SDPACache).

    ``causal`` (with bias None): the causal mask, applied inside the softmax.  ``out``: an array
    (B, L, dv), possibly a strided view (the heads' slots of a merged (…, E) array), for o.
    Large problems run in tiles that stay in cache (:mod:`bptt.nn.attention_tiles`): the same numbers."""
    scores = q.shape[:-1] + k.shape[-2:-1]  # (B, L, S)
    if attention_tiles.usable(q, k, v) and (bias is None or np.broadcast_shapes(scores, bias.shape) == scores):
        drop = dropout_mask(scores, p, rng, q.dtype) if training and p > 0.0 else None  # r / (1 − p)
        o = np.empty(q.shape[:-1] + v.shape[-1:], q.dtype) if out is None else out
        causal = bool(causal and bias is None)
        a = attention_tiles.attend_tiled(q, k, v, bias, causal, scale, drop, nan_if_all_masked, _softmax, o)
        return o, SDPACache(q, k, v, a, drop, scale, causal)
    s = np.matmul(q, np.swapaxes(k, -1, -2))  # (B, L, S)
    if bias is not None:
        s *= s.dtype.type(scale)
        if np.broadcast_shapes(s.shape, bias.shape) == s.shape:
            s += bias  # in place: s is ours
        else:
            s = s + bias  # (a mask may widen an unbatched call's scores)
        a = _softmax(s, 1.0, False, nan_if_all_masked)
    else:
        a = _softmax(s, scale, causal, nan_if_all_masked)  # the scale (and a causal mask) inside the softmax
    drop = None
    if training and p > 0.0:
        drop = dropout_mask(a.shape, p, rng, a.dtype)  # r / (1 − p)
    o = np.matmul(a if drop is None else a * drop, v, out=out)  # (B, L, dv)
    return o, SDPACache(q, k, v, a, drop, scale, bool(causal and bias is None))


def _attend_backward(do, cache: SDPACache, dweights=None, out=(None, None, None)):
    """Backward of :func:`_attend`: ∂L/∂o (and optionally ∂L/∂ã, the dropped weights) → dq, dk, dv,
    written into ``out`` (three arrays or views shaped as q, k, v) where given."""
    q, k, v, a, drop = cache.q, cache.k, cache.v, cache.weights, cache.drop
    if attention_tiles.usable(q, k, v) and a.shape == q.shape[:-1] + k.shape[-2:-1]:
        grads = tuple(np.empty(x.shape, x.dtype) if o is None else o for x, o in zip((q, k, v), out))
        attention_tiles.attend_tiled_backward(do, q, k, v, a, drop, dweights, cache.scale, cache.causal,
                                              _softmax_backward, grads)
        return grads
    at = a if drop is None else a * drop  # ã
    dv = np.matmul(np.swapaxes(at, -1, -2), do, out=out[2])  # ãᵀ do  (B, S, dv)
    da = np.matmul(do, np.swapaxes(v, -1, -2))  # do vᵀ = ∂L/∂ã  (B, L, S), a fresh array
    if dweights is not None:
        da += dweights
    if drop is not None:
        da *= drop
    ds = _softmax_backward(a, da, cache.scale, cache.causal)  # in place in da
    dq = np.matmul(ds, k, out=out[0])  # (B, L, d)
    dk = np.matmul(np.swapaxes(ds, -1, -2), q, out=out[1])  # (B, S, d)
    return dq, dk, dv


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 rng=None):
    """``F.scaled_dot_product_attention`` with the cache for its backward.

    query (B, L, d), key (B, S, d), value (B, S, dv), any equal leading shape B (e.g. (N, h)).
    attn_mask: broadcastable to (B, L, S); bool True = MAY attend (PyTorch's sdpa convention),
    or float added to the scores.  ``is_causal``: query i sees keys j ≤ i (top-left aligned);
    cannot be combined with ``attn_mask``.  ``scale`` defaults to 1/√d.  ``dropout_p`` > 0 drops
    weights with masks from ``rng``.  A row with every key masked out gives zeros.

    Returns ``(output (B, L, dv), cache)``; ``cache.weights`` are the attention weights.
    """
    q = as_float_array(query, np.result_type(np.asarray(query).dtype, np.float32), "query")
    dtype = q.dtype
    k, v = as_float_array(key, dtype, "key"), as_float_array(value, dtype, "value")
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"query, key, value must have the same number (>= 2) of dims, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"need query (…, L, d), key (…, S, d), value (…, S, dv); got {q.shape}, {k.shape}, {v.shape}")
    L, S = q.shape[-2], k.shape[-2]
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal, not both")
    bias = None
    if attn_mask is not None:
        bias = _additive(attn_mask, dtype, "attn_mask", true_means_masked=False)
        want = q.shape[:-2] + (L, S)
        try:
            fits = np.broadcast_shapes(bias.shape, want) == want  # broadcasts to the scores, not beyond them
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"attn_mask of shape {bias.shape} does not broadcast to {want}")
    sc = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attend(q, k, v, bias, bool(is_causal), sc, float(dropout_p), dropout_p > 0, resolve_rng(rng), False)


def scaled_dot_product_attention_backward(doutput, cache: SDPACache):
    """∂L/∂output (B, L, dv) → (dquery, dkey, dvalue) with the shapes of the inputs."""
    return _attend_backward(np.asarray(doutput, cache.q.dtype), cache)


# ============================================================================ multi-head attention


def _xavier(rng, shape, dtype):
    """PyTorch's xavier_uniform_: U(±√(6 / (fan_in + fan_out))) for a (fan_out, fan_in) weight."""
    bound = np.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _split_heads(x, batch_first: bool, h: int):
    """(N, T, h·w) if batch_first else (T, N, h·w) → (N, h, T, w) as a view (no copy): head j owns
    features [j·w, (j+1)·w) of every position.  Written through, it fills x (merging the heads)."""
    A, B, W = x.shape
    v = x.reshape(A, B, h, W // h)  # splitting the last axis, whose elements are adjacent, never copies
    assert np.may_share_memory(v, x), "head split must be a view"
    return v.transpose(0, 2, 1, 3) if batch_first else v.transpose(1, 2, 0, 3)


class _MHACache(NamedTuple):
    query: np.ndarray  # (N, L, E) or (L, N, E): the inputs in their own layout, as given to the projections
    key: np.ndarray  # (N, S, Dk) or (S, N, Dk)
    value: np.ndarray  # (N, S, Dv) or (S, N, Dv)
    attn: SDPACache  # per head: q, k, v (N, h, ·, d) views, weights (N, h, L, S)
    layout: tuple  # (batched, batch_first, need_weights, average_attn_weights, fused)


class MultiheadAttention(Module):
    """``nn.MultiheadAttention`` with a hand-written backward.

    Parameters (PyTorch's names): ``in_proj_weight`` (3E, E) packed [W_q; W_k; W_v] when
    kdim = vdim = E, else ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, Dk),
    ``v_proj_weight`` (E, Dv); ``in_proj_bias`` (3E,) [b_q; b_k; b_v] when ``bias``;
    ``out_proj.weight`` (E, E), ``out_proj.bias`` (E,).  Init as PyTorch: Xavier-uniform
    input projections, zero biases, out_proj U(±1/√E).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` → ``(output, weights or None)``:

        query (L, N, E), key (S, N, Dk), value (S, N, Dv); batch_first: (N, L, E)…; unbatched (L, E)…
        key_padding_mask (N, S) [unbatched (S,)]: bool True = that key is padding, or float added
        attn_mask (L, S) or (N·h, L, S) [unbatched (h, L, S)]: bool True = not allowed, or float added
        is_causal: query i sees keys j ≤ i.  PyTorch treats it as a hint and requires the causal
            ``attn_mask`` too; here, without ``attn_mask`` the causal mask is built, and with one the
            given mask is used (as PyTorch does).
        output like query;  weights (N, L, S) averaged over heads, or (N, h, L, S); after dropout
            (as PyTorch returns them); None unless need_weights.

    ``backward(doutput, dweights=None)`` → ``(dquery, dkey, dvalue)`` in the inputs' layouts.
    For self-attention (the same array passed as query, key and value) the gradient of that
    array is ``dquery + dkey + dvalue``: ``backward_self(doutput, dweights=None)`` returns it, with
    one product for the three projections (the forward, too, makes Q, K, V in one product then).

    Not offered: PyTorch's ``add_bias_kv`` and ``add_zero_attn`` (extra key/value rows).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False, kdim=None, vdim=None,
                 dtype=np.float32, rng=None):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if int(val) != val or int(val) < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self.packed = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.dropout, self.batch_first, self.bias = float(dropout), bool(batch_first), bool(bias)
        self._dtype = np.dtype(dtype)
        if self._dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self._dtype}")
        self.rng = resolve_rng(rng)
        E = self.embed_dim
        if self.packed:
            self.add_param("in_proj_weight", _xavier(self.rng, (3 * E, E), self._dtype))  # (3E, E)
        else:
            self.add_param("q_proj_weight", _xavier(self.rng, (E, E), self._dtype))  # (E, E)
            self.add_param("k_proj_weight", _xavier(self.rng, (E, self.kdim), self._dtype))  # (E, Dk)
            self.add_param("v_proj_weight", _xavier(self.rng, (E, self.vdim), self._dtype))  # (E, Dv)
        if self.bias:
            self.add_param("in_proj_bias", np.zeros(3 * E, self._dtype))  # (3E,)
        self.out_proj = self.add_module("out_proj", Linear(E, E, bias=self.bias, dtype=self._dtype, rng=self.rng))
        if self.bias:
            self.out_proj.params["bias"][...] = 0.0
        self._ctx = None

    def extra_repr(self):
        extra = "" if self.packed else f", kdim={self.kdim}, vdim={self.vdim}"
        return f"{self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}{extra}"

    # ------------------------------------------------------------------ helpers
    def _projection(self, i):
        """(weight, bias, weight grad, bias grad) of projection i = 0 (q), 1 (k), 2 (v): views
        into the packed arrays, so the grads accumulate in place."""
        E, P, G = self.embed_dim, self._own_params, self._own_grads
        if self.packed:
            W, dW = P["in_proj_weight"][i * E:(i + 1) * E], G["in_proj_weight"][i * E:(i + 1) * E]
        else:
            name = ("q_proj_weight", "k_proj_weight", "v_proj_weight")[i]
            W, dW = P[name], G[name]
        if not self.bias:
            return W, None, dW, None
        return W, P["in_proj_bias"][i * E:(i + 1) * E], dW, G["in_proj_bias"][i * E:(i + 1) * E]

    def _mask_bias(self, attn_mask, key_padding_mask, is_causal, N, L, S, batched):
        """(bias, causal): the additive mask (…, L, S) broadcastable to (N, h, L, S), attn_mask + key
        padding, or None with causal True when the only mask is the causal one (built for is_causal
        or given as attn_mask), which the softmax then applies itself."""
        h, dt = self.num_heads, self._dtype
        bias = None
        if attn_mask is None and is_causal:
            attn_mask = causal_mask(L, S)
        if attn_mask is not None:
            m = _additive(attn_mask, dt, "attn_mask", true_means_masked=True)
            if m.shape == (L, S):
                bias = m  # broadcast over batch and heads
            elif batched and m.shape == (N * h, L, S):
                bias = m.reshape(N, h, L, S)  # row n·h + j is batch item n, head j
            elif not batched and m.shape == (h, L, S):
                bias = m[None]
            else:
                want = f"({L}, {S}) or ({N * h}, {L}, {S})" if batched else f"({L}, {S}) or ({h}, {L}, {S})"
                raise ValueError(f"attn_mask must have shape {want}, got {m.shape}")
        if key_padding_mask is not None:
            kp = _additive(key_padding_mask, dt, "key_padding_mask", true_means_masked=True)
            want = (N, S) if batched else (S,)
            if kp.shape != want:
                raise ValueError(f"key_padding_mask must have shape {want} (batch, source length), got {kp.shape}")
            kp = kp.reshape(N, 1, 1, S)
            bias = kp if bias is None else bias + kp
        elif bias is not None and _is_causal_bias(bias):
            return None, True
        return bias, False

    # ------------------------------------------------------------------ forward / backward
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        dt, E, h, d = self._dtype, self.embed_dim, self.num_heads, self.head_dim
        fused = self.packed and query is key and key is value  # self-attention: Q, K, V from one product
        q_in, k_in, v_in = (as_float_array(x, dt, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
        batched = q_in.ndim == 3
        if q_in.ndim not in (2, 3) or k_in.ndim != q_in.ndim or v_in.ndim != q_in.ndim:
            raise ValueError("query, key and value must all be 3-D (batched) or all 2-D (unbatched), "
                             f"got {q_in.shape}, {k_in.shape}, {v_in.shape}")
        if not batched:
            q_in, k_in, v_in = q_in[:, None], k_in[:, None], v_in[:, None]  # (L, 1, E): sequence-first, N = 1
        bf = batched and self.batch_first  # the projections run on the layout given: no transposed copies
        n_ax, t_ax = (0, 1) if bf else (1, 0)
        N, L, S = q_in.shape[n_ax], q_in.shape[t_ax], k_in.shape[t_ax]
        if q_in.shape[2] != E or k_in.shape[2] != self.kdim or v_in.shape[2] != self.vdim:
            raise ValueError(f"expected query/key/value features {E}/{self.kdim}/{self.vdim}, "
                             f"got {q_in.shape[2]}/{k_in.shape[2]}/{v_in.shape[2]}")
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[n_ax] != N:
            raise ValueError(f"key and value must share batch and source length (and the query's batch), "
                             f"got {k_in.shape}, {v_in.shape}, query batch {N}")
        bias, causal = self._mask_bias(attn_mask, key_padding_mask, is_causal, N, L, S, batched)

        if fused:  # [Q K V] = x [W_q; W_k; W_v]ᵀ + b: (…, 3E) in one product
            P = self._own_params
            qkv = affine_forward(q_in, P["in_proj_weight"], P.get("in_proj_bias"))
            Q, K, V = (_split_heads(qkv[..., i * E:(i + 1) * E], bf, h) for i in range(3))
        else:
            Q, K, V = (_split_heads(affine_forward(x, *self._projection(i)[:2]), bf, h)
                       for i, x in enumerate((q_in, k_in, v_in)))
        merged = np.empty(q_in.shape[:2] + (E,), dt)  # the heads' outputs side by side, in the query's layout
        _, att = _attend(Q, K, V, bias, causal, 1.0 / np.sqrt(d), self.dropout, self.training, self.rng,
                         nan_if_all_masked=bool(need_weights), out=_split_heads(merged, bf, h))
        out = self.out_proj(merged)
        self._ctx = _MHACache(q_in, k_in, v_in, att, (batched, bf, bool(need_weights), bool(average_attn_weights),
                                                      fused))
        weights = None
        if need_weights:
            weights = att.weights if att.drop is None else att.weights * att.drop  # (N, h, L, S)
            if average_attn_weights:
                weights = weights.mean(axis=1)
            if not batched:
                weights = weights[0]
        return (out if batched else out[:, 0]), weights

    def _backward_heads(self, doutput, dweights):
        """Through the output projection and the attention: (context, the gradients of the projected
        Q, K, V in the inputs' layouts — one (…, 3E) array when the forward fused them, else three)."""
        ctx = self._saved(self._ctx)
        batched, bf, need_weights, average, fused = ctx.layout
        dt, E, h = self._dtype, self.embed_dim, self.num_heads
        dout = as_float_array(doutput, dt, "doutput")
        dO = self.out_proj.backward(dout if batched else dout[:, None])  # (…, E) in the query's layout
        dA = None
        if dweights is not None:
            if not need_weights:
                raise ValueError("dweights given but forward ran with need_weights=False")
            dA = as_float_array(dweights, dt, "dweights")
            if not batched:
                dA = dA[None]
            dA = np.broadcast_to(dA[:, None] / h, ctx.attn.weights.shape) if average else dA  # mean over heads
        if fused:
            dQKV = np.empty(ctx.query.shape[:2] + (3 * E,), dt)
            grads = dQKV
            outs = tuple(_split_heads(dQKV[..., i * E:(i + 1) * E], bf, h) for i in range(3))
        else:
            grads = tuple(np.empty(x.shape[:2] + (E,), dt) for x in (ctx.query, ctx.key, ctx.value))
            outs = tuple(_split_heads(g, bf, h) for g in grads)
        _attend_backward(_split_heads(dO, bf, h), ctx.attn, dA, out=outs)  # writes into grads
        return ctx, grads

    def backward(self, doutput, dweights=None):
        """∂L/∂output (and optionally ∂L/∂weights, shaped as returned) → (dquery, dkey, dvalue)."""
        ctx, grads = self._backward_heads(doutput, dweights)
        batched, fused, E = ctx.layout[0], ctx.layout[4], self.embed_dim
        if fused:
            grads = tuple(grads[..., i * E:(i + 1) * E] for i in range(3))
        out = []
        for i, (dH, x) in enumerate(zip(grads, (ctx.query, ctx.key, ctx.value))):
            W, _, dW, db = self._projection(i)
            dx = affine_backward(dH, x, W, dW, db)
            out.append(dx if batched else dx[:, 0])
        return tuple(out)

    def backward_self(self, doutput, dweights=None):
        """Self-attention, one array x given as query, key and value: ∂L/∂output → ∂L/∂x = dquery +
        dkey + dvalue.  When the forward fused the three projections (packed weights, the same
        array object passed three times) this is one product, dx = [dQ dK dV] [W_q; W_k; W_v]."""
        ctx, grads = self._backward_heads(doutput, dweights)
        batched, fused = ctx.layout[0], ctx.layout[4]
        if fused:
            P, G = self._own_params, self._own_grads
            dx = affine_backward(grads, ctx.query, P["in_proj_weight"], G["in_proj_weight"], G.get("in_proj_bias"))
        else:
            dx = 0
            for i, (dH, x) in enumerate(zip(grads, (ctx.query, ctx.key, ctx.value))):
                W, _, dW, db = self._projection(i)
                dx = dx + affine_backward(dH, x, W, dW, db)
        return dx if batched else dx[:, 0]
