"""``bptt export CKPT --out PATH [--opset N] [--graph sequence|step]``: a checkpoint → ONNX.

A language model (recurrent or Transformer) becomes one file (its sequence or one-step graph); a seq2seq
model a folder holding ``encoder.onnx`` and ``decoder_step.onnx``.

Wired into the ``bptt`` command by :func:`register` (``register(subparsers)``).  Bad input
(not a bptt char LM checkpoint, an unwritable path, an opset out of range, onnx missing)
raises a ValueError whose message is one line; ``bptt`` prints it as ``bptt: error: ...``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "cmd_export"]


def register(subparsers) -> argparse.ArgumentParser:
    from bptt.onnx.graph import DEFAULT_OPSET, EXPORT_OPSETS

    p = subparsers.add_parser("export", help="export a language model (recurrent or Transformer) or a seq2seq "
                                             "checkpoint to ONNX",
                              description="Write a checkpoint of bptt train as an ONNX model (vocabulary and config "
                                          "in its metadata), runnable by ONNX Runtime and by bptt sample/eval. "
                                          'Needs the optional extra: pip install "bptt[onnx]".')
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train or bptt seq2seq train")
    p.add_argument("--out", "-o", required=True, help="the .onnx file to write (replaced atomically); for a seq2seq "
                                                      "model, a folder for encoder.onnx and decoder_step.onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {EXPORT_OPSETS.start}-{EXPORT_OPSETS.stop - 1} (default: {DEFAULT_OPSET})")
    p.add_argument("--graph", choices=("sequence", "step"), default="sequence",
                   help="sequence: ids (T, N) → logits (T, N, V); step: ids (N,) → logits (N, V) (default: sequence)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from bptt.checkpoint import load_checkpoint
    from bptt.onnx.graph import require_onnx

    require_onnx()  # before the (slower) checkpoint read: say what to install first
    _, meta = load_checkpoint(args.checkpoint)
    if meta.get("kind") == "seq2seq":
        return _export_seq2seq(args)
    from bptt.lm.model import load_model
    from bptt.onnx.to_onnx import export_charlm

    model, vocab, meta = load_model(args.checkpoint)  # vocab: the units (characters, bytes or words), saved as JSON
    keep = {k: meta[k] for k in ("step", "best", "eval", "saved_at") if k in meta}
    keep["source"] = str(args.checkpoint)
    if meta["config"].get("model") == "transformer":  # step: one position, with its key/value cache
        from bptt.onnx.transformer_lm import export_transformer_lm

        path = export_transformer_lm(model, vocab, args.out, graph=args.graph, opset=args.opset, meta=keep)
    else:
        path = export_charlm(model, vocab, args.out, graph=args.graph, opset=args.opset, meta=keep)
    print(f"wrote {path} ({model.extra_repr()}, opset {args.opset}, {args.graph} graph)", file=sys.stderr)
    return 0


def _export_seq2seq(args) -> int:
    """A seq2seq checkpoint → ``OUT/encoder.onnx`` + ``OUT/decoder_step.onnx`` (vocabularies in their metadata)."""
    from bptt.onnx.seq2seq import export_seq2seq
    from bptt.seq2seq.train import load_model

    model, meta, _ = load_model(args.checkpoint)
    keep = {k: meta[k] for k in ("src_vocab", "tgt_vocab", "task", "level", "max_src_len", "max_tgt_len", "step")}
    keep["source"] = str(args.checkpoint)
    enc, dec = export_seq2seq(model, args.out, opset=args.opset, meta=keep)
    print(f"wrote {enc} and {dec} (opset {args.opset})", file=sys.stderr)
    return 0
