"""Plots: the training curve (and, in bptt.inspect, the views inside the network).

matplotlib is imported lazily with the non-interactive Agg backend, so plotting
works on a machine without a display and costs nothing when unused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["plot_training_log", "plot_gradient_flow", "plot_gate_saturation", "plot_attention", "plot_attention_heads",
           "pyplot", "read_log"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _step(record: dict) -> int:
    """A log record's step (logs written before the one training loop called it "iter")."""
    return record["step"] if "step" in record else record["iter"]


def _save(fig, plt, png_path) -> None:
    """Write through a temporary file, so a reader never sees half a PNG."""
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)


def plot_training_log(log_path, png_path) -> None:
    """Train and validation loss (nats/char, with bits/char on the right axis) against step.

    When the log holds hidden-state statistics (``h_mean_l0``, ``h_var_l0``, ...
    written by ``--log-hidden-stats``), two panels below show the mean and the
    variance of h per layer against step.
    """
    records = read_log(log_path)
    train = [(_step(r), r["train_loss"]) for r in records if "train_loss" in r]
    val = [(_step(r), r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    hidden = [r for r in records if "h_mean_l0" in r]
    plt = pyplot()
    if hidden:
        fig, (ax, ax_mean, ax_var) = plt.subplots(3, 1, figsize=(7, 8), dpi=100, sharex=True,
                                                  gridspec_kw={"height_ratios": [2, 1, 1]})
        _plot_hidden(hidden, ax_mean, ax_var)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.5, label="validation")
    if not hidden:
        ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    bits = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
    bits.set_ylabel("bits/char")
    fig.tight_layout()
    _save(fig, plt, png_path)


def _plot_hidden(records, ax_mean, ax_var) -> None:
    layers = sorted(int(k[len("h_mean_l"):]) for k in records[0] if k.startswith("h_mean_l"))
    steps = [_step(r) for r in records]
    for k in layers:
        ax_mean.plot(steps, [r.get(f"h_mean_l{k}", math.nan) for r in records], lw=1.2, label=f"layer {k}")
        ax_var.plot(steps, [r.get(f"h_var_l{k}", math.nan) for r in records], lw=1.2, label=f"layer {k}")
    ax_mean.set_ylabel("mean of h")
    ax_var.set_ylabel("variance of h")
    ax_var.set_xlabel("step")
    for a in (ax_mean, ax_var):
        a.grid(alpha=0.3)
    ax_mean.legend(fontsize=8)


def plot_gradient_flow(results: list[dict], png_path, title: str = "") -> None:
    """‖∂L_T/∂h_t‖ (solid) and ‖∂L_T/∂c_t‖ (dashed) against the distance T − t, one panel per layer.

    ``results``: [{"name": label, "layers": [{"layer": k, "h": (T,), "c": (T,) or None}]}],
    one colour per model, log-scale y.
    """
    plt = pyplot()
    n_layers = max(len(r["layers"]) for r in results)
    fig, axes = plt.subplots(1, n_layers, figsize=(5.2 * n_layers, 4.4), dpi=110, sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m, res in enumerate(results):
        col = colours[m % len(colours)]
        for row in res["layers"]:
            ax = axes[0, row["layer"]]
            d = range(len(row["h"]))
            ax.semilogy(d, row["h"], color=col, lw=1.6, label=f"{res['name']}: h")
            if row.get("c") is not None:
                ax.semilogy(d, row["c"], color=col, lw=1.2, ls="--", label=f"{res['name']}: c")
    for k in range(n_layers):
        ax = axes[0, k]
        ax.set_title(f"layer {k}" + (" (bottom)" if k == 0 and n_layers > 1 else "")
                     + (" (top)" if k == n_layers - 1 and n_layers > 1 else ""), fontsize=10)
        ax.set_xlabel("distance T − t (steps back from the loss)")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("mean ‖∂L_T / ∂state_t‖")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8.5, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 4), 1, 1))
    _save(fig, plt, png_path)


def plot_gate_saturation(layers: list[dict], png_path, title: str = "") -> None:
    """Karpathy et al. (2015) Fig. 3: per layer, each gate unit at (fraction of time < 0.1, fraction > 0.9).

    ``layers``: [{gate name: {"left": (H,), "right": (H,)}}], one dict per layer.
    Points can only lie below the diagonal x + y = 1.
    """
    plt = pyplot()
    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 4.4), dpi=110, squeeze=False)
    colours = {"input": "tab:blue", "forget": "tab:green", "output": "tab:red", "reset": "tab:purple", "update": "tab:orange"}
    for k, gates in enumerate(layers):
        ax = axes[0, k]
        ax.plot([0, 1], [1, 0], color="0.8", lw=1, zorder=0)
        for name, frac in gates.items():
            ax.scatter(frac["left"], frac["right"], s=12, alpha=0.65, color=colours.get(name), label=f"{name} gate",
                       edgecolors="none")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_title(f"layer {k}", fontsize=10)
        ax.set_xlabel("fraction of time left-saturated (< 0.1)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("fraction of time right-saturated (> 0.9)")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, plt, png_path)


def plot_attention(weights, src_tokens, out_tokens, path):
    """Heatmap of the attention weights: source tokens on x, output tokens on y."""
    plt = pyplot()
    T, S = weights.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.32 * S + 1.5), max(3, 0.32 * T + 1.2)))
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(S), [repr(t)[1:-1] if t != " " else "␣" for t in src_tokens])
    ax.set_yticks(range(T), out_tokens)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention_heads(weights, src_tokens, out_tokens, path, title="last decoder layer, cross-attention"):
    """A grid of heatmaps, one per head: weights (h, T, S), source tokens on x, output tokens on y."""
    plt = pyplot()
    h, T, S = weights.shape
    cols = min(h, 4)
    rows = -(-h // cols)
    cell_w, cell_h = max(2.5, 0.28 * S + 1.0), max(2.2, 0.28 * T + 0.9)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell_w, rows * cell_h), squeeze=False)
    xt = [repr(t)[1:-1] if t != " " else "␣" for t in src_tokens]
    for j, ax in enumerate(axes.flat):
        if j >= h:
            ax.axis("off")
            continue
        im = ax.imshow(weights[j], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"head {j}", fontsize=9)
        ax.set_xticks(range(S), xt, fontsize=7)
        ax.set_yticks(range(T), out_tokens, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes, fraction=0.02)
    _save(fig, plt, path)
