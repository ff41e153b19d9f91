"""Export a seq2seq model as two ONNX graphs, encoder.onnx and decoder_step.onnx, and decode with them.

Shape legend: S source length, N batch, E embedding size, H decoder hidden size, H_e encoder hidden
size per direction, K encoder directions, C = K·H_e memory width, L layers, V target vocabulary,
A additive-attention width, Z bridge input width.

encoder.onnx (see :meth:`bptt.seq2seq.model.Seq2Seq.encode`)::

    src (S, N) int64, src_len (N,) int64
    m, s_n = Encoder(Gather(src_embed, src), sequence_lens = src_len)      m (S, N, C)
    z      = [top layer's h_n, both directions (, c_n)]                   (N, Z)
    s      = z W_bᵀ + b_b;  h_0 = tanh(s[:, :L·H]),  c_0 = s[:, L·H:]      (L, N, H) each
    → memory (N, S, C), mask (N, S) bool (t < src_len), h_0 (, c_0)

decoder_step.onnx (see :meth:`bptt.seq2seq.model.Seq2Seq.decode_step`)::

    tokens (N,) int64, h (L, N, H) (, c), memory (N, S, C), mask (N, S) bool
    q, s'  = Decoder(Gather(tgt_embed, tokens) as one step, (h, c))        q (N, 1, H)
    with attention:  e = score(q, m) (−∞ where not mask),  a = Softmax(e),  ctx = a m
                     q = tanh([ctx; q] W_combᵀ)
    → logprobs = LogSoftmax(q W_outᵀ + b_out) (N, V), h_n (, c_n), weights a (N, S) (attention only)

Scores: dot ``q mᵀ``; general ``q (m W_aᵀ)ᵀ``; additive ``tanh(q W_qᵀ ⊕ m W_kᵀ) v``.

A :class:`bptt.seq2seq.transformer.TransformerSeq2Seq` writes the same two files, its decoder state
being its key/value caches (``_transformer_encoder_graph``, ``_transformer_decoder_graph``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bptt.onnx.graph import DEFAULT_OPSET, Builder, OnnxError, emit_recurrent, save_model
from bptt.onnx.runtime import InferenceOnly, session
from bptt.onnx.to_onnx import META_PREFIX, check_opset, json_default
from bptt.onnx.transformer_lm import attention, attention_step, feed_forward

__all__ = ["export_seq2seq", "OnnxSeq2Seq", "SEQ2SEQ_KIND"]

SEQ2SEQ_KIND = "seq2seq"


def _T(w):
    return np.ascontiguousarray(np.asarray(w).T)


def _encoder_graph(model, opset):
    cfg = model.config
    b = Builder(model.dtype, opset)
    L, K, H, He = cfg.layers, cfg.directions, cfg.hidden, cfg.encoder_hidden
    i64 = b.onnx.TensorProto.INT64
    src = b.input("src", i64, ["S", "N"])
    src_len = b.input("src_len", i64, ["N"])
    x = b.node("Gather", [b.const(model.src_embed.params["weight"], "src_embed"), src], base="src_x", axis=0)
    y, h_n, c_n = emit_recurrent(b, model.encoder, x, src_len)
    top = (b.ints([(L - 1) * K]), b.ints([L * K]), b.ints([0]))

    def flat_top(s):  # (L·K, N, H_e) → the top layer's rows (K, N, H_e) → (N, K·H_e): [fwd; rev]
        rows = b.node("Slice", [s, *top])
        return b.node("Reshape", [b.node("Transpose", [rows], perm=[1, 0, 2]), b.ints([0, -1])])

    parts = [flat_top(h_n)] + ([flat_top(c_n)] if c_n is not None else [])
    z = parts[0] if len(parts) == 1 else b.node("Concat", parts, base="bridge_in", axis=1)
    br = model.bridge.params
    s = b.node("Add", [b.node("MatMul", [z, b.const(_T(br["weight"]), "bridge_weight_T")]),
                       b.const(br["bias"], "bridge_bias")], base="bridge_out")

    def to_lnh(v):  # (N, L·H) → (L, N, H)
        return b.node("Transpose", [b.node("Reshape", [v, b.ints([0, L, H])])], perm=[1, 0, 2])

    h0 = to_lnh(b.node("Tanh", [b.node("Slice", [s, b.ints([0]), b.ints([L * H]), b.ints([1])])]))
    b.output(b.node("Transpose", [y], perm=[1, 0, 2]), "memory", b.elem, ["N", "S", K * He])
    b.output(_valid(b, src, src_len), "mask", b.onnx.TensorProto.BOOL, ["N", "S"])
    b.output(h0, "h_0", b.elem, [L, "N", H])
    if model.dec_lstm:
        c0 = to_lnh(b.node("Slice", [s, b.ints([L * H]), b.ints([2 * L * H]), b.ints([1])]))
        b.output(c0, "c_0", b.elem, [L, "N", H])
    return b


def _valid(b, src, src_len):
    """(N, S) bool, True at the real positions of src (S, N): s < src_len[n]."""
    s = b.node("Range", [b.const(np.array(0, np.int64), "s0"), b.node("Squeeze", [b.dim(src, 0), b.ints([0])]),
                         b.const(np.array(1, np.int64), "ds")])
    return b.node("Less", [b.node("Unsqueeze", [s, b.ints([0])]), b.node("Unsqueeze", [src_len, b.ints([1])])],
                  base="valid")  # (1, S) < (N, 1) → (N, S)


def _decoder_graph(model, opset):
    cfg = model.config
    b = Builder(model.dtype, opset)
    L, H, C, V = cfg.layers, cfg.hidden, cfg.directions * cfg.encoder_hidden, cfg.tgt_vocab
    tokens = b.input("tokens", b.onnx.TensorProto.INT64, ["N"])
    h = b.input("h", b.elem, [L, "N", H])
    c = b.input("c", b.elem, [L, "N", H]) if model.dec_lstm else None
    m = b.input("memory", b.elem, ["N", "S", C])
    mask = b.input("mask", b.onnx.TensorProto.BOOL, ["N", "S"])
    x = b.node("Gather", [b.const(model.tgt_embed.params["weight"], "tgt_embed"),
                          b.node("Unsqueeze", [tokens, b.ints([0])])], base="tgt_x", axis=0)  # (1, N, E)
    y, h_n, c_n = emit_recurrent(b, model.decoder, x, None, h, c)
    q = b.node("Transpose", [y], base="q", perm=[1, 0, 2])  # (N, 1, H)
    a = None
    if model.use_attention:
        att = model.attention
        p = att.params
        if att.kind == "dot":
            e = b.node("MatMul", [q, b.node("Transpose", [m], perm=[0, 2, 1])])
        elif att.kind == "general":
            keys = b.node("MatMul", [m, b.const(_T(p["W_a"]), "W_a_T")])  # (N, S, H)
            e = b.node("MatMul", [q, b.node("Transpose", [keys], perm=[0, 2, 1])])
        else:
            u = b.node("MatMul", [q, b.const(_T(p["W_q"]), "W_q_T")])  # (N, 1, A)
            w = b.node("MatMul", [m, b.const(_T(p["W_k"]), "W_k_T")])  # (N, S, A)
            z = b.node("Tanh", [b.node("Add", [b.node("Unsqueeze", [u, b.ints([2])]),  # (N, 1, 1, A)
                                               b.node("Unsqueeze", [w, b.ints([1])])])])  # (N, 1, S, A)
            e = b.node("MatMul", [z, b.const(p["v"], "v")])  # (N, 1, S)
        e = b.node("Where", [b.node("Unsqueeze", [mask, b.ints([1])]), e,
                             b.const(np.full(1, -np.inf, b.dtype), "minus_inf")], base="scores")
        a = b.node("Softmax", [e], base="attn", axis=-1)  # (N, 1, S): exactly 0 at masked slots
        ctx = b.node("MatMul", [a, m], base="context")  # (N, 1, C)
        q = b.node("Tanh", [b.node("MatMul", [b.node("Concat", [ctx, q], axis=2),
                                              b.const(_T(model.combine.params["weight"]), "combine_T")])])
    out = model.out.params
    logits = b.node("Add", [b.node("MatMul", [q, b.const(_T(out["weight"]), "out_weight_T")]),
                            b.const(out["bias"], "out_bias")])  # (N, 1, V)
    logp = b.node("LogSoftmax", [b.node("Squeeze", [logits, b.ints([1])])], base="logp", axis=-1)
    b.output(logp, "logprobs", b.elem, ["N", V])
    b.output(h_n, "h_n", b.elem, [L, "N", H])
    if c_n is not None:
        b.output(c_n, "c_n", b.elem, [L, "N", H])
    if a is not None:
        b.output(b.node("Squeeze", [a, b.ints([1])]), "weights", b.elem, ["N", "S"])
    return b


# ---------------------------------------------------------------------------- the Transformer (--arch transformer)
def _transformer_encoder_graph(model, opset):
    """encoder.onnx of a TransformerSeq2Seq (pre-norm layers; see :meth:`TransformerSeq2Seq.encode`)::

        x = √E Gather(src_embed, src) + P[0:S]                 (S, N, E), P the sinusoidal table
        per layer: x = x + SelfAttention(LN₁ x, key padding),  x = x + FF(LN₂ x);  m = LN(x)
        → memory m (N, S, E), mask (N, S) bool, and the decoder's state: K_self, V_self (L, N, h, 0, d)
          empty caches, K_mem, V_mem (L, N, h, S, d) each decoder layer's cross-attention keys and values"""
    cfg = model.config
    b = Builder(model.dtype, opset)
    E, h, L = cfg.d_model, cfg.heads, cfg.layers
    d = E // h
    i64 = b.onnx.TensorProto.INT64
    src = b.input("src", i64, ["S", "N"])
    src_len = b.input("src_len", i64, ["N"])
    S = b.dim(src, 0)
    zero = b.ints([0])
    pos = b.node("Unsqueeze", [b.node("Slice", [b.const(model.src_pos.table, "src_pos"), zero, S, zero]), b.ints([1])])
    x = b.node("Add", [b.node("Mul", [b.node("Gather", [b.const(model.src_embed.params["weight"], "src_embed"), src],
                                             axis=0), b.const(np.array(model.scale), "sqrt_E")]), pos], base="x")
    valid = _valid(b, src, src_len)
    bias = _padding_bias(b, valid)
    for i, layer in enumerate(model.transformer.encoder.layers):
        _check_pre_norm(layer)
        x = b.node("Add", [x, attention(b, layer.self_attn, b.layer_norm(layer.norm1, x, f"e{i}_ln1"), bias, E, h, d,
                                        f"e{i}")], base=f"e{i}_x_attn")
        x = b.node("Add", [x, feed_forward(b, layer, b.layer_norm(layer.norm2, x, f"e{i}_ln2"), f"e{i}")],
                   base=f"e{i}_x_ff")
    norm = model.transformer.encoder.norm
    m = b.node("Transpose", [b.layer_norm(norm, x, "e_ln") if norm is not None else x], base="m", perm=[1, 0, 2])
    b.output(m, "memory", b.elem, ["N", "S", E])
    b.output(valid, "mask", b.onnx.TensorProto.BOOL, ["N", "S"])
    empty_shape = b.node("Concat", [b.ints([L]), b.dim(src, 1), b.ints([h, 0, d])], axis=0)
    for name in ("K_self", "V_self"):
        empty = b.node("ConstantOfShape", [empty_shape], base=name,
                       value=b.onnx.helper.make_tensor("zero", b.elem, [1], [0.0]))
        b.output(empty, name, b.elem, [L, "N", h, 0, d])
    for j, name in ((1, "K_mem"), (2, "V_mem")):  # W_k, W_v of each decoder layer's cross-attention
        per_layer = []
        for i, layer in enumerate(model.transformer.decoder.layers):
            W, bb = layer.multihead_attn.params["in_proj_weight"], layer.multihead_attn.params.get("in_proj_bias")
            y = b.node("MatMul", [m, b.const(_T(W[j * E:(j + 1) * E]), f"d{i}_{name}_W_T")])
            if bb is not None:
                y = b.node("Add", [y, b.const(bb[j * E:(j + 1) * E], f"d{i}_{name}_b")])
            y = b.node("Transpose", [b.node("Reshape", [y, b.ints([0, 0, h, d])])], perm=[0, 2, 1, 3])  # (N, h, S, d)
            per_layer.append(b.node("Unsqueeze", [y, b.ints([0])]))
        b.output(b.node("Concat", per_layer, base=f"{name}_all", axis=0), name, b.elem, [L, "N", h, "S", d])
    return b


