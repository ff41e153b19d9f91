"""``bptt inspect gradients | units | gates | attention``: the command line of :mod:`bptt.inspect`."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from bptt.cli.options import add_out_option
from bptt.inspect.analyses import (
    GATE_NAMES,
    gate_saturation,
    gradient_norms,
    sample_windows,
    text_properties,
    top_predictions,
    trace,
    unit_correlations,
)
from bptt.inspect.attention import attention_maps, attention_page
from bptt.inspect.page import units_page
from bptt.lm.data import DataError, Vocab, default_corpus, read_text

__all__ = ["register", "cmd_gradients", "cmd_units", "cmd_gates", "cmd_attention"]


def _load_text(path, encoding="utf-8", start=0, max_chars=0) -> tuple[str, str]:
    """(text, description): a file, or the built-in corpus when path is None; cut to [start, start + max_chars)."""
    if path is None:
        text, _ = default_corpus()
        what = "the built-in corpus"
    else:
        text, what = read_text(path, encoding), str(path)
    if start < 0 or max_chars < 0:
        raise ValueError("--start and --max-chars must be >= 0")
    if start >= len(text):
        raise DataError(f"--start {start} is past the end of {what} ({len(text):,} characters)")
    end = start + max_chars if max_chars else len(text)
    return text[start:end], what


def _encode_known(vocab: Vocab, text: str, what: str, model_name: str) -> np.ndarray:
    """ids of ``text``; a DataError naming the characters the model has never seen."""
    vocab.require_known(text, what, model_name)
    return vocab.encode(text).astype(np.int64)


def _load_checkpoint(path, dtype=None):
    from bptt.lm.model import load_model

    model, vocab, meta = load_model(path, dtype=dtype)
    if vocab.kind != "char":
        raise ValueError(f"bptt inspect reads character models; {path} predicts {vocab.unit_name}s")
    c = model.config
    it = meta.get("step")
    label = f"{c.model} {c.layers}x{c.hidden} trained" + (f" ({it} steps)" if it is not None else "") + f" [{Path(path).parent.name or path}]"
    return model, vocab, meta, label


def _out_paths(out: str, *suffixes):
    base = Path(out)
    if base.suffix:
        base = base.with_suffix("")
    if base.parent and not base.parent.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
    return [base.with_suffix(s) for s in suffixes]


def _decay_per_step(norms, d0: int = 5) -> float:
    """exp(slope) of a least-squares line through log ‖g‖ against distance, from d0 on (geometric decay per step)."""
    y = np.log(np.maximum(np.asarray(norms[d0:], float), 1e-300))
    if len(y) < 2:
        return math.nan
    return float(math.exp(np.polyfit(np.arange(len(y)), y, 1)[0]))


def cmd_gradients(args) -> int:
    from bptt.lm.model import CharLM, CharLMConfig
    from bptt.viz import plot_gradient_flow

    if not args.checkpoints and not args.model:
        raise ValueError("give checkpoints to compare, or --model rnn|lstm|gru for untrained models (or both)")
    if args.window < 1 or args.batch < 1:
        raise ValueError("--window and --batch must be >= 1")
    text, what = _load_text(args.text, args.encoding)
    models = []
    for path in args.checkpoints:
        model, vocab, _, label = _load_checkpoint(path, dtype="float64")  # float64: tiny norms stay exact
        models.append((label, model, vocab))
    if args.model:
        vocab = Vocab(text)
        for kind in args.model:
            fb = args.forget_bias if kind == "lstm" else 0.0
            cfg = CharLMConfig(len(vocab), kind, args.hidden, args.layers, forget_bias=fb, dtype="float64")
            name = f"{kind} {args.layers}x{args.hidden} untrained" + (f", forget bias +{fb:g}" if fb else "")
            models.append((name, CharLM(cfg, rng=args.seed), vocab))
    results = []
    for label, model, vocab in models:
        ids = _encode_known(vocab, text, what, label)
        x, y = sample_windows(ids, args.window, args.batch, args.seed)  # same positions for every model
        layers = gradient_norms(model, x, y)
        results.append({"name": label, "model": model.config.model, "layers": layers})
    png, csv_path, json_path = _out_paths(args.out, ".png", ".csv", ".json")
    title = f"gradient of the last step's loss, {args.batch} windows of {args.window} characters from {Path(what).name}"
    plot_gradient_flow(results, png, title)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "layer", "state", "distance", "mean_norm"])
        for res in results:
            for row in res["layers"]:
                for state in ("h", "c"):
                    if row[state] is not None:
                        w.writerows([res["name"], row["layer"], state, d, f"{v:.6e}"] for d, v in enumerate(row[state]))
    summary = {"text": what, "window": args.window, "batch": args.batch, "seed": args.seed,
               "loss": "cross-entropy of the last step only", "models": []}
    shown = sorted({0, 10, 50, args.window - 1} & set(range(args.window)))  # distances in the printed table
    print(f"{'model':<44} {'layer':>5} {'state':>5} " + " ".join(f"{f'd={d}':>10}" for d in shown) + f" {'per step':>9}")
    for res in results:
        entry = {"name": res["name"], "layers": []}
        for row in res["layers"]:
            for state in ("h", "c"):
                v = row[state]
                if v is None:
                    continue
                rate = _decay_per_step(v)
                entry["layers"].append({"layer": row["layer"], "state": state, "mean_norm": [float(a) for a in v],
                                        "decay_per_step": rate})
                cells = " ".join(f"{v[d]:>10.3e}" for d in shown)
                print(f"{res['name']:<44} {row['layer']:>5} {state:>5} {cells} {rate:>9.4f}")
        summary["models"].append(entry)
    json_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {png}, {csv_path}, {json_path}", file=sys.stderr)
    return 0


def _check_layer(model, layer):
    L = model.rnn.num_layers
    if layer is None:
        return L - 1
    if not -L <= layer < L:
        raise ValueError(f"--layer {layer} is out of range: the model has {L} layer{'s' * (L > 1)} (0..{L - 1})")
    return layer % L


def _parse_units(spec: str | None, H: int):
    if not spec:
        return None
    try:
        units = [int(u) for u in spec.split(",") if u.strip()]
    except ValueError:
        raise ValueError(f"--units must be comma-separated unit numbers such as 3,17; got {spec!r}") from None
    bad = [u for u in units if not 0 <= u < H]
    if bad:
        raise ValueError(f"--units {', '.join(map(str, bad))}: out of range, the layer has {H} units (0..{H - 1})")
    return list(dict.fromkeys(units))


def cmd_units(args) -> int:
    model, vocab, _, label = _load_checkpoint(args.checkpoint)
    k = _check_layer(model, args.layer)
    if args.kind == "c" and model.config.model != "lstm":
        raise ValueError(f"--kind c needs an LSTM (cell state); this is a {model.config.model}")
    H = model.config.hidden
    units = _parse_units(args.units, H)
    if args.max_chars < 1:
        raise ValueError("--max-chars must be >= 1")
    text, what = _load_text(args.text, args.encoding, args.start, args.max_chars)
    ids = _encode_known(vocab, text, what, label)
    logits, traces = trace(model, ids[:, None])
    act = traces[k].h[:, 0] if args.kind == "h" else np.tanh(traces[k].c[:, 0])  # tanh c: what h sees, in [−1, 1]
    pred_ids, pred_probs = top_predictions(logits[:, 0], 5)
    props = text_properties(text)
    title = f"{label}: layer {k}, {'hidden state h' if args.kind == 'h' else 'cell state tanh(c)'}"
    subtitle = f"{len(text):,} characters of {what} from character {args.start:,}; {H} units"
    page = units_page(text, act, props, pred_ids, pred_probs, vocab.chars, units, args.top, title, subtitle)
    (out,) = _out_paths(args.out, ".html")
    out.write_text(page, encoding="utf-8")
    r = unit_correlations(act, props)
    names = list(props)
    order = np.argsort(-np.abs(r).max(axis=1), kind="stable")[:5]
    for u in order:
        j = int(np.abs(r[u]).argmax())
        print(f"unit {u:>4}: r = {r[u, j]:+.3f} with {names[j]}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_gates(args) -> int:
    from bptt.viz import plot_gate_saturation

    model, vocab, _, label = _load_checkpoint(args.checkpoint)
    mode = model.config.model
    if mode not in GATE_NAMES:
        raise ValueError(f"gates needs an LSTM or GRU; {args.checkpoint} is a vanilla {mode} (no gates)")
    if args.max_chars < 1 or args.streams < 1:
        raise ValueError("--max-chars and --streams must be >= 1")
    text, what = _load_text(args.text, args.encoding, args.start, args.max_chars)
    ids = _encode_known(vocab, text, what, label)
    S = len(ids) // args.streams  # contiguous streams read side by side
    if S < 1:
        raise DataError(f"{what}: {len(ids)} characters cannot fill {args.streams} streams")
    _, traces = trace(model, ids[: S * args.streams].reshape(args.streams, S).T, need_logits=False)
    H = model.config.hidden
    layers = [gate_saturation(t.gates, mode, H) for t in traces]
    png, json_path = _out_paths(args.out, ".png", ".json")
    plot_gate_saturation(layers, png, f"{label}: gate saturation over {S * args.streams:,} characters")
    summary = {"model": label, "text": what, "characters": S * args.streams, "layers": []}
    for k, gates in enumerate(layers):
        entry = {}
        for name, frac in gates.items():
            entry[name] = {"left": frac["left"].round(4).tolist(), "right": frac["right"].round(4).tolist()}
            print(f"layer {k} {name:>7} gate: mean time < 0.1 {frac['left'].mean():.3f}, > 0.9 {frac['right'].mean():.3f}; "
                  f"units right-saturated > half the time: {int((frac['right'] > 0.5).sum())}/{H}, "
                  f"left-saturated: {int((frac['left'] > 0.5).sum())}/{H}")
        summary["layers"].append(entry)
    json_path.write_text(json.dumps(summary) + "\n", encoding="utf-8")
    print(f"wrote {png}, {json_path}", file=sys.stderr)
    return 0


def cmd_attention(args) -> int:
    from bptt.lm.model import load_model

    model, vocab, meta = load_model(args.checkpoint)
    c = model.config
    if getattr(c, "model", None) != "transformer":
        raise ValueError(f"bptt inspect attention needs a transformer char model (bptt train --model transformer); "
                         f"{args.checkpoint} holds a {c.model}")
    if args.prompt is not None:
        text, what = args.prompt, "the prompt"
    else:
        if args.max_chars < 0:
            raise ValueError("--max-chars must be >= 0")
        text, what = _load_text(args.text, args.encoding, args.start, args.max_chars or c.context)
    if not 1 <= len(text) <= c.context:
        raise DataError(f"{what} has {len(text):,} characters; the model attends over 1 to {c.context} "
                        f"(its context): give a shorter one")
    step = meta.get("step")
    label = f"transformer {c.layers}x{c.d_model}, {c.heads} heads" + (f" ({step} steps)" if step is not None else "")
    ids = _encode_known(vocab, text, what, label)
    weights, logits = attention_maps(model, ids)
    pred_ids, pred_probs = top_predictions(logits, 5)
    title = f"{label} [{Path(args.checkpoint).parent.name or args.checkpoint}]: self-attention"
    subtitle = f"{len(text)} characters of {what}; {c.layers} layers x {c.heads} heads"
    page = attention_page(text, weights, title, subtitle, pred_ids, pred_probs, vocab.chars)
    (out,) = _out_paths(args.out, ".html")
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bptt inspect gradients|units|gates|attention`` to the CLI's subparsers."""
    p = subparsers.add_parser("inspect", help="look inside a network: gradient flow, units, gate saturation, attention")
    sub = p.add_subparsers(dest="inspect_command", metavar="{gradients,units,gates,attention}", required=True)

    def text_options(q, default_max):
        q.add_argument("--text", "--data", dest="text",  # --data: the name train and eval give the same file
                       help="text file to run the model on (default: the built-in Python-source corpus)")
        q.add_argument("--encoding", default="utf-8", help="encoding of --text (default: utf-8)")
        if default_max is not None:
            q.add_argument("--start", type=int, default=0, help="character of the text to start at (default: 0)")
            q.add_argument("--max-chars", type=int, default=default_max, help=f"characters to read (default: {default_max})")

    g = sub.add_parser("gradients", help="norm of ∂L_T/∂h_t against T − t, for checkpoints and/or untrained models",
                       description="Backpropagate the loss of the last step of a window and plot the mean norm of "
                                   "the gradient reaching each earlier state, per layer, for several models at once.")
    g.add_argument("checkpoints", nargs="*", help="checkpoints written by bptt train")
    g.add_argument("--model", action="append", choices=("rnn", "lstm", "gru"), default=[],
                   help="add an untrained model with the default init (repeatable)")
    g.add_argument("--hidden", type=int, default=128, help="hidden units of untrained models (default: 128)")
    g.add_argument("--layers", type=int, default=2, help="layers of untrained models (default: 2)")
    g.add_argument("--forget-bias", type=float, default=0.0,
                   help="added to the forget-gate bias of untrained LSTMs, as bptt train --forget-bias (default: 0)")
    g.add_argument("--window", type=int, default=100, help="T, characters per window (default: 100)")
    g.add_argument("--batch", type=int, default=32, help="windows averaged over (default: 32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the untrained weights and of the window positions")
    add_out_option(g, "gradient_flow.png", "PNG path; the CSV and JSON go beside it")
    text_options(g, None)
    g.set_defaults(func=cmd_gradients)

    u = sub.add_parser("units", help="HTML page: text coloured by unit activations, units ranked by what they track")
    u.add_argument("checkpoint")
    text_options(u, 3000)
    u.add_argument("--layer", type=int, default=None, help="layer, 0 = bottom (default: the top layer)")
    u.add_argument("--kind", choices=("h", "c"), default="h", help="hidden state h or LSTM cell state c (default: h)")
    u.add_argument("--units", help="comma-separated units to offer first, e.g. 3,17 (default: the best ranked)")
    u.add_argument("--top", type=int, default=20, help="units in the ranking (default: 20)")
    add_out_option(u, "units.html", "the HTML file to write")
    u.set_defaults(func=cmd_units)

    s = sub.add_parser("gates", help="gate saturation scatter per layer (Karpathy et al. 2015)")
    s.add_argument("checkpoint")
    text_options(s, 20000)
    s.add_argument("--streams", type=int, default=20, help="parallel streams the text is cut into (default: 20)")
    add_out_option(s, "gates.png", "PNG path; the JSON goes beside it")
    s.set_defaults(func=cmd_gates)

    a = sub.add_parser("attention", help="HTML page: every head's attention over a prompt (transformer char models)")
    a.add_argument("checkpoint")
    a.add_argument("--prompt", help="the text to look at (default: --text, cut by --start/--max-chars)")
    text_options(a, 0)  # 0: the model's context
    add_out_option(a, "attention.html", "the HTML file to write")
    a.set_defaults(func=cmd_attention)
    return p
