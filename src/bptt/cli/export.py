"""``bptt export CKPT --out PATH [--opset N] [--graph sequence|step]``: a char LM checkpoint → an ONNX file.

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

    p = subparsers.add_parser("export", help="export a char language model checkpoint to ONNX",
                              description="Write a checkpoint of bptt train as an ONNX model (vocabulary and config "
                                          "in its metadata), runnable by ONNX Runtime and by bptt sample/eval. "
                                          'Needs the optional extra: pip install "bptt[onnx]".')
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train")
    p.add_argument("--out", required=True, help="the .onnx file to write (replaced atomically)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {EXPORT_OPSETS.start}-{EXPORT_OPSETS.stop - 1} (default: {DEFAULT_OPSET})")
    p.add_argument("--graph", choices=("sequence", "step"), default="sequence",
                   help="sequence: ids (T, N) → logits (T, N, V); step: ids (N,) → logits (N, V) (default: sequence)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from bptt.lm.train import load_model
    from bptt.onnx.graph import require_onnx
    from bptt.onnx.to_onnx import export_charlm

    require_onnx()  # before the (slower) checkpoint read: say what to install first
    model, vocab, meta = load_model(args.checkpoint)
    keep = {k: meta[k] for k in ("iteration", "best_val", "val_loss", "saved_at") if k in meta}
    keep["source"] = str(args.checkpoint)
    path = export_charlm(model, vocab, args.out, graph=args.graph, opset=args.opset, meta=keep)
    print(f"wrote {path} ({model.extra_repr()}, opset {args.opset}, {args.graph} graph)", file=sys.stderr)
    return 0