def _transformer_decoder_graph(model, opset):
    """decoder_step.onnx of a TransformerSeq2Seq (see :meth:`TransformerSeq2Seq.decode_step`)::

        tokens (N,), K_self, V_self (L, N, h, t, d), K_mem, V_mem (L, N, h, S, d), mask (N, S)
        x = √E Gather(tgt_embed, tokens) + P[t]                               (N, E)
        per layer: x = x + SelfAttention(LN₁ x over the cache and itself)
                   x = x + CrossAttention(LN₂ x over K_mem, V_mem, −∞ at padding),  x = x + FF(LN₃ x)
        → logprobs = LogSoftmax(LN(x) W_outᵀ + b_out) (N, V), the state with this position's keys and values
          appended (t + 1), weights (N, S): the last layer's cross-attention averaged over the heads"""
    cfg = model.config
    b = Builder(model.dtype, opset)
    E, h, L, V = cfg.d_model, cfg.heads, cfg.layers, cfg.tgt_vocab
    d = E // h
    tokens = b.input("tokens", b.onnx.TensorProto.INT64, ["N"])
    Ks, Vs = (b.input(n, b.elem, [L, "N", h, "t", d]) for n in ("K_self", "V_self"))
    Km, Vm = (b.input(n, b.elem, [L, "N", h, "S", d]) for n in ("K_mem", "V_mem"))
    mask = b.input("mask", b.onnx.TensorProto.BOOL, ["N", "S"])
    t = b.dim(Ks, 3)  # positions decoded so far: this token's position
    x = b.node("Add", [b.node("Mul", [b.node("Gather", [b.const(model.tgt_embed.params["weight"], "tgt_embed"), tokens],
                                             axis=0), b.const(np.array(model.scale), "sqrt_E")]),
                       b.node("Gather", [b.const(model.tgt_pos.table, "tgt_pos"), t], axis=0)], base="x")  # (N, E)
    bias = _padding_bias(b, mask)
    scale = b.const(np.array(1 / np.sqrt(d), b.dtype), "scale")
    new_K, new_V, a = [], [], None
    for i, layer in enumerate(model.transformer.decoder.layers):
        _check_pre_norm(layer)

        def layer_i(cache):  # (L, N, h, ·, d) → layer i's (N, h, ·, d)
            return b.node("Squeeze", [b.node("Gather", [cache, b.ints([i], f"layer_{i}")], axis=0), b.ints([0])])

        out, K, Vv = attention_step(b, layer.self_attn, b.layer_norm(layer.norm1, x, f"d{i}_ln1"), layer_i(Ks),
                                    layer_i(Vs), E, h, d, f"d{i}")
        new_K.append(b.node("Unsqueeze", [K, b.ints([0])]))
        new_V.append(b.node("Unsqueeze", [Vv, b.ints([0])]))
        x = b.node("Add", [x, out], base=f"d{i}_x_self")
        ca = layer.multihead_attn
        W, bb = ca.params["in_proj_weight"], ca.params.get("in_proj_bias")
        q = b.node("MatMul", [b.layer_norm(layer.norm2, x, f"d{i}_ln2"), b.const(_T(W[:E]), f"d{i}_q_W_T")])
        if bb is not None:
            q = b.node("Add", [q, b.const(bb[:E], f"d{i}_q_b")])
        q = b.node("Reshape", [q, b.ints([0, h, 1, d])])  # (N, h, 1, d)
        scores = b.node("Mul", [b.node("MatMul", [q, b.node("Transpose", [layer_i(Km)], perm=[0, 1, 3, 2])]), scale])
        a = b.node("Softmax", [b.node("Add", [scores, bias])], base=f"d{i}_cross", axis=-1)  # (N, h, 1, S)
        o = b.node("Reshape", [b.node("MatMul", [a, layer_i(Vm)]), b.ints([0, E])])
        x = b.node("Add", [x, b.affine(ca.out_proj, o, f"d{i}_cross_out")], base=f"d{i}_x_cross")
        x = b.node("Add", [x, feed_forward(b, layer, b.layer_norm(layer.norm3, x, f"d{i}_ln3"), f"d{i}")],
                   base=f"d{i}_x_ff")
    norm = model.transformer.decoder.norm
    logits = b.affine(model.out, b.layer_norm(norm, x, "d_ln") if norm is not None else x, "logits")
    b.output(b.node("LogSoftmax", [logits], axis=-1), "logprobs", b.elem, ["N", V])
    b.output(b.node("Concat", new_K, axis=0), "K_self_n", b.elem, [L, "N", h, "t1", d])
    b.output(b.node("Concat", new_V, axis=0), "V_self_n", b.elem, [L, "N", h, "t1", d])
    b.output(Km, "K_mem_n", b.elem, [L, "N", h, "S", d])
    b.output(Vm, "V_mem_n", b.elem, [L, "N", h, "S", d])
    weights = b.node("Squeeze", [b.mean(a, [1]), b.ints([1, 2])])  # (N, h, 1, S) → (N, S)
    b.output(weights, "weights", b.elem, ["N", "S"])
    return b


