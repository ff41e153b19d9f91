"""An encoder–decoder Transformer for sequence-to-sequence tasks, on :class:`bptt.nn.Transformer`.

Shape legend: S source length, T target length, N batch, E d_model, h heads, d = E/h, F feed-forward
width, L layers (encoder and decoder each), V target vocabulary, t decoded positions so far.
Token arrays are time-major int64 as in :mod:`bptt.seq2seq.model`: source (S, N), target (T, N).

The model (Vaswani et al. 2017, with pre-norm layers)::

    x = dropout(√E · Embed_src(src) + P[0:S])                       (S, N, E)  P sinusoidal
    y = dropout(√E · Embed_tgt(tgt_in) + P[0:T])                    (T, N, E)
    m = Encoder(x, key padding = positions ≥ src_len)              (S, N, E)  ends in a LayerNorm
    z = Decoder(y, m, causal mask, memory key padding as above)    (T, N, E)  ends in a LayerNorm
    logits = z W_outᵀ + b_out                                      (T, N, V)

Backward is the Transformer's own (``bptt.nn.transformer``), then √E times each embedding's
gradient.  Padded target positions are excluded from the loss (``Batch.tgt_mask``); the causal
mask keeps every real position from seeing them, so no target padding mask is needed.

Decoding keeps, per decoder layer, the self-attention keys and values of the positions decoded so
far, and the cross-attention keys and values of the memory (computed once in :meth:`encode`,
``Memory.cross``): a step costs one position per layer.  The self-attention cache is the decoder
"state" of the interface the recurrent model has (``encode`` → Memory, ``decode_step(tokens, state,
memory)``), so the greedy and beam-search loops of :class:`bptt.seq2seq.model.Seq2Seq` run unchanged:
every array of the state has the batch on axis 1, as they expect for reordering beams.

The equivalent PyTorch model: ``nn.Embedding`` ×2, ``nn.Transformer(E, h, L, L, F, dropout,
norm_first=True)``, ``nn.Linear(E, V)`` with the same state-dict keys (``src_embed``,
``tgt_embed``, ``transformer.encoder…``, ``transformer.decoder…``, ``out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bptt.config import DictConfig
from bptt.nn import attention_tiles
from bptt.nn.cells import resolve_rng
from bptt.nn.feedforward import SinusoidalPositionalEncoding
from bptt.nn.layers import Embedding, Linear
from bptt.nn.losses import cross_entropy, log_softmax, softmax
from bptt.nn.module import Module
from bptt.nn.multihead import causal_mask
from bptt.nn.ops import affine_forward
from bptt.nn.transformer import Transformer
from bptt.runtime.threads import single_thread_blas
from bptt.seq2seq.model import Batch, Memory, Seq2Seq, make_batch
from bptt.seq2seq.tasks import BOS

__all__ = ["TransformerSeq2SeqConfig", "TransformerSeq2Seq"]


@dataclass
class TransformerSeq2SeqConfig(DictConfig):
    """Everything needed to rebuild a TransformerSeq2Seq (saved in the checkpoint as ``config``)."""

    src_vocab: int
    tgt_vocab: int
    d_model: int = 128
    heads: int = 4
    layers: int = 2  # encoder layers, and as many decoder layers
    ff: int = 0  # feed-forward width F; 0 → 4·d_model
    dropout: float = 0.0
    max_len: int = 1024  # positions of the sinusoidal table (source, and target while decoding)
    arch: str = "transformer"  # tells this config apart from a Seq2SeqConfig in a checkpoint

    def __post_init__(self):
        for k in ("src_vocab", "tgt_vocab", "d_model", "heads", "layers", "max_len"):
            v = getattr(self, k)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if int(self.ff) < 0:
            raise ValueError(f"ff must be >= 0 (0: 4·d_model), got {self.ff!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.arch != "transformer":
            raise ValueError(f"arch must be 'transformer', got {self.arch!r}")

    @property
    def feedforward(self) -> int:
        return int(self.ff) or 4 * self.d_model


class TransformerSeq2Seq(Module):
    """The model above, with the interface of :class:`bptt.seq2seq.model.Seq2Seq`.

    ``forward(src, src_len, tgt_in)`` → logits (T, N, V);  ``backward(dlogits)``;  ``loss(batch)``;
    ``encode`` / ``decode_step`` / ``greedy`` / ``beam_search`` / ``translate`` / ``score`` as Seq2Seq's;
    ``cross_attention_heads(src_ids, out_ids)`` → the last decoder layer's cross-attention per head.

    Init: every matrix of the Transformer Xavier-uniform (as nn.Transformer), embeddings
    N(0, 1/E) (so that √E · embedding has unit variance), the output layer as Linear's default.
    """

    use_attention = True  # decode_step returns cross-attention weights (averaged over heads)

    def __init__(self, config: TransformerSeq2SeqConfig, dtype=np.float32, rng=None):
        super().__init__()
        self.config = cfg = config
        self._dtype = np.dtype(dtype)
        rng = resolve_rng(rng)
        E = cfg.d_model
        kw = dict(dtype=self._dtype, rng=rng)
        self.src_embed = self.add_module("src_embed", Embedding(cfg.src_vocab, E, **kw))
        self.tgt_embed = self.add_module("tgt_embed", Embedding(cfg.tgt_vocab, E, **kw))
        for emb in (self.src_embed, self.tgt_embed):
            emb.params["weight"][...] = rng.standard_normal(emb.params["weight"].shape) / math.sqrt(E)
        # positions: no parameters; one module per side, since each keeps its own dropout mask
        self.src_pos = self.add_module("src_pos", SinusoidalPositionalEncoding(E, cfg.max_len, cfg.dropout, **kw))
        self.tgt_pos = self.add_module("tgt_pos", SinusoidalPositionalEncoding(E, cfg.max_len, cfg.dropout, **kw))
        self.transformer = self.add_module("transformer", Transformer(
            E, cfg.heads, cfg.layers, cfg.layers, cfg.feedforward, cfg.dropout, norm_first=True, **kw))
        self.out = self.add_module("out", Linear(E, cfg.tgt_vocab, **kw))
        self.scale = self._dtype.type(math.sqrt(E))
        self._ctx = None
        self._one_blas_thread = False  # set by forward, encode and translate: see _threads

    def extra_repr(self):
        c = self.config
        return f"transformer d_model={c.d_model}, heads={c.heads}, layers={c.layers}+{c.layers}, " \
               f"ff={c.feedforward}, dropout={c.dropout}"

    # ------------------------------------------------------------------ training forward / backward
    def _check_len(self, n, what):
        if n > self.config.max_len:
            raise ValueError(f"{what} of {n} positions exceeds the model's max_len of {self.config.max_len}")

    def forward(self, src, src_len, tgt_in):
        """src (S, N), src_len (N,), tgt_in (T, N) → logits (T, N, V)."""
        src, tgt_in = np.asarray(src), np.asarray(tgt_in)
        S, T = src.shape[0], tgt_in.shape[0]
        self._check_len(S, "a source")
        self._check_len(T, "a target")
        pad = np.arange(S)[None, :] >= np.asarray(src_len)[:, None]  # (N, S) True = padding
        self._plan_threads(src.shape[1], S, T)
        with self._threads():
            x = self.src_pos(self.src_embed(src) * self.scale)
            y = self.tgt_pos(self.tgt_embed(tgt_in) * self.scale)
            z = self.transformer(x, y, tgt_mask=causal_mask(T), src_key_padding_mask=pad,
                                 memory_key_padding_mask=pad, tgt_is_causal=True)
            self._ctx = True
            return self.out(z)

    def _plan_threads(self, N, S, T=1):
        """Whether this pass holds BLAS to one thread: when the layers' attention runs in tiles
        (:func:`bptt.nn.attention_tiles.wanted`; the layers then hold it themselves), so that no
        two-thread product between them (the output layer, the memory's keys and values, a decoding
        step) leaves an OpenBLAS thread spinning on the core the layers' second thread needs: greedy
        decoding of 256 sources of 20–29 tokens took 266 against 230 ms (encoding 111 against 76)."""
        L = max(S, T)
        self._one_blas_thread = attention_tiles.wanted(N * self.config.heads, L, L, self._dtype)

    def _threads(self):
        return single_thread_blas(self._one_blas_thread)

    def backward(self, dlogits):
        """dlogits (T, N, V) → None; every parameter's gradient accumulates."""
        self._saved(self._ctx)
        with self._threads():
            dsrc, dtgt = self.transformer.backward(self.out.backward(dlogits))
            self.src_embed.backward(self.src_pos.backward(dsrc) * self.scale)
            self.tgt_embed.backward(self.tgt_pos.backward(dtgt) * self.scale)
        self._ctx = None

    def loss(self, batch: Batch, tgt_in=None):
        """Masked mean cross-entropy over real target positions and its gradient: (loss, dlogits)."""
        logits = self.forward(batch.src, batch.src_len, batch.tgt_in if tgt_in is None else tgt_in)
        return cross_entropy(logits, batch.tgt_out, mask=batch.tgt_mask)

    # ------------------------------------------------------------------ decoding
    def _heads(self, x, W, b):
        """x (N, …, E) → (x Wᵀ + b) split into heads (N, h, …, d).  One 2-d product over all rows
        (:func:`bptt.nn.ops.affine_forward`): NumPy runs ``x @ W.T`` for a 3-d x as one product per
        row of N, 2.2× slower for N = 256 sources of 30 positions."""
        h = self.config.heads
        y = affine_forward(x, W, b)
        y = y.reshape(*y.shape[:-1], h, y.shape[-1] // h)
        return np.moveaxis(y, -2, 1)

    def encode(self, src, src_len) -> Memory:
        """The encoder output and, per decoder layer, its cross-attention keys and values.

        ``Memory.state`` = (K_self, V_self): (L, N, h, 0, d) empty caches; ``Memory.cross`` = (K_mem, V_mem):
        (L, N, h, S, d) projections of the memory; ``Memory.m`` (N, S, E), ``Memory.mask`` (N, S)."""
        src = np.asarray(src)
        S, N = src.shape
        self._check_len(S, "a source")
        pad = np.arange(S)[None, :] >= np.asarray(src_len)[:, None]
        self._plan_threads(N, S)
        with self._threads():
            return self._encode(src, pad)

    def _encode(self, src, pad) -> Memory:
        N = src.shape[1]
        m = self.transformer.encoder(self.src_pos(self.src_embed(src) * self.scale), src_key_padding_mask=pad)
        m = np.ascontiguousarray(m.transpose(1, 0, 2))  # (N, S, E)
        E, h, layers = self.config.d_model, self.config.heads, self.transformer.decoder.layers
        Km, Vm = [], []
        for layer in layers:
            attn = layer.multihead_attn
            W, b = attn.params["in_proj_weight"], attn.params.get("in_proj_bias")
            Km.append(self._heads(m, W[E:2 * E], None if b is None else b[E:2 * E]))  # (N, h, S, d)
            Vm.append(self._heads(m, W[2 * E:], None if b is None else b[2 * E:]))
        empty = np.zeros((len(layers), N, h, 0, E // h), self._dtype)
        return Memory(m, ~pad, (empty, empty.copy()), (np.stack(Km), np.stack(Vm)))

    def _step(self, tokens, state, memory: Memory):
        """One position for every row: (logits (N, V), new state, last layer's cross weights (N, h, S))."""
        (Ks, Vs), (Km, Vm), mask = state, memory.cross, memory.mask
        L, N, h, t, d = Ks.shape  # t: positions decoded so far = this token's position
        self._check_len(t + 1, "a decoded target")
        E = self.config.d_model
        x = self.tgt_embed.params["weight"][np.asarray(tokens)] * self.scale + self.tgt_pos.table[t]  # (N, E)
        bias = np.where(mask, 0.0, -np.inf).astype(x.dtype)[:, None, None, :]  # (N, 1, 1, S): padding gets no weight
        K_new, V_new = (np.empty((L, N, h, t + 1, d), Ks.dtype) for _ in range(2))  # the caches, one position longer
        K_new[:, :, :, :t], V_new[:, :, :, :t] = Ks, Vs
        scale = x.dtype.type(1.0 / math.sqrt(d))
        weights = None

        def attend(q, K, V, bias=None):
            """q (N, h, d) over keys K and values V (N, h, s, d) → (o (N, E) heads merged, a (N, h, s))."""
            s = q[:, :, None, :] @ np.swapaxes(K, -1, -2)  # (N, h, 1, s): matmul, not einsum (less overhead)
            s *= scale
            if bias is not None:
                s += bias
            a = softmax(s, axis=-1)
            return (a @ V).reshape(N, E), a[:, :, 0]

        for i, layer in enumerate(self.transformer.decoder.layers):
            sa, ca = layer.self_attn, layer.multihead_attn

            def self_attend(z, i=i, sa=sa):
                qkv = affine_forward(z, sa.params["in_proj_weight"], sa.params.get("in_proj_bias"))  # (N, 3E)
                q, k, v = (qkv[:, j * E:(j + 1) * E].reshape(N, h, d) for j in range(3))
                K_new[i, :, :, t], V_new[i, :, :, t] = k, v
                return sa.out_proj(attend(q, K_new[i], V_new[i])[0])

            def cross_attend(z, i=i, ca=ca):
                nonlocal weights
                Wc, bc = ca.params["in_proj_weight"], ca.params.get("in_proj_bias")
                q = affine_forward(z, Wc[:E], None if bc is None else bc[:E]).reshape(N, h, d)
                o, weights = attend(q, Km[i], Vm[i], bias)
                return ca.out_proj(o)

            def feed_forward(z, layer=layer):
                return layer.linear2(layer.activation(layer.linear1(z)))

            for norm, f in ((layer.norm1, self_attend), (layer.norm2, cross_attend), (layer.norm3, feed_forward)):
                x = x + f(norm(x)) if layer.norm_first else norm(x + f(x))
        norm = self.transformer.decoder.norm
        logits = self.out(norm(x) if norm is not None else x)
        return logits, (K_new, V_new), weights

    def decode_step(self, tokens, state, memory: Memory):
        """One decoder step: tokens (N,) → (log-probs (N, V) float64, new state, weights (N, S)).

        The weights are the last decoder layer's cross-attention averaged over the heads (what
        nn.MultiheadAttention returns by default)."""
        logits, state, a = self._step(tokens, state, memory)
        return log_softmax(logits.astype(np.float64)), state, a.mean(axis=1)

    greedy = Seq2Seq.greedy  # the decoding loops only call encode / decode_step / Memory.select
    beam_search = Seq2Seq.beam_search

    def translate(self, src, src_len, max_len: int, beam: int = 1, alpha: float = 0.0, return_attention=False):
        """:meth:`bptt.seq2seq.model.Seq2Seq.translate`, with BLAS's threads planned once for the encoding
        and every step (:meth:`_plan_threads`)."""
        src = np.asarray(src)
        self._plan_threads(src.shape[1], src.shape[0])
        with self._threads():
            return Seq2Seq.translate(self, src, src_len, max_len, beam, alpha, return_attention)

    def score(self, src, src_len, tgt_seqs) -> np.ndarray:
        """(N,) log p(y | x) of given outputs under the model, </s> included."""
        b = make_batch([np.asarray(src[: src_len[n], n]) for n in range(len(src_len))], tgt_seqs)
        logp = log_softmax(self.forward(b.src, b.src_len, b.tgt_in).astype(np.float64))
        self._ctx = None
        picked = np.take_along_axis(logp, b.tgt_out[..., None], axis=2)[..., 0]
        return np.where(b.tgt_mask, picked, 0.0).sum(axis=0)

    def cross_attention_heads(self, src_ids, out_ids) -> np.ndarray:
        """The last decoder layer's cross-attention per head while reading ``<s> out_ids``:
        (h, len(out_ids) + 1, S) — row j is the step that predicts output j (the last: </s>)."""
        was_training = self.training
        self.eval()
        try:
            b = make_batch([np.asarray(src_ids)])
            memory = self.encode(b.src, b.src_len)
            state, rows = memory.state, []
            for tok in [BOS, *out_ids]:
                _, state, a = self._step(np.array([tok]), state, memory)
                rows.append(a[0])  # (h, S)
        finally:
            self.train(was_training)
        return np.stack(rows, axis=1)
