"""How a configuration's numbers are checked, defined once for every command.

Each rule names the fields it applies to and returns the problems found, phrased as the flag the user
typed (``--lr must be a finite number > 0, got -1.0``); a config's ``validate()`` joins them into one
line.  The learning rate, for one, is checked here and nowhere else: > 0 on every training path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields

__all__ = ["flag", "check_fields", "DictConfig"]


class DictConfig:
    """The config contract, for a dataclass: ``to_dict()`` gives the JSON-able dict saved next to every
    checkpoint, ``from_dict(d)`` rebuilds the config from it, ignoring keys it does not know."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(cfg, *, positive_ints=(), nonneg_ints=(), positive_floats=(), nonneg_floats=(),
                 rates=(), probabilities=()) -> list[str]:
    """Problems with ``cfg``'s fields: whole numbers ≥ 1 / ≥ 0, finite numbers > 0 / ≥ 0, rates in [0, 1),
    probabilities in [0, 1]."""
    problems = []
    for name in positive_ints:
        if getattr(cfg, name) < 1:
            problems.append(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in nonneg_ints:
        if getattr(cfg, name) < 0:
            problems.append(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in positive_floats:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            problems.append(f"{flag(name)} must be a finite number > 0, got {v}")
    for name in nonneg_floats:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            problems.append(f"{flag(name)} must be a finite number >= 0, got {v}")
    for name in rates:
        if not 0.0 <= getattr(cfg, name) < 1.0:
            problems.append(f"{flag(name)} must be in [0, 1), got {getattr(cfg, name)}")
    for name in probabilities:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            problems.append(f"{flag(name)} must be in [0, 1], got {getattr(cfg, name)}")
    return problems
