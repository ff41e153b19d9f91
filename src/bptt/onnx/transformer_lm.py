"""Export a Transformer language model (:class:`bptt.lm.transformer.TransformerLM`) to ONNX, and run it.

Shape legend: T positions (T ≤ C), N batch streams, V vocabulary, E d_model, h heads, d = E/h,
F = 4E feed-forward width, C context.

The sequence graph is the model's ``forward`` in eval mode (dropout is the identity), ids (T, N) int64 →
logits (T, N, V), in standard operators (any opset bptt exports, 14–21)::

    e = Gather(W_tok, ids) + W_pos[0:T]                            (T, N, E)
    per block:  z = LayerNorm(e)                                     (ReduceMean, Sub, Mul, Sqrt, Div, Add)
                q, k, v = Split(z W_inᵀ + b_in)  → (N, h, T, d) each
                a = Softmax(q kᵀ / √d + M[0:T, 0:T])                  M: 0 on and below the diagonal, −inf above
                e = e + (a v, heads merged) W_outᵀ + b_out
                u = LayerNorm(e) W₁ᵀ + b₁
                e = e + (u ½ (1 + Erf(u / √2))) W₂ᵀ + b₂             GELU, the exact one
    logits = LayerNorm(e) W_decᵀ + b_dec

The step graph is :meth:`TransformerLM.step`: one position, the keys and values of the positions before
it as inputs and with its own appended as outputs (the caller keeps the cache).  With the sequence graph
:class:`bptt.onnx.runtime.OnnxTransformerLM` generates by running the whole prefix again for each new
position (at most C), which gives the same logits at up to C times the cost.
"""

from __future__ import annotations

import numpy as np

from bptt.onnx.graph import DEFAULT_OPSET, Builder, OnnxError, save_model
from bptt.onnx.to_onnx import check_opset, lm_metadata

__all__ = ["TRANSFORMER_LM_KIND", "export_transformer_lm", "feed_forward", "attention", "attention_step"]

TRANSFORMER_LM_KIND = "transformer_lm"


def export_transformer_lm(model, vocab, path, *, graph: str = "sequence", opset: int = DEFAULT_OPSET,
                          meta: dict | None = None):
    """Write a TransformerLM to ``path``; returns the path.

    ``graph="sequence"``: ids (T, N) int64 → logits (T, N, V), T ≤ C, as ``forward``.
    ``graph="step"``: ids (N,) int64, position (1,) int64 = t, past_key_l, past_value_l (N, h, t, d) for each
    layer l → logits (N, V), present_key_l, present_value_l (N, h, t + 1, d): one position with a key/value
    cache, as ``step`` (the caller feeds each step's presents back as the next step's pasts, and t < C).

    The vocabulary, config and ``meta`` go into the metadata under ``bptt.*`` keys, as
    :func:`bptt.onnx.export_charlm` does."""
    from bptt.lm.transformer import TransformerLM

    if not isinstance(model, TransformerLM):
        raise OnnxError(f"export_transformer_lm() takes a bptt TransformerLM, got {type(model).__name__}")
    if graph not in ("sequence", "step"):
        raise OnnxError(f"graph must be 'sequence' or 'step', got {graph!r}")
    cfg = model.config
    b = Builder(model.dtype, check_opset(opset))
    E, h, C, V = cfg.d_model, cfg.heads, cfg.context, cfg.vocab_size
    d = E // h
    i64 = b.onnx.TensorProto.INT64
    tok = b.const(model.embed.params["weight"], "embed_weight")
    pos = b.const(model.pos.params["weight"], "pos_weight")
    if graph == "sequence":
        ids = b.input("ids", i64, ["T", "N"])
        T = b.dim(ids, 0)
        zero = b.ints([0])
        e = b.node("Add", [b.node("Gather", [tok, ids], axis=0),  # (T, N, E) + W_pos[0:T] (T, 1, E)
                           b.node("Unsqueeze", [b.node("Slice", [pos, zero, T, zero]), b.ints([1])])], base="e")
        causal = np.triu(np.full((C, C), -np.inf, model.dtype), k=1)  # M: position t sees positions ≤ t
        mask = b.node("Slice", [b.const(causal, "causal_mask"), b.ints([0, 0]), b.node("Concat", [T, T], axis=0),
                                b.ints([0, 1])], base="mask_tt")

        def attend(i, layer, z):
            return attention(b, layer.self_attn, z, mask, E, h, d, f"l{i}")
    else:
        ids = b.input("ids", i64, ["N"])
        t = b.input("position", i64, [1])
        e = b.node("Add", [b.node("Gather", [tok, ids], axis=0), b.node("Gather", [pos, t], axis=0)], base="e")  # (N, E)
        pasts = [(b.input(f"past_key_{i}", b.elem, ["N", h, "t", d]), b.input(f"past_value_{i}", b.elem, ["N", h, "t", d]))
                 for i in range(cfg.layers)]

        presents = []

        def attend(i, layer, z):
            out, K, Vs = attention_step(b, layer.self_attn, z, *pasts[i], E, h, d, f"l{i}")
            presents.append((K, Vs))
            return out
    for i, layer in enumerate(model.encoder.layers):
        e = b.node("Add", [e, attend(i, layer, b.layer_norm(layer.norm1, e, f"l{i}_ln1"))], base=f"l{i}_e_attn")
        e = b.node("Add", [e, feed_forward(b, layer, b.layer_norm(layer.norm2, e, f"l{i}_ln2"), f"l{i}")],
                   base=f"l{i}_e_ff")
    logits = b.affine(model.decoder, b.layer_norm(model.encoder.norm, e, "ln_f"), "logits_out")
    b.output(logits, "logits", b.elem, (["T", "N"] if graph == "sequence" else ["N"]) + [V])
    if graph == "step":
        for i, (K, Vs) in enumerate(presents):
            b.output(K, f"present_key_{i}", b.elem, ["N", h, "t1", d])
            b.output(Vs, f"present_value_{i}", b.elem, ["N", h, "t1", d])
    return save_model(b.model(f"bptt_transformer_lm_{graph}", lm_metadata(TRANSFORMER_LM_KIND, graph, cfg, vocab, meta)),
                      path)


