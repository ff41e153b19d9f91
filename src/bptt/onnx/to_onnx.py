"""Export bptt recurrent layers and character language models to ONNX files.

Shape legend: T time steps, N batch, D input features, H hidden units, P = proj_size or H,
L layers, K directions, V vocabulary, E embedding size (E = V for one-hot input).

Every exported graph is the model in eval mode (dropout is the identity), pins one opset
(:data:`bptt.onnx.graph.DEFAULT_OPSET` unless told otherwise), passes
``onnx.checker.check_model(full_check=True)`` and is written atomically.  Time and batch
axes are dynamic (``T`` and ``N`` in the graph's shapes).
"""

from __future__ import annotations

import json

import numpy as np

from bptt.onnx.graph import DEFAULT_OPSET, EXPORT_OPSETS, Builder, OnnxError, emit_recurrent, save_model

__all__ = ["export_layer", "export_charlm", "check_opset", "json_default", "lm_metadata", "CHARLM_KIND", "META_PREFIX"]

CHARLM_KIND = "charlm"
META_PREFIX = "bptt."


def check_opset(opset) -> int:
    if not isinstance(opset, (int, np.integer)) or int(opset) not in EXPORT_OPSETS:
        raise OnnxError(f"opset must be an integer in [{EXPORT_OPSETS.start}, {EXPORT_OPSETS.stop - 1}], got {opset!r}")
    return int(opset)


def _check_layer(module):
    from bptt.nn.rnn import RNNBase

    if not isinstance(module, RNNBase):
        raise OnnxError(f"export() takes a bptt.RNN, LSTM or GRU, got {type(module).__name__} "
                        "(char language models: bptt.onnx.export_charlm)")


def export_layer(module, path, *, opset: int = DEFAULT_OPSET, lengths: bool = False, initial_state: bool = False):
    """Write a bptt RNN (tanh or relu), LSTM or GRU to ``path`` as an ONNX model; returns the path.

    Graph inputs and outputs (their names; ``batch_first`` swaps T and N in input/output)::

        input     (T, N, D)                     the layer's input
        lengths   (N,) int64                    when lengths=True: valid steps per sequence, in [1, T]
        h_0       (L·K, N, P)                   when initial_state=True (else zeros)
        c_0       (L·K, N, H)                   LSTM, when initial_state=True
        output    (T, N, K·P)                   zeros past each sequence's length
        h_n       (L·K, N, P)                   at each sequence's last valid step
        c_n       (L·K, N, H)                   LSTM

    the same as ``module(input, (h_0, c_0), lengths)`` in eval mode.
    """
    _check_layer(module)
    b = Builder(module.dtype, check_opset(opset))
    L, K, H, P, D = module.num_layers, module.num_directions, module.hidden_size, module.out_size, module.input_size
    lstm = module.mode == "lstm"
    seq = ["N", "T"] if module.batch_first else ["T", "N"]
    x = b.input("input", b.elem, seq + [D])
    if module.batch_first:
        x = b.node("Transpose", [x], base="input_tnd", perm=[1, 0, 2])
    lens = b.input("lengths", b.onnx.TensorProto.INT64, ["N"]) if lengths else None
    h0 = b.input("h_0", b.elem, [L * K, "N", P]) if initial_state else None
    c0 = b.input("c_0", b.elem, [L * K, "N", H]) if initial_state and lstm else None
    y, h_n, c_n = emit_recurrent(b, module, x, lens, h0, c0)
    if module.batch_first:
        y = b.node("Transpose", [y], base="output_ntd", perm=[1, 0, 2])
    b.output(y, "output", b.elem, seq + [K * P])
    b.output(h_n, "h_n", b.elem, [L * K, "N", P])
    if lstm:
        b.output(c_n, "c_n", b.elem, [L * K, "N", H])
    meta = {META_PREFIX + "kind": "layer", META_PREFIX + "layer": json.dumps(_layer_config(module))}
    return save_model(b.model(f"bptt_{type(module).__name__.lower()}", meta), path)


def _layer_config(module) -> dict:
    return {"class": type(module).__name__, "mode": module.mode, "input_size": module.input_size,
            "hidden_size": module.hidden_size, "num_layers": module.num_layers, "bias": module.bias,
            "batch_first": module.batch_first, "bidirectional": module.bidirectional, "proj_size": module.proj_size,
            "dtype": str(module.dtype)}


