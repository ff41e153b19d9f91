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
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bptt.onnx.graph import DEFAULT_OPSET, Builder, OnnxError, emit_recurrent, save_model
from bptt.onnx.runtime import InferenceOnly, session
from bptt.onnx.to_onnx import META_PREFIX, check_opset, json_default

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
    valid = b.node("Less", [b.node("Unsqueeze", [b.node("Range", [b.const(np.array(0, np.int64), "s0"),
                                                                  b.node("Squeeze", [b.dim(src, 0), b.ints([0])]),
                                                                  b.const(np.array(1, np.int64), "ds")]),
                                                 b.ints([0])]),
                            b.node("Unsqueeze", [src_len, b.ints([1])])])  # (1, S) < (N, 1) → (N, S)
    b.output(valid, "mask", b.onnx.TensorProto.BOOL, ["N", "S"])
    b.output(h0, "h_0", b.elem, [L, "N", H])
    if model.dec_lstm:
        c0 = to_lnh(b.node("Slice", [s, b.ints([L * H]), b.ints([2 * L * H]), b.ints([1])]))
        b.output(c0, "c_0", b.elem, [L, "N", H])
    return b


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


def export_seq2seq(model, directory, *, opset: int = DEFAULT_OPSET, meta: dict | None = None):
    """Write a :class:`bptt.seq2seq.model.Seq2Seq` as ``directory/encoder.onnx`` and
    ``directory/decoder_step.onnx`` (eval mode: dropout is the identity); returns both paths.

    The config (and ``meta``, e.g. a checkpoint's vocabularies) go into both files' metadata_props.
    """
    from bptt.seq2seq.model import Seq2Seq

    if not isinstance(model, Seq2Seq):
        raise OnnxError(f"export_seq2seq() takes a bptt Seq2Seq, got {type(model).__name__}")
    opset = check_opset(opset)
    props = {META_PREFIX + "kind": SEQ2SEQ_KIND, META_PREFIX + "config": json.dumps(model.config.to_dict()),
             META_PREFIX + "dtype": str(model.dtype), META_PREFIX + "meta": json.dumps(meta or {}, default=json_default)}
    directory = Path(directory)
    enc = _encoder_graph(model, opset).model("bptt_seq2seq_encoder", dict(props, **{META_PREFIX + "graph": "encoder"}))
    dec = _decoder_graph(model, opset).model("bptt_seq2seq_decoder_step",
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
        self.config = Seq2SeqConfig.from_dict(json.loads(props[0][META_PREFIX + "config"]))
        self.meta = json.loads(props[0].get(META_PREFIX + "meta", "{}"))
        self.dtype = np.dtype(props[0][META_PREFIX + "dtype"])
        self.use_attention = self.config.attention != "none"
        self.dec_lstm = self.config.cell == "lstm"
        self.encoder, self.decoder = (session(m, threads) for m in models)

    def encode(self, src, src_len):
        from bptt.seq2seq.model import Memory

        out = self.encoder.run(None, {"src": np.asarray(src, np.int64), "src_len": np.asarray(src_len, np.int64)})
        state = (out[2], out[3]) if self.dec_lstm else out[2]
        return Memory(out[0], out[1], state)

    def decode_step(self, tokens, state, memory):
        """tokens (N,) → (log-probs (N, V) float64, new state, weights (N, S) or None), as Seq2Seq's."""
        feeds = {"tokens": np.asarray(tokens, np.int64), "memory": np.ascontiguousarray(memory.m, self.dtype),
                 "mask": np.asarray(memory.mask, bool)}
        if self.dec_lstm:
            feeds["h"], feeds["c"] = (np.ascontiguousarray(s, self.dtype) for s in state)
        else:
            feeds["h"] = np.ascontiguousarray(state, self.dtype)
        out = self.decoder.run(None, feeds)
        new_state = (out[1], out[2]) if self.dec_lstm else out[1]
        weights = out[-1] if self.use_attention else None
        return out[0].astype(np.float64), new_state, weights

    def greedy(self, src, src_len, max_len: int, return_attention=False):
        from bptt.seq2seq.model import Seq2Seq

        return Seq2Seq.greedy(self, src, src_len, max_len, return_attention)

    def beam_search(self, src, src_len, beam: int, max_len: int, alpha: float = 0.0, return_attention=False):
        from bptt.seq2seq.model import Seq2Seq

        return Seq2Seq.beam_search(self, src, src_len, beam, max_len, alpha, return_attention)

    def translate(self, src, src_len, max_len: int, beam: int = 1, alpha: float = 0.0, return_attention=False):
        from bptt.seq2seq.model import Seq2Seq

        return Seq2Seq.translate(self, src, src_len, max_len, beam, alpha, return_attention)
