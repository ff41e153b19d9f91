"""Transformer encoder and decoder layers, their stacks, and the full encoder-decoder model.

Constructor arguments, masks, shapes and state-dict keys are PyTorch's (``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``, ``nn.TransformerDecoder``, ``nn.Transformer``),
so ``load_state_dict(torch_model.state_dict())`` works unchanged.

Shape legend: S source positions, T target positions, N batch, E d_model, F dim_feedforward, h heads.
Sequences are (S, N, E) / (T, N, E), or (N, S, E) with ``batch_first``, or unbatched (S, E).

An encoder layer, post-norm (``norm_first=False``, the original paper) and pre-norm::

    post-norm:  x₁ = LN₁(x + SA(x)),          y = LN₂(x₁ + FF(x₁))
    pre-norm:   x₁ = x + SA(LN₁(x)),          y = x₁ + FF(LN₂(x₁))

    SA(z) = dropout₁(MHA(z, z, z, src_mask, src_key_padding_mask))
    FF(z) = dropout₂(linear2(dropout(act(linear1(z)))))

A decoder layer adds cross-attention to the encoder output ``m`` (memory) between the two::

    post-norm:  x₁ = LN₁(x + SA(x)),   x₂ = LN₂(x₁ + CA(x₁, m)),   y = LN₃(x₂ + FF(x₂))
    pre-norm:   x₁ = x + SA(LN₁(x)),   x₂ = x₁ + CA(LN₂(x₁), m),   y = x₂ + FF(LN₃(x₂))

    CA(z, m) = dropout₂(MHA(z, m, m, memory_mask, memory_key_padding_mask))

Backward reads each line upwards.  A residual x₁ = x + f(x) passes its gradient both ways:
∂L/∂x = ∂L/∂x₁ + f'ᵀ ∂L/∂x₁; self-attention sums its three input gradients (query = key = value);
the memory's gradient is the sum over every decoder layer of its cross-attention's dkey + dvalue.
Derivations: ``docs/transformer.md``.

Masks (PyTorch's convention for these modules): bool True = NOT allowed to attend, floats are added.
``src_mask``/``tgt_mask`` (L, L) or (N·h, L, L); ``*_key_padding_mask`` (N, length).  A ``*_is_causal``
flag without a mask builds the causal mask (PyTorch only accepts it as a hint next to the mask).
Dropout runs in training mode with masks from the module's generator; ``eval()`` turns it off.
"""

from __future__ import annotations

import copy

import numpy as np

from bptt.nn import attention_tiles
from bptt.nn.cells import resolve_rng
from bptt.nn.feedforward import PositionwiseFeedForward
from bptt.nn.layers import Dropout
from bptt.nn.module import Module, as_float_array
from bptt.nn.multihead import MultiheadAttention, causal_mask
from bptt.nn.norm import LayerNorm
from bptt.runtime import threads

__all__ = [
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
    "generate_square_subsequent_mask",
]


def generate_square_subsequent_mask(sz: int, dtype=np.float32) -> np.ndarray:
    """``nn.Transformer.generate_square_subsequent_mask``: (sz, sz) float, −∞ above the diagonal, 0 elsewhere."""
    return np.where(causal_mask(sz), -np.inf, 0.0).astype(dtype)


def _check_common(d_model, nhead, dim_feedforward, dropout, dtype):
    for name, v in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
        if int(v) != v or int(v) < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if d_model % nhead:
        raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
    if not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")


