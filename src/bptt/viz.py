"""Plots: the training curve (and, in bptt.inspect, the views inside the network).

matplotlib is imported lazily with the non-interactive Agg backend, so plotting
works on a machine without a display and costs nothing when unused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["plot_training_log", "pyplot"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_log(log_path, png_path) -> None:
    """Train and validation loss (nats/char, with bits/char on the right axis) against step."""
    records = read_log(log_path)
    train = [(r["iter"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    bits = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
    bits.set_ylabel("bits/char")
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
