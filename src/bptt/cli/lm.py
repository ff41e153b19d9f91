"""``bptt train | sample | eval``: the command line of the language model (:mod:`bptt.lm`)."""

from __future__ import annotations

import json
import math
import sys

from bptt.cli.options import add_dataclass_options
from bptt.lm.train import TrainConfig

__all__ = ["register", "cmd_train", "cmd_sample", "cmd_eval"]


def register(sub) -> None:
    p = sub.add_parser("train", help="train a language model (characters, bytes or words)",
                       description="Train a language model on characters (default), bytes or words (--unit). "
                                   "With no --data it trains on the Python standard library's own source code, "
                                   "which every machine has.")
    add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained model")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train, or its .onnx export")
    p.add_argument("--length", type=int, default=2000, help="units (characters, bytes, words) to generate (default: 2000)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature: lower is more conservative (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely characters (default: 0 = all)")
    p.add_argument("--prime", default="", help="text to feed the model before sampling")
    p.add_argument("--argmax", action="store_true", help="always take the most likely character")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="loss, bits/char and perplexity of a model on a text")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train, or its .onnx export")
    p.add_argument("--data", required=True, help="text file to evaluate on")
    p.add_argument("--encoding", default="utf-8", help="text encoding (default: utf-8; a byte model reads the raw bytes)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_eval)


def cmd_train(args) -> int:
    from bptt.lm.train import TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "no_verify")}
    cfg = TrainConfig(**given)
    train(cfg, explicit=set(given))
    return 0


def load_any_model(path):
    """(model, vocab, meta) from a checkpoint of bptt train, or from its ONNX export (run in ONNX Runtime)."""
    if str(path).endswith(".onnx"):
        from bptt.onnx.runtime import load_charlm

        return load_charlm(path)
    from bptt.lm.model import load_model

    return load_model(path)


def cmd_sample(args) -> int:
    import numpy as np

    from bptt.lm.sample import generate

    model, units, _ = load_any_model(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    out = sys.stdout

    def emit(ch):
        out.write(ch)
        out.flush()

    generate(model, units, args.length, args.temperature, args.top_k, args.prime, args.argmax, rng, on_char=emit)
    emit("\n")
    return 0


def cmd_eval(args) -> int:
    from bptt.lm.data import show_chars
    from bptt.lm.evaluate import evaluate_text
    from bptt.lm.units import as_units

    model, units, _ = load_any_model(args.checkpoint)
    units = as_units(units)
    data = units.read(args.data, args.encoding)  # bytes for a byte model (any encoding), else decoded text
    result = evaluate_text(model, units, data)
    if args.json:
        print(json.dumps(result))
        return 0
    n, unk = result["count"], result["unknown_count"]
    if units.kind == "char" and units.unk_id is None and unk:
        print(f"note: {unk} characters outside the vocabulary were left out: {show_chars(result['unknown'])}",
              file=sys.stderr)
    if units.kind == "word":
        print(f"perplexity {result['perplexity']:.3f} per word ({result['loss']:.4f} nats/word) over {n:,} "
              f"predicted words (<eos> included); {unk:,} unknown words (<unk>)"
              + (f": {show_chars(result['unknown'])}" if unk else ""))
    elif units.kind == "byte":
        print(f"{result['loss']:.4f} nats/byte, {result['bits_per_byte']:.4f} bits/byte over {n:,} predicted bytes; "
              f"{result['nats_per_char']:.4f} nats per character of the decoded text "
              f"({result['nats_per_char'] / math.log(2):.4f} bits/char, {result['decoded_characters']:,} characters); "
              f"0 unknown")
    else:
        print(f"{result['loss']:.4f} nats/char, {result['bits_per_char']:.4f} bits/char, "
              f"perplexity {result['perplexity']:.3f} over {n:,} predicted characters; {unk:,} unknown"
              + (" (<unk>)" if units.unk_id is not None else " (left out)")
              + (f": {show_chars(result['unknown'])}" if unk else ""))
    return 0
