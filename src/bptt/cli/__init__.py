"""The ``bptt`` command: argparse front end, no logic of its own.

    bptt train   [--data FILE] [...]        train a character language model
    bptt sample  CKPT [--length ...]        stream text from a trained model
    bptt eval    CKPT --data FILE [--json]  loss, bits/char and perplexity on any text
    bptt seq2seq train|translate|eval       sequence-to-sequence models
    bptt inspect gradients|units|gates      look inside a network

Every user error (bad file, bad flag value, broken checkpoint) ends in one line
on stderr and exit status 2, with no traceback; a training run that diverges
exits with status 1; Ctrl-C saves (in training) and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields

__all__ = ["main", "build_parser"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_TYPES = {"int": int, "float": float, "str": str, "str | None": str}


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per dataclass field, with the field's type, default, help and choices.

    Defaults are suppressed in the namespace so that the caller can tell which
    options the user actually set (``--resume`` keeps the saved values of the others).
    """
    for f in fields(cls):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if f.type == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {default})")
            continue
        kw = {"type": _TYPES[f.type], "default": argparse.SUPPRESS, "help": f"{help_text} (default: {default})"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), metavar=f.name.upper() if "choices" not in f.metadata else None, **kw)


def build_parser() -> argparse.ArgumentParser:
    from bptt import __version__
    from bptt.lm.train import TrainConfig

    parser = argparse.ArgumentParser(prog="bptt", description="Recurrent networks with hand-derived backpropagation through time.")
    parser.add_argument("--version", action="version", version=f"bptt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a character language model (char-rnn)",
                       description="Train a character-level language model. With no --data it trains on the "
                                   "Python standard library's own source code, which every machine has.")
    add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained model")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train")
    p.add_argument("--length", type=int, default=2000, help="characters to generate (default: 2000)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature: lower is more conservative (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely characters (default: 0 = all)")
    p.add_argument("--prime", default="", help="text to feed the model before sampling")
    p.add_argument("--argmax", action="store_true", help="always take the most likely character")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="loss, bits/char and perplexity of a model on a text")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by bptt train")
    p.add_argument("--data", required=True, help="text file to evaluate on")
    p.add_argument("--encoding", default="utf-8", help="text encoding (default: utf-8)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_eval)

    from bptt.inspect import analyses as introspect
    from bptt.seq2seq import app as seq2seq_cli

    seq2seq_cli.register(sub)
    introspect.register(sub)
    return parser


# ============================================================================ commands


def cmd_train(args) -> int:
    from bptt.lm.train import TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    cfg = TrainConfig(**given)
    train(cfg, explicit=set(given))
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    from bptt.lm.sample import generate
    from bptt.lm.train import load_model

    model, vocab, _ = load_model(args.checkpoint)
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
    from bptt.lm.train import evaluate_text, load_model

    model, vocab, _ = load_model(args.checkpoint)
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


# ============================================================================ entry point


def main(argv=None) -> int:
    from bptt.checkpoint import CheckpointError
    from bptt.lm.data import DataError
    from bptt.nn.module import StateDictError
    from bptt.lm.train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except TrainingError as e:
        print(f"bptt: {e}", file=sys.stderr)
        return 1
    except (DataError, CheckpointError, StateDictError, ValueError, FileNotFoundError) as e:
        print(f"bptt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bptt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bptt sample ... | head`: the reader is gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