class _LayerBase(Module):
    """The parts both layers share: the feed-forward block under PyTorch's names, the norms, the dropouts."""

    def _build(self, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
               bias, dtype, rng, cross):
        """Children in PyTorch's order: self_attn, [multihead_attn], linear1, dropout, linear2, norm1.., dropout1.."""
        _check_common(d_model, nhead, dim_feedforward, dropout, dtype)
        self.d_model, self.nhead = int(d_model), int(nhead)
        self.norm_first, self.batch_first = bool(norm_first), bool(batch_first)
        self._dtype = np.dtype(dtype)
        self.rng = rng
        self._one_blas_thread = False  # set by each forward (_plan_threads)
        mha = dict(dropout=dropout, bias=bias, batch_first=batch_first, dtype=dtype, rng=rng)
        self.self_attn = self.add_module("self_attn", MultiheadAttention(d_model, nhead, **mha))
        if cross:
            self.multihead_attn = self.add_module("multihead_attn", MultiheadAttention(d_model, nhead, **mha))
        # the feed-forward block computes; its children are registered here under PyTorch's names
        self.ff = PositionwiseFeedForward(d_model, dim_feedforward, dropout, activation, bias, dtype, rng)
        self.add_module("linear1", self.ff.linear1)
        self.add_module("dropout", self.ff.dropout)
        self.add_module("linear2", self.ff.linear2)
        self.add_module("activation", self.ff.activation)  # no parameters; a child so that eval() reaches it
        n = 3 if cross else 2
        self.norms = [self.add_module(f"norm{i}", LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype))
                      for i in range(1, n + 1)]
        self.drops = [self.add_module(f"dropout{i}", Dropout(dropout, rng=rng)) for i in range(1, n + 1)]
        for i in range(n):  # PyTorch's attribute names too: layer.norm1, layer.dropout1, ...
            setattr(self, f"norm{i + 1}", self.norms[i])
            setattr(self, f"dropout{i + 1}", self.drops[i])
        self.linear1, self.linear2 = self.ff.linear1, self.ff.linear2
        self.dropout, self.activation = self.ff.dropout, self.ff.activation

    def _plan_threads(self, x, memory=None):
        """Decide, for this forward and its backward, whether the layer holds BLAS to one thread: yes
        when its attention runs in tiles (:func:`bptt.nn.attention_tiles.wanted`), whose threads then
        also run the products in row slices (:func:`bptt.nn.ops.affine_forward`)."""
        self._one_blas_thread = False
        if x.ndim == 3:
            T, N = (x.shape[1], x.shape[0]) if self.batch_first else x.shape[:2]
            S = T if memory is None or memory.ndim != 3 else memory.shape[1 if self.batch_first else 0]
            self._one_blas_thread = attention_tiles.wanted(N * self.nhead, T, max(T, S), x.dtype)
        if self._one_blas_thread:
            threads.keep_freed_memory()  # arrays made in one thread, freed in another: keep them for reuse

    def _threads(self):
        """The BLAS threads :meth:`_plan_threads` chose, as a context for the forward or backward."""
        return threads.single_thread_blas(self._one_blas_thread)

    def _sublayer(self, x, i, f):
        """Residual sub-layer i: x + dropout_i(f(LN_i(x))) (pre-norm) or LN_i(x + dropout_i(f(x))) (post-norm)."""
        if self.norm_first:
            return x + self.drops[i](f(self.norms[i](x)))
        return self.norms[i](x + self.drops[i](f(x)))

    def _sublayer_backward(self, dy, i, f_backward):
        """Backward of :meth:`_sublayer`: the residual carries dy past f, f_backward maps d f(z) → d z."""
        if self.norm_first:
            return dy + self.norms[i].backward(f_backward(self.drops[i].backward(dy)))
        ds = self.norms[i].backward(dy)  # s = x + dropout(f(x))
        return ds + f_backward(self.drops[i].backward(ds))

    def _self_attention(self, z, mask, key_padding_mask, is_causal):
        return self.self_attn(z, z, z, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=False,
                              is_causal=bool(is_causal))[0]

    def _self_attention_backward(self, dout):
        return self.self_attn.backward_self(dout)  # dquery + dkey + dvalue: query = key = value = z