def feed_forward(b, layer, z, tag):
    """The layer's position-wise feed-forward, act(z W₁ᵀ + b₁) W₂ᵀ + b₂ (no dropout: eval mode)."""
    u = b.affine(layer.linear1, z, f"{tag}_ff1")  # (…, F)
    return b.affine(layer.linear2, b.activation(layer.activation, u, f"{tag}_act"), f"{tag}_ff2")


def attention(b, attn, z, bias, E, h, d, tag):
    """Multi-head self-attention (a bptt MultiheadAttention ``attn``) of z (T, N, E) → (T, N, E), the additive
    ``bias`` broadcast to the scores (N, h, T, T): a causal (T, T) mask, or a key padding (N, 1, 1, T)."""
    qkv = b.node("MatMul", [z, b.const(np.ascontiguousarray(attn.params["in_proj_weight"].T), f"{tag}_in_proj_T")])
    if attn.params.get("in_proj_bias") is not None:
        qkv = b.node("Add", [qkv, b.const(attn.params["in_proj_bias"], f"{tag}_in_proj_bias")])
    q, k, v = b.node("Split", [qkv, b.ints([E, E, E])], outputs=3, base=f"{tag}_qkv", axis=2)
    heads = b.ints([0, 0, h, d], f"{tag}_heads")  # (T, N, E) → (T, N, h, d)
    q, k, v = (b.node("Reshape", [x, heads]) for x in (q, k, v))
    q = b.node("Transpose", [q], perm=[1, 2, 0, 3])  # (N, h, T, d)
    k = b.node("Transpose", [k], perm=[1, 2, 3, 0])  # (N, h, d, T)
    v = b.node("Transpose", [v], perm=[1, 2, 0, 3])
    s = b.node("Mul", [b.node("MatMul", [q, k]), b.const(np.array(1 / np.sqrt(d), b.dtype), f"{tag}_scale")])
    a = b.node("Softmax", [b.node("Add", [s, bias])], base=f"{tag}_attn", axis=-1)  # (N, h, T, T)
    o = b.node("Transpose", [b.node("MatMul", [a, v])], perm=[2, 0, 1, 3])  # (T, N, h, d)
    o = b.node("Reshape", [o, b.ints([0, 0, E], f"{tag}_merge")])
    return b.affine(attn.out_proj, o, f"{tag}_out_proj")


def attention_step(b, attn, z, past_k, past_v, E, h, d, tag):
    """Self-attention (a bptt MultiheadAttention ``attn``) of one position z (N, E) over the cached keys and
    values and its own → (output (N, E), keys, values (N, h, t+1, d): the caches grown by this position)."""
    qkv = b.node("MatMul", [z, b.const(np.ascontiguousarray(attn.params["in_proj_weight"].T), f"{tag}_in_proj_T")])
    if attn.params.get("in_proj_bias") is not None:
        qkv = b.node("Add", [qkv, b.const(attn.params["in_proj_bias"], f"{tag}_in_proj_bias")])
    q, k, v = b.node("Split", [qkv, b.ints([E, E, E])], outputs=3, base=f"{tag}_qkv", axis=1)
    heads = b.ints([0, h, 1, d], f"{tag}_heads")  # (N, E) → (N, h, 1, d)
    q, k, v = (b.node("Reshape", [x, heads]) for x in (q, k, v))
    K = b.node("Concat", [past_k, k], axis=2, base=f"{tag}_present_key")  # (N, h, t+1, d)
    Vs = b.node("Concat", [past_v, v], axis=2, base=f"{tag}_present_value")
    s = b.node("Mul", [b.node("MatMul", [q, b.node("Transpose", [K], perm=[0, 1, 3, 2])]),
                       b.const(np.array(1 / np.sqrt(d), b.dtype), f"{tag}_scale")])  # (N, h, 1, t+1)
    a = b.node("Softmax", [s], base=f"{tag}_attn", axis=-1)
    o = b.node("Reshape", [b.node("MatMul", [a, Vs]), b.ints([0, E], f"{tag}_merge")])  # (N, h, 1, d) → (N, E)
    return b.affine(attn.out_proj, o, f"{tag}_out_proj"), K, Vs