def _padding_bias(b, valid):
    """The additive bias (N, 1, 1, S) of attention scores (N, h, ·, S) over the source: 0 at real positions
    (``valid`` (N, S) bool), −∞ at padding, so padding gets exactly no weight."""
    return b.node("Where", [b.node("Unsqueeze", [valid, b.ints([1, 2])]), b.const(np.zeros(1, b.dtype), "zero"),
                            b.const(np.full(1, -np.inf, b.dtype), "minus_inf")], base="padding_bias")


def _check_pre_norm(layer):
    if not layer.norm_first:  # TransformerSeq2Seq builds pre-norm layers only
        raise OnnxError("the seq2seq Transformer's export expects pre-norm layers (norm_first=True)")


def export_seq2seq(model, directory, *, opset: int = DEFAULT_OPSET, meta: dict | None = None):
    """Write a :class:`bptt.seq2seq.model.Seq2Seq` or :class:`bptt.seq2seq.transformer.TransformerSeq2Seq`
    as ``directory/encoder.onnx`` and ``directory/decoder_step.onnx`` (eval mode: dropout is the
    identity); returns both paths.

    The config (and ``meta``, e.g. a checkpoint's vocabularies) go into both files' metadata_props.
    """
    from bptt.seq2seq.model import Seq2Seq
    from bptt.seq2seq.transformer import TransformerSeq2Seq

    if isinstance(model, TransformerSeq2Seq):
        graphs = (_transformer_encoder_graph, _transformer_decoder_graph)
    elif isinstance(model, Seq2Seq):
        graphs = (_encoder_graph, _decoder_graph)
    else:
        raise OnnxError(f"export_seq2seq() takes a bptt Seq2Seq or TransformerSeq2Seq, got {type(model).__name__}")
    opset = check_opset(opset)
    props = {META_PREFIX + "kind": SEQ2SEQ_KIND, META_PREFIX + "config": json.dumps(model.config.to_dict()),
             META_PREFIX + "dtype": str(model.dtype), META_PREFIX + "meta": json.dumps(meta or {}, default=json_default)}
    directory = Path(directory)
    enc = graphs[0](model, opset).model("bptt_seq2seq_encoder", dict(props, **{META_PREFIX + "graph": "encoder"}))
    dec = graphs[1](model, opset).model("bptt_seq2seq_decoder_step",
                                        dict(props, **{META_PREFIX + "graph": "decoder_step"}))
    return save_model(enc, directory / "encoder.onnx"), save_model(dec, directory / "decoder_step.onnx")


