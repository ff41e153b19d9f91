"""Compare training runs from their log.jsonl files: minutes to reach validation
thresholds, best validation loss, training throughput; and one plot of the
validation curves against wall-clock time.

    python benchmarks/charlm_report.py runs/bptt_default runs/torch_default --png docs/img/charlm_curves.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

THRESHOLDS = (1.70, 1.60, 1.56, 1.50, 1.47)


def load(run: Path):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    # "step"/"items_per_sec" (bptt.trainer's log), or "iter"/"chars_per_sec" (logs written before it)
    val = [(r["time"] / 60, r.get("step", r.get("iter")), r["val_loss"]) for r in records if "val_loss" in r]
    cps = [r.get("items_per_sec", r.get("chars_per_sec")) for r in records
           if "items_per_sec" in r or "chars_per_sec" in r]
    return val, cps


def reached(val, threshold):
    """(minute, step) of the first evaluation at or below ``threshold``, or None."""
    return next(((m, it) for m, it, v in val if v <= threshold), None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the run directories' names)")
    p.add_argument("--lines", nargs="+", type=float, default=list(THRESHOLDS[:3]), help="dotted levels in the plot")
    p.add_argument("--ylim", nargs=2, type=float, default=(1.3, 2.2))
    a = p.parse_args()
    if a.labels and len(a.labels) != len(a.runs):
        p.error(f"--labels: {len(a.labels)} labels for {len(a.runs)} runs")
    header = "| run | best val (nats/char) | at minute | " + " | ".join(f"min to {t}" for t in THRESHOLDS) + " | median chars/s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    curves = {}
    for label, run in zip(a.labels or [run.name for run in a.runs], a.runs):
        val, cps = load(run)
        curves[label] = val
        best = min(val, key=lambda v: v[2])
        hits = [reached(val, t) for t in THRESHOLDS]
        reach = [f"{hit[0]:.1f}" if hit is not None else "—" for hit in hits]
        print(f"| {label} | {best[2]:.4f} | {best[0]:.1f} | " + " | ".join(reach) +
              f" | {statistics.median(cps):,.0f} |")
    if a.png:
        plot_curves([(name, val, {"lw": 1.5}) for name, val in curves.items()], a.png, a.lines, a.ylim)


def plot_curves(series, png, thresholds, ylim):
    """Validation curves against wall-clock minutes: series of (label or None, val records
    from :func:`load`, matplotlib line keywords), dotted lines at the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, val, style in series:
        ax.plot([m for m, _, _ in val], [v for _, _, v in val], label=label, **style)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("wall-clock minutes, evaluation included")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


if __name__ == "__main__":
    main()