def export_charlm(model, vocab, path, *, graph: str = "sequence", opset: int = DEFAULT_OPSET, meta: dict | None = None):
    """Write a :class:`bptt.lm.model.CharLM` to ``path`` as an ONNX model; returns the path.

    ``graph="sequence"``: ids (T, N) int64, h_0 (L, N, H)[, c_0] → logits (T, N, V), h_n[, c_n];
    ``graph="step"``:     ids (N,) int64,   h_0 (L, N, H)[, c_0] → logits (N, V),    h_n[, c_n].

    The graph (eval mode: dropout is the identity)::

        x      = Gather(table, ids)       table = the embedding, or the identity (V, V) for one-hot input
        y, s   = the recurrent layer      (see bptt.onnx.graph)
        logits = y W_decᵀ + b_dec

    The vocabulary, the model config and ``meta`` (JSON-serialisable, e.g. the checkpoint's
    step and evaluation) go into the model's ``metadata_props`` as JSON under ``bptt.*``
    keys, so :func:`bptt.onnx.runtime.load_charlm` needs nothing else.
    """
    from bptt.lm.model import CharLM

    if not isinstance(model, CharLM):
        raise OnnxError(f"export_charlm() takes a bptt CharLM, got {type(model).__name__}")
    if graph not in ("sequence", "step"):
        raise OnnxError(f"graph must be 'sequence' or 'step', got {graph!r}")
    cfg = model.config
    rnn = model.rnn
    b = Builder(model.dtype, check_opset(opset))
    V, L, H = cfg.vocab_size, rnn.num_layers, rnn.hidden_size
    lstm = rnn.mode == "lstm"
    i64 = b.onnx.TensorProto.INT64
    if graph == "sequence":
        ids = b.input("ids", i64, ["T", "N"])
    else:
        ids = b.node("Unsqueeze", [b.input("ids", i64, ["N"]), b.ints([0])], base="ids_1n")  # (1, N)
    h0 = b.input("h_0", b.elem, [L, "N", H])
    c0 = b.input("c_0", b.elem, [L, "N", H]) if lstm else None
    table = model.embed.params["weight"] if model.embed is not None else np.eye(V, dtype=model.dtype)
    x = b.node("Gather", [b.const(table, "embed_weight" if model.embed is not None else "one_hot"), ids], base="x",
               axis=0)
    y, h_n, c_n = emit_recurrent(b, rnn, x, None, h0, c0)
    if cfg.adaptive_softmax:  # the exact log-probabilities of every unit, as CharLM.forward gives them
        logits = adaptive_log_probs(b, model.decoder, y)
    else:
        dec = model.decoder.params
        W_dec = model.embed.params["weight"] if cfg.tie_weights else dec["weight"]  # tied: the embedding's (V, H)
        logits = b.node("Add", [b.node("MatMul", [y, b.const(np.ascontiguousarray(W_dec.T), "decoder_weight_T")]),
                                b.const(dec["bias"], "decoder_bias")], base="logits_tnv")
    if graph == "step":
        logits = b.node("Squeeze", [logits, b.ints([0])], base="logits_nv")
    b.output(logits, "logits", b.elem, (["T", "N"] if graph == "sequence" else ["N"]) + [V])
    b.output(h_n, "h_n", b.elem, [L, "N", H])
    if lstm:
        b.output(c_n, "c_n", b.elem, [L, "N", H])
    return save_model(b.model(f"bptt_charlm_{graph}", lm_metadata(CHARLM_KIND, graph, cfg, vocab, meta)), path)


def adaptive_log_probs(b: Builder, asm, y: str) -> str:
    """log p(c | y) for every class c (…, V) of an :class:`bptt.nn.adaptive.AdaptiveLogSoftmaxWithLoss`, as its
    ``log_prob``: the head's ℓ = log_softmax(y W_hᵀ (+ b_h)) (…, S + C) gives the shortlist's S classes, and
    cluster i's classes are ℓ[S + i] + log_softmax((y P_iᵀ) O_iᵀ); concatenated in class order."""
    S = asm.shortlist_size
    head = b.node("LogSoftmax", [b.affine(asm.head, y, "asm_head")], base="asm_head_logp", axis=-1)

    def columns(lo, hi, base):
        return b.node("Slice", [head, b.ints([lo]), b.ints([hi]), b.ints([-1])], base=base)

    parts = [columns(0, S, "asm_shortlist")]
    for i in range(asm.n_clusters):
        proj, out = asm.tail[i]
        z = b.affine(out, b.affine(proj, y, f"asm_tail{i}_proj"), f"asm_tail{i}_out")
        cluster = b.node("LogSoftmax", [z], base=f"asm_tail{i}_logp", axis=-1)
        parts.append(b.node("Add", [cluster, columns(S + i, S + i + 1, f"asm_cluster{i}")], base=f"asm_tail{i}"))
    return b.node("Concat", parts, base="log_probs_tnv", axis=-1)


def lm_metadata(kind: str, graph: str, config, vocab, meta: dict | None) -> dict:
    """A language model file's ``bptt.*`` metadata_props: its kind and graph, and as JSON its config, its
    units (``vocab.to_json()``) and ``meta``; what :func:`bptt.onnx.runtime.read_bptt_metadata` reads."""
    return {
        META_PREFIX + "kind": kind,
        META_PREFIX + "graph": graph,
        META_PREFIX + "config": json.dumps(config.to_dict()),
        META_PREFIX + "vocab": json.dumps(vocab.to_json(), ensure_ascii=False),
        META_PREFIX + "meta": json.dumps(meta or {}, default=json_default),
    }


def json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