class OnnxSeq2Seq(InferenceOnly):
    """encoder.onnx + decoder_step.onnx in ONNX Runtime, with Seq2Seq's decoding interface:
    ``encode``, ``decode_step``, ``greedy``, ``beam_search``, ``translate`` (same arguments and results).

    ``greedy`` / ``beam_search`` / ``translate`` are :class:`bptt.seq2seq.model.Seq2Seq`'s own decoding
    loops run on this object: they use only encode, decode_step, eval/train and use_attention.
    """

    def __init__(self, directory, threads: int | None = None):
        from bptt.onnx.from_onnx import read_model
        from bptt.seq2seq.model import Seq2SeqConfig

        directory = Path(directory)
        models = [read_model(directory / name) for name in ("encoder.onnx", "decoder_step.onnx")]
        props = [{p.key: p.value for p in m.metadata_props} for m in models]
        for path, pr, graph in zip(("encoder.onnx", "decoder_step.onnx"), props, ("encoder", "decoder_step")):
            if pr.get(META_PREFIX + "kind") != SEQ2SEQ_KIND or pr.get(META_PREFIX + "graph") != graph:
                raise OnnxError(f"{directory / path}: not a seq2seq {graph} graph written by bptt")
        if props[0][META_PREFIX + "config"] != props[1][META_PREFIX + "config"]:
            raise OnnxError(f"{directory}: encoder.onnx and decoder_step.onnx come from different models")
        config = json.loads(props[0][META_PREFIX + "config"])
        if config.get("arch") == "transformer":
            from bptt.seq2seq.transformer import TransformerSeq2SeqConfig

            self.config, self.use_attention = TransformerSeq2SeqConfig.from_dict(config), True
        else:
            self.config = Seq2SeqConfig.from_dict(config)
            self.use_attention = self.config.attention != "none"
        self.meta = json.loads(props[0].get(META_PREFIX + "meta", "{}"))
        self.dtype = np.dtype(props[0][META_PREFIX + "dtype"])
        self.encoder, self.decoder = (session(m, threads) for m in models)
        inputs = [i.name for i in self.decoder.get_inputs()]
        # the decoder state's inputs, in order: h (, c) of the recurrent model; K_self, V_self of the Transformer,
        # whose graph reads the memory through K_mem, V_mem (Memory.cross) and has no memory input
        self.cross_inputs = [n for n in inputs if n in ("K_mem", "V_mem")]
        self.state_inputs = [n for n in inputs if n not in ("tokens", "memory", "mask", *self.cross_inputs)]
        self.reads_memory = "memory" in inputs

    def encode(self, src, src_len):
        from bptt.seq2seq.model import Memory

        out = self.encoder.run(None, {"src": np.asarray(src, np.int64), "src_len": np.asarray(src_len, np.int64)})
        if self.cross_inputs:  # the Transformer: K_self, V_self (the state), then K_mem, V_mem
            return Memory(out[0], out[1], (out[2], out[3]), (out[4], out[5]))
        state = tuple(out[2:]) if len(out) > 3 else out[2]  # h_0 (, c_0)
        return Memory(out[0], out[1], state)

    def decode_step(self, tokens, state, memory):
        """tokens (N,) → (log-probs (N, V) float64, new state, weights (N, S) or None), as Seq2Seq's."""
        feeds = {"tokens": np.asarray(tokens, np.int64), "mask": np.asarray(memory.mask, bool)}
        if self.reads_memory:
            feeds["memory"] = np.ascontiguousarray(memory.m, self.dtype)
        states = state if isinstance(state, tuple) else (state,)
        feeds.update({name: np.ascontiguousarray(s, self.dtype) for name, s in zip(self.state_inputs, states)})
        feeds.update({name: np.ascontiguousarray(a, self.dtype) for name, a in zip(self.cross_inputs, memory.cross or ())})
        out = self.decoder.run(None, feeds)
        k = len(self.state_inputs)
        new_state = tuple(out[1:1 + k]) if k > 1 else out[1]
        weights = out[1 + k + len(self.cross_inputs)] if self.use_attention else None  # (after K_mem_n, V_mem_n)
        return out[0].astype(np.float64), new_state, weights

    def greedy(self, src, src_len, max_len: int, return_attention=False, memory=None):
        from bptt.seq2seq.model import Seq2Seq

        return Seq2Seq.greedy(self, src, src_len, max_len, return_attention, memory)

    def beam_search(self, src, src_len, beam: int, max_len: int, alpha: float = 0.0, return_attention=False):
        from bptt.seq2seq.model import Seq2Seq

        return Seq2Seq.beam_search(self, src, src_len, beam, max_len, alpha, return_attention)

    def translate(self, src, src_len, max_len: int, beam: int = 1, alpha: float = 0.0, return_attention=False):
        from bptt.seq2seq.model import Seq2Seq

        return Seq2Seq.translate(self, src, src_len, max_len, beam, alpha, return_attention)