class TransformerEncoderLayer(_LayerBase):
    """``nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048, dropout=0.1, activation='relu',
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True)``.

    Children (state-dict prefixes): ``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``.
    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` → same shape as src;
    ``backward(dout)`` → dsrc.  ``activation``: 'relu' | 'gelu' | 'gelu_tanh' | ReLU() / GELU(approximate).
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu", layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self._build(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
                    bias, dtype, resolve_rng(rng), cross=False)

    def extra_repr(self):
        return f"d_model={self.d_model}, nhead={self.nhead}, norm_first={self.norm_first}"

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = as_float_array(src, self._dtype, "src")
        self._plan_threads(x)
        with self._threads():
            x = self._sublayer(x, 0, lambda z: self._self_attention(z, src_mask, src_key_padding_mask, is_causal))
            return self._sublayer(x, 1, self.ff)

    def backward(self, dout):
        with self._threads():
            dx = self._sublayer_backward(as_float_array(dout, self._dtype, "dout"), 1, self.ff.backward)
            return self._sublayer_backward(dx, 0, self._self_attention_backward)


class TransformerDecoderLayer(_LayerBase):
    """``nn.TransformerDecoderLayer`` (same arguments as the encoder layer).

    Children: ``self_attn``, ``multihead_attn`` (cross-attention), ``linear1``, ``linear2``, ``norm1..3``.
    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)`` → same shape as tgt;
    ``backward(dout)`` → ``(dtgt, dmemory)``.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu", layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self._build(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
                    bias, dtype, resolve_rng(rng), cross=True)

    def extra_repr(self):
        return f"d_model={self.d_model}, nhead={self.nhead}, norm_first={self.norm_first}"

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = as_float_array(tgt, self._dtype, "tgt")
        m = as_float_array(memory, self._dtype, "memory")

        def cross(z):
            return self.multihead_attn(z, m, m, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
                                       need_weights=False, is_causal=bool(memory_is_causal))[0]

        self._plan_threads(x, m)
        with self._threads():
            x = self._sublayer(x, 0, lambda z: self._self_attention(z, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self._sublayer(x, 1, cross)
            return self._sublayer(x, 2, self.ff)

    def backward(self, dout):
        dmemory = []

        def cross_backward(dc):
            dz, dk, dv = self.multihead_attn.backward(dc)
            dmemory.append(dk + dv)  # memory is both key and value
            return dz

        with self._threads():
            dx = self._sublayer_backward(as_float_array(dout, self._dtype, "dout"), 2, self.ff.backward)
            dx = self._sublayer_backward(dx, 1, cross_backward)
            dx = self._sublayer_backward(dx, 0, self._self_attention_backward)
        return dx, dmemory[0]


def _clones(layer: Module, num_layers: int, rng) -> list:
    """num_layers deep copies of ``layer`` (identical weights, as PyTorch's ``_get_clones``); their dropouts
    all draw from the one generator ``rng`` instead of copies of it (copies would repeat the same masks)."""
    out = []
    for _ in range(num_layers):
        clone = copy.deepcopy(layer)
        for m in clone.modules():
            if hasattr(m, "rng"):
                m.rng = rng
        out.append(clone)
    return out


class TransformerEncoder(Module):
    """``nn.TransformerEncoder(encoder_layer, num_layers, norm=None)``: ``layers.0`` … deep copies of
    ``encoder_layer``, then the optional final ``norm`` (a LayerNorm).

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` → output; ``backward(dout)`` → dsrc.
    ``enable_nested_tensor`` and ``mask_check`` are accepted and ignored: they steer PyTorch's inference fast
    path, which (in eval mode without autograd) also returns zeros at padded positions; bptt always computes
    every position, as PyTorch does in training or with gradients enabled.
    """

    def __init__(self, encoder_layer, num_layers, norm=None, enable_nested_tensor=True, mask_check=True):
        super().__init__()
        if int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.num_layers = int(num_layers)
        self.layers = _clones(encoder_layer, self.num_layers, getattr(encoder_layer, "rng", None))
        for i, layer in enumerate(self.layers):
            self.add_module(f"layers.{i}", layer)
        self.norm = self.add_module("norm", norm) if norm is not None else None

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x

    def backward(self, dout):
        dx = self.norm.backward(dout) if self.norm is not None else dout
        for layer in reversed(self.layers):
            dx = layer.backward(dx)
        return dx


class TransformerDecoder(Module):
    """``nn.TransformerDecoder(decoder_layer, num_layers, norm=None)``.

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False)`` → output;
    ``backward(dout)`` → ``(dtgt, dmemory)`` (dmemory summed over the layers).
    """

    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__()
        if int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.num_layers = int(num_layers)
        self.layers = _clones(decoder_layer, self.num_layers, getattr(decoder_layer, "rng", None))
        for i, layer in enumerate(self.layers):
            self.add_module(f"layers.{i}", layer)
        self.norm = self.add_module("norm", norm) if norm is not None else None

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                      memory_is_causal=memory_is_causal)
        return self.norm(x) if self.norm is not None else x

    def backward(self, dout):
        dx = self.norm.backward(dout) if self.norm is not None else dout
        dmemory = 0
        for layer in reversed(self.layers):
            dx, dm = layer.backward(dx)
            dmemory = dmemory + dm
        return dx, dmemory


class Transformer(Module):
    """``nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
    dropout=0.1, activation='relu', custom_encoder=None, custom_decoder=None, layer_norm_eps=1e-5,
    batch_first=False, norm_first=False, bias=True)``: ``encoder`` and ``decoder`` stacks, each with a final
    ``norm``; every matrix re-initialised Xavier-uniform as PyTorch does.

    ``forward(src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
    memory_is_causal=False)`` → output like tgt;  ``backward(dout)`` → ``(dsrc, dtgt)``.
    """

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation="relu", custom_encoder=None, custom_decoder=None, layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        _check_common(d_model, nhead, dim_feedforward, dropout, dtype)
        self.rng = resolve_rng(rng)
        self.d_model, self.nhead, self.batch_first = int(d_model), int(nhead), bool(batch_first)
        args = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                    layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
                    dtype=dtype, rng=self.rng)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(TransformerEncoderLayer(d_model, nhead, **args), num_encoder_layers,
                                              LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype))
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(TransformerDecoderLayer(d_model, nhead, **args), num_decoder_layers,
                                              LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype))
        self.add_module("encoder", self.encoder)
        self.add_module("decoder", self.decoder)
        for _, p, _ in self.named_parameters():  # PyTorch's _reset_parameters: Xavier on every matrix
            if p.ndim > 1:
                bound = np.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                p[...] = self.rng.uniform(-bound, bound, size=p.shape)

    generate_square_subsequent_mask = staticmethod(generate_square_subsequent_mask)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
        s, t = np.asarray(src), np.asarray(tgt)
        if s.ndim != t.ndim or s.ndim not in (2, 3):
            raise ValueError(f"src and tgt must both be 3-D (batched) or 2-D (unbatched), got {s.shape}, {t.shape}")
        b = 0 if self.batch_first else 1
        if s.ndim == 3 and s.shape[b] != t.shape[b]:
            raise ValueError(f"the batch number of src and tgt must be equal, got {s.shape[b]} and {t.shape[b]}")
        if s.shape[-1] != self.d_model or t.shape[-1] != self.d_model:
            raise ValueError(f"the feature number of src and tgt must be equal to d_model ({self.d_model}), "
                             f"got {s.shape[-1]} and {t.shape[-1]}")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    def backward(self, dout):
        dtgt, dmemory = self.decoder.backward(dout)
        return self.encoder.backward(dmemory), dtgt
