"""ONNX deployment: export bptt models to ONNX, run them in ONNX Runtime, import ONNX recurrent models.

An optional extra (``pip install "bptt[onnx]"``): ``onnx`` and ``onnxruntime`` are
imported only when one of these functions runs.

    export(layer, path, ...)          bptt.RNN / LSTM / GRU → standard ONNX RNN / LSTM / GRU nodes
                                      (an LSTM with proj_size → a Scan over the cell in basic operators)
    export_charlm(model, vocab, path) a char LM → a one-step or a whole-sequence graph, vocabulary and
                                      config in the model's metadata
    transformer_lm.export_transformer_lm(model, vocab, path)  a Transformer LM → its whole-window graph, or its
                                      step graph with the key/value cache as inputs and outputs
    load(path)                        a stack of standard recurrent nodes (+ a final Gemm / MatMul + Add)
                                      → bptt modules (:class:`bptt.onnx.from_onnx.Imported`)
    runtime.load_charlm(path)         → (OnnxCharLM or OnnxTransformerLM, vocab, meta), like bptt.lm.train.load_model
    seq2seq.export_seq2seq(model, dir) encoder.onnx + decoder_step.onnx;  seq2seq.OnnxSeq2Seq(dir) decodes

See docs/onnx.md for the opset, the operator mapping and the float64 limits.
"""

from __future__ import annotations

from bptt.onnx.graph import DEFAULT_OPSET, OnnxError, require_onnx

__all__ = ["DEFAULT_OPSET", "OnnxError", "require_onnx", "export", "export_charlm", "load", "load_charlm"]


def export(module, path, **options):
    """See :func:`bptt.onnx.to_onnx.export_layer`."""
    from bptt.onnx.to_onnx import export_layer

    return export_layer(module, path, **options)


def export_charlm(model, vocab, path, **options):
    """See :func:`bptt.onnx.to_onnx.export_charlm`."""
    from bptt.onnx.to_onnx import export_charlm as _export_charlm

    return _export_charlm(model, vocab, path, **options)


def load(path):
    """See :func:`bptt.onnx.from_onnx.load`."""
    from bptt.onnx.from_onnx import load as _load

    return _load(path)


def load_charlm(path):
    """See :func:`bptt.onnx.runtime.load_charlm`."""
    from bptt.onnx.runtime import load_charlm as _load_charlm

    return _load_charlm(path)
