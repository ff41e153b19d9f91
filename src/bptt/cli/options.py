"""Command-line options generated from a configuration dataclass (one contract: dataclass → flags → JSON
next to every checkpoint), and the options every command spells the same way."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

__all__ = ["add_dataclass_options", "add_out_option"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "int | None": int}


def add_dataclass_options(parser: argparse.ArgumentParser, cls, suppress: bool = True) -> None:
    """One option per dataclass field, with the field's type, default, help and choices.

    With ``suppress`` the defaults are left out of the namespace so that the caller can tell which
    options the user actually set (``bptt train --resume`` keeps the saved values of the others).
    """
    for f in fields(cls):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        ns_default = argparse.SUPPRESS if suppress else default
        if f.type == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=ns_default,
                                help=f"{help_text} (default: {default})")
            continue
        kw = {"type": _TYPES[f.type], "default": ns_default, "help": f"{help_text} (default: {default})"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), metavar=f.name.upper() if "choices" not in f.metadata else None, **kw)


def add_out_option(parser: argparse.ArgumentParser, default=None, help_text="where to write the output") -> None:
    """``--out``/``-o``: the one spelling of "where the output goes" in every command."""
    parser.add_argument("--out", "-o", default=default, help=help_text + (f" (default: {default})" if default else ""))
