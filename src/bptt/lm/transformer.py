"""A decoder-only (GPT-style) character language model on the Transformer layers of :mod:`bptt.nn`.

Shape legend: T positions in a window (T ≤ C), N batch streams, V vocabulary, E d_model,
h heads, d = E/h, F = 4E feed-forward width, L layers, C context (the most positions it sees).

Forward, for ids x (T, N)::

    e  = dropout(W_tok[x] + W_pos[0:T])                          (T, N, E)
    for each of the L blocks (pre-norm, causal: position t sees positions ≤ t):
        e = e + dropout(MHA(LN₁(e)))                             self-attention
        e = e + dropout(W₂ GELU(W₁ LN₂(e)))                       feed-forward
    z  = LN_f(e) W_decᵀ + b_dec                                  (T, N, V)   logits
    loss = −mean log softmax(z)[y]                               nats per character

Backward reads it upwards through the layers' own backward passes (``docs/transformer.md``).
Each window is independent: there is no state carried between windows, so ``state`` is
accepted and returned as None, which keeps the interface of :class:`bptt.lm.model.CharLM`.

Parameter names are those of a PyTorch model built as::

    embed   = nn.Embedding(V, E)                    embed.weight
    pos     = nn.Embedding(C, E)                    pos.weight
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, h, 4E, dropout, "gelu",
                                    norm_first=True), L, norm=nn.LayerNorm(E))
    decoder = nn.Linear(E, V)

run with ``mask=causal`` (a decoder-only model is an encoder stack with a causal mask).

Generation, :meth:`TransformerLM.step`, keeps each layer's keys and values of the positions
seen so far (a key/value cache), so one new token costs one position, not a whole window.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from bptt.config import DictConfig
from bptt.nn import attention_tiles
from bptt.nn.cells import resolve_rng
from bptt.nn.feedforward import LearnedPositionalEmbedding
from bptt.nn.layers import Embedding, Linear
from bptt.nn.losses import cross_entropy, softmax
from bptt.nn.module import Module
from bptt.nn.norm import LayerNorm
from bptt.nn.transformer import TransformerEncoder, TransformerEncoderLayer
from bptt.runtime.threads import single_thread_blas

__all__ = ["TransformerLMConfig", "TransformerLM"]


@dataclass
class TransformerLMConfig(DictConfig):
    """Everything needed to rebuild a TransformerLM (saved in every checkpoint)."""

    vocab_size: int
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    context: int = 128  # the most positions a window (and generation before a reset) may have
    dropout: float = 0.0  # on the embeddings, the attention weights and every residual branch
    dtype: str = "float32"
    model: str = "transformer"  # tells a checkpoint's config apart from a CharLMConfig (model lstm|gru|rnn)

    def validate(self) -> TransformerLMConfig:
        problems = []
        for name in ("vocab_size", "layers", "d_model", "heads", "context"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if not problems and self.d_model % self.heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.model != "transformer":
            problems.append(f"model must be 'transformer', got {self.model!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def from_dict(cls, d: dict) -> TransformerLMConfig:
        return super().from_dict(d).validate()


def _affine(linear, x):
    """x Wᵀ + b of a Linear for one generation step (N, ·): the product alone, without the layer's
    checks, saved input and row threads, which cost more than a (1, 128) × (128, 512) product
    (a 4 × 128 model's step: 590 against 435 µs a character with the attention's matmuls below)."""
    W, b = linear.params["weight"], linear.params.get("bias")
    y = x @ W.T
    return y + b if b is not None else y


class TransformerLM(Module):
    """GPT-style character model with the interface of :class:`bptt.lm.model.CharLM`.

    ``forward(ids (T, N), state=None)`` → ``(logits (T, N, V), None)``;
    ``loss(ids, targets, state=None)`` → ``(loss, None)`` and saves ∂L/∂logits;
    ``backward(dlogits=None)`` pushes the gradient into every parameter;
    ``step(ids (N,))`` → logits (N, V), one position at a time with a key/value cache,
    until ``reset_state()``.  T and the generated positions are limited to ``config.context``.

    Init (GPT-2's): weights and embeddings N(0, 0.02²), the two residual output projections
    of each block N(0, (0.02/√(2L))²), biases 0, LayerNorms γ = 1, β = 0.
    """

    def __init__(self, config: TransformerLMConfig, rng=None):
        super().__init__()
        self.config = config.validate()
        c = config
        dtype = np.dtype(c.dtype)
        self.rng = resolve_rng(rng)  # one generator for init and every dropout mask (saved for resume)
        E = c.d_model
        self.embed = self.add_module("embed", Embedding(c.vocab_size, E, dtype=dtype, rng=self.rng))
        self.pos = self.add_module("pos", LearnedPositionalEmbedding(c.context, E, dropout=c.dropout, dtype=dtype,
                                                                     rng=self.rng))
        block = TransformerEncoderLayer(E, c.heads, 4 * E, dropout=c.dropout, activation="gelu", norm_first=True,
                                        dtype=dtype, rng=self.rng)
        self.encoder = self.add_module("encoder", TransformerEncoder(block, c.layers, norm=LayerNorm(E, dtype=dtype)))
        self.decoder = self.add_module("decoder", Linear(E, c.vocab_size, dtype=dtype, rng=self.rng))
        for name, p, _ in self.named_parameters():
            if ".norm" in name:  # LayerNorms keep γ = 1, β = 0
                continue
            if name.endswith("bias"):
                p[...] = 0.0
            else:
                residual = name.endswith("out_proj.weight") or name.endswith("linear2.weight")
                p[...] = (0.02 / np.sqrt(2 * c.layers) if residual else 0.02) * self.rng.standard_normal(p.shape)
        self._cache = None  # step(): keys and values (L, N, h, C, d), the next position, the stacked weights
        self._one_blas_thread = False  # set by each forward: see _threads

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def extra_repr(self):
        c = self.config
        return f"transformer {c.layers}x{c.d_model}, heads={c.heads}, context={c.context}, V={c.vocab_size}, " \
               f"dropout={c.dropout}"

    def blas_scope(self, T, N):
        """Nothing to arrange: the products run on the BLAS's own threads."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ training
    def _check_ids(self, ids, ndim):
        ids = np.asarray(ids)
        if ids.ndim != ndim or not np.issubdtype(ids.dtype, np.integer):
            want = "(T, N)" if ndim == 2 else "(N,)"
            raise ValueError(f"TransformerLM expects integer ids of shape {want}, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return ids

    def forward(self, ids, state=None):
        """ids (T, N) integers in [0, V) → (logits (T, N, V), None).  ``state`` is ignored (windows are independent)."""
        ids = self._check_ids(ids, 2)
        if ids.shape[0] > self.config.context:
            raise ValueError(f"a window of {ids.shape[0]} positions exceeds the model's context of {self.config.context}")
        T, N = ids.shape
        self._one_blas_thread = attention_tiles.wanted(N * self.config.heads, T, T, self.dtype)
        with self._threads():
            e = self.pos(self.embed(ids))  # token + position embeddings, dropout
            h = self.encoder(e, is_causal=True)  # position t attends to positions ≤ t; ends in the final LayerNorm
            return self.decoder(h), None

    def _threads(self):
        """BLAS held to one thread for this forward and its backward when the layers' attention runs in
        tiles (they then hold it themselves, :class:`bptt.nn.transformer.TransformerEncoderLayer`): the
        decoder's product too, so that no two-thread product leaves an OpenBLAS thread spinning for the
        next ~0.1 s on the core the layers' second thread needs (an evaluation forward of a 4 × 256 model,
        T 128, N 32: 228 against 176 ms with OpenBLAS's spin cut short)."""
        return single_thread_blas(self._one_blas_thread)

    def loss(self, ids, targets, state=None):
        """Mean cross-entropy in nats per character → ``(loss, dlogits, None)``: the language models' loss
        contract (a Transformer carries no state between windows)."""
        logits, _ = self.forward(ids)
        loss, dlogits = cross_entropy(logits, targets)
        return loss, dlogits, None

    def backward(self, dlogits):
        """Backprop from ∂L/∂logits (the ``dlogits`` of :meth:`loss`) into every parameter."""
        with self._threads():
            de = self.pos.backward(self.encoder.backward(self.decoder.backward(dlogits)))
            self.embed.backward(de)

    # ------------------------------------------------------------------ generation
    def reset_state(self):
        self._cache = None

    def step(self, ids):
        """One token per stream: ids (N,) → logits (N, V) for the next one.

        The position is the number of steps since :meth:`reset_state`; each layer appends this
        position's key and value to its cache and attends over the cache, which gives the same
        logits as :meth:`forward` on the whole prefix (dropout is not applied: generation is
        inference).  Raises ValueError once the position would reach ``config.context``.
        It runs the layers' forward passes, so it must not come between a forward and its backward.
        """
        ids = self._check_ids(np.asarray(ids).reshape(-1), 1)
        c, N = self.config, ids.shape[0]
        E, h = c.d_model, c.heads
        d = E // h
        if self._cache is None or self._cache["N"] != N:
            shape = (c.layers, N, h, c.context, d)  # keys and values of every layer
            self._cache = {"N": N, "t": 0, "K": np.zeros(shape, self.dtype), "V": np.zeros(shape, self.dtype),
                           "weights": self._step_weights()}
        t = self._cache["t"]
        if t >= c.context:
            raise ValueError(f"position {t} would exceed the context of {c.context} positions; "
                             "call reset_state() (or generate with a sliding window)")
        x = self.embed.params["weight"][ids] + self.pos.params["weight"][t]  # (N, E)
        logits = None
        if self._cache["weights"] is not None:
            from bptt import kernels  # lazily: importing Numba is slow

            logits = kernels.lm_step(x, t, self._cache["weights"], self._cache["K"], self._cache["V"],
                                     self.encoder.norm.eps)
        if logits is None:
            logits = self._step_numpy(x, t)
        self._cache["t"] = t + 1
        return logits

    def _step_numpy(self, x, t):
        """:meth:`step` in NumPy, the reference of the compiled step (``kernels.lm_step``): x (N, E) the
        embeddings of position t → logits (N, V), caches filled at t."""
        for i, layer in enumerate(self.encoder.layers):
            x = x + self._attend_cached(layer, layer.norm1(x), self._cache["K"][i], self._cache["V"][i], t)
            x = x + _affine(layer.linear2, layer.activation(_affine(layer.linear1, layer.norm2(x))))  # no dropout
        return _affine(self.decoder, self.encoder.norm(x))

    def _step_weights(self):
        """The weights the compiled step reads, stacked over the layers (copies, made at each
        ``reset_state``: generation after more training starts from a reset), in ``kernels.lm_step``'s
        order; None when it does not apply (no Numba, or a layer unlike the kernel's: post-norm, not the
        exact GELU, a LayerNorm eps other than the final one's)."""
        from bptt.kernels.mathfn import HAVE_NUMBA
        from bptt.nn.feedforward import GELU

        layers = self.encoder.layers
        eps = self.encoder.norm.eps
        if not HAVE_NUMBA or any(not layer.norm_first or not isinstance(layer.activation, GELU)
                                 or layer.activation.approximate != "none"
                                 or any(n.eps != eps for n in (layer.norm1, layer.norm2)) for layer in layers):
            return None

        params = [layer.params for layer in layers]  # each a dict built from the module tree: once a layer
        weights = [np.ascontiguousarray(np.stack([p[k] for p in params])) for k in (
            "norm1.weight", "norm1.bias", "self_attn.in_proj_weight", "self_attn.in_proj_bias",
            "self_attn.out_proj.weight", "self_attn.out_proj.bias", "norm2.weight", "norm2.bias",
            "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")]
        final = self.encoder.norm.params
        return tuple(weights) + (final["weight"], final["bias"], self.decoder.params["weight"],
                                 self.decoder.params["bias"])

    @staticmethod
    def _attend_cached(layer, z, K, V, t):
        """Causal self-attention of position t over positions 0..t, keys and values cached.

        z (N, E) the normed input at position t;  K, V (N, h, C, d) filled up to t−1 and
        filled at t here.  The projections are the layer's own ``in_proj_weight`` (3E, E) =
        [W_q; W_k; W_v] and ``out_proj``, so this is MultiheadAttention restricted to one query."""
        attn = layer.self_attn
        W, b = attn.params["in_proj_weight"], attn.params.get("in_proj_bias")
        N, E = z.shape
        h, d = attn.num_heads, attn.head_dim
        qkv = z @ W.T + (b if b is not None else 0.0)  # (N, 3E)
        q, k, v = (qkv[:, i * E:(i + 1) * E].reshape(N, h, 1, d) for i in range(3))
        K[:, :, t], V[:, :, t] = k[:, :, 0], v[:, :, 0]
        s = q @ K[:, :, : t + 1].transpose(0, 1, 3, 2)  # (N, h, 1, t+1); matmul, not einsum: 4x less overhead
        s *= s.dtype.type(1.0 / np.sqrt(d))  # in s's dtype: a NumPy float64 scalar would make s float64
        a = softmax(s, axis=-1)
        o = (a @ V[:, :, : t + 1]).reshape(N, E)  # (N, h, 1, d), heads merged
        return _affine(attn.out_proj, o)
