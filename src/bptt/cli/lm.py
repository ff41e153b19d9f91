"""``bptt train | sample | eval``: the command line of the language model (:mod:`bptt.lm`)."""

from __future__ import annotations

import json
import sys

from bptt.cli.options import add_dataclass_options
from bptt.lm.train import TrainConfig

__all__ = ["register", "cmd_train", "cmd_sample", "cmd_eval"]


def register(sub) -> None:
    p = sub.add_parser("train", help="train a character language model (char-rnn)",
                       description="Train a character-level language model. With no --data it trains on the "
                                   "Python standard library's own source code, which every machine has.")
    add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained model")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train, or its .onnx export")
    p.add_argument("--length", type=int, default=2000, help="characters to generate (default: 2000)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature: lower is more conservative (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely characters (default: 0 = all)")
    p.add_argument("--prime", default="", help="text to feed the model before sampling")
    p.add_argument("--argmax", action="store_true", help="always take the most likely character")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="loss, bits/char and perplexity of a model on a text")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train, or its .onnx export")
    p.add_argument("--data", required=True, help="text file to evaluate on")
    p.add_argument("--encoding", default="utf-8", help="text encoding (default: utf-8)")
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

    model, vocab, _ = load_any_model(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    out = sys.stdout

    def emit(ch):
        out.write(ch)
        out.flush()

    generate(model, vocab, args.length, args.temperature, args.top_k, args.prime, args.argmax, rng, on_char=emit)
    emit("\n")
    return 0


def cmd_eval(args) -> int:
    from bptt.lm.data import read_text
    from bptt.lm.evaluate import evaluate_text

    model, vocab, _ = load_any_model(args.checkpoint)
    text = read_text(args.data, args.encoding)
    result = evaluate_text(model, vocab, text)
    if args.json:
        print(json.dumps(result))
    else:
        if result["unknown_chars"]:
            from bptt.lm.data import show_chars

            print(f"note: {result['unknown_count']} characters outside the vocabulary were left out: "
                  f"{show_chars(result['unknown_chars'])}", file=sys.stderr)
        print(f"{result['loss']:.4f} nats/char, {result['bits_per_char']:.4f} bits/char, "
              f"perplexity {result['perplexity']:.3f} over {result['characters']:,} predicted characters")
    return 0
