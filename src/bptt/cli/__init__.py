"""The ``bptt`` command: one parser, one error map, a module per application.

    bptt train   [--data FILE] [...]        train a character language model      (bptt.cli.lm)
    bptt sample  CKPT [--length ...]        stream text from a trained model
    bptt eval    CKPT --data FILE [--json]  loss, bits/char and perplexity on any text
    bptt seq2seq train|translate|eval       sequence-to-sequence models           (bptt.cli.seq2seq)
    bptt inspect gradients|units|gates      look inside a network                 (bptt.cli.inspect)
    bptt export  CKPT --out F.onnx          a char model as an ONNX file           (bptt.cli.export)

Every user error (bad file, bad flag value, broken checkpoint) ends in one line
on stderr and exit status 2, with no traceback; a training run that diverges
exits with status 1; Ctrl-C saves (in training) and exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from bptt import __version__
    from bptt.cli import export, inspect, lm, seq2seq

    parser = argparse.ArgumentParser(prog="bptt", description="Sequence models with hand-derived backpropagation through time.")
    parser.add_argument("--version", action="version", version=f"bptt {__version__}")
    parser.add_argument("--no-verify", action="store_true",
                        help="load checkpoints whose SHA-256 digest does not match (for inspecting a damaged file)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    lm.register(sub)
    seq2seq.register(sub)
    inspect.register(sub)
    export.register(sub)
    return parser


def _notes(show_other):
    """A ``warnings.showwarning`` that prints warnings meant for the user (an old checkpoint without a digest)
    as one ``bptt: note:`` line and passes the others on."""
    from bptt.checkpoint import UnverifiedCheckpointWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnverifiedCheckpointWarning):
            print(f"bptt: note: {message}", file=sys.stderr)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


def main(argv=None) -> int:
    import warnings

    from bptt.checkpoint import CheckpointError, UnverifiedCheckpointWarning, set_default_verify
    from bptt.lm.data import DataError
    from bptt.nn.module import StateDictError
    from bptt.trainer import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    set_default_verify(not args.no_verify)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UnverifiedCheckpointWarning)
            warnings.showwarning = _notes(warnings.showwarning)
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
    finally:
        set_default_verify(True)
