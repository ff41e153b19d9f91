"""Looking inside a recurrent network: ``bptt inspect gradients | units | gates``.

Shape legend: T time steps, N batch streams, V vocabulary, H hidden units,
P width of h (P = H: CharLM has no projection), L layers, G = g·H stacked
gates (g = 4 LSTM [i f g o], 3 GRU [r z n]), F text properties.

Three views, each an exact read-out of the hand-written forward and backward:

* **gradients** — how far back a loss reaches.  For a window of T characters,
  take only the loss at the last step, L_T = −log softmax(z_T)[y_T], and
  backpropagate it through the reference loop, recording the gradient that
  arrives at every state:  g_t^{(k)} = ∂L_T/∂h_t^{(k)}  (and ∂L_T/∂c_t^{(k)} for
  the LSTM), the *total* derivative through every path (along layer k and up
  through the layers above).  ‖g_t‖ against the distance T − t, averaged over
  the N windows, shows vanishing (vanilla RNN) or preserved (LSTM/GRU) flow.
* **units** — a self-contained HTML page with the text coloured by one hidden
  (or cell) unit's activation and the units ranked by |Pearson r| with simple
  properties of the text (inside quotes, inside brackets, column, indentation,
  inside a comment), with the model's top predictions on hover.
* **gates** — for each LSTM/GRU layer, the fraction of time each gate unit is
  left-saturated (< 0.1) or right-saturated (> 0.9): the scatter plot of
  Karpathy, Johnson & Fei-Fei, "Visualizing and understanding recurrent
  networks" (2015), Fig. 3.

:func:`hidden_stats` gives the mean and variance of h per layer from the last
forward's cache, for ``bptt train --log-hidden-stats K``.

The per-step gate values are read from the caches of the readable reference
loop (:mod:`bptt.nn.recurrence`), so these functions switch the layer to
``backend = "reference"`` while they run, whatever backend it normally uses.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bptt.nn.cells import gru_step_backward, lstm_step_backward, rnn_step_backward
from bptt.lm.data import DataError, Vocab, default_corpus, read_text, show_chars
from bptt.nn.losses import softmax

__all__ = [
    "register",
    "LayerTrace",
    "trace",
    "state_gradients",
    "gradient_norms",
    "sample_windows",
    "gate_saturation",
    "text_properties",
    "unit_correlations",
    "top_predictions",
    "units_page",
    "PROPERTIES",
    "hidden_stats",
    "GATE_NAMES",
]

#: the gates that are sigmoids (the tanh candidate g / n is not a gate)
GATE_NAMES = {"lstm": ("input", "forget", "output"), "gru": ("reset", "update")}
_GATE_SLOTS = {"lstm": (0, 1, 3), "gru": (0, 1)}  # their blocks in the stacked (N, G) gates


# ============================================================================ running the model


@contextmanager
def _reference_loop(model):
    """Run the recurrent layer with the reference loop (per-step caches we can read)."""
    rnn = model.rnn
    saved = rnn.backend
    rnn.backend = "reference"
    try:
        yield rnn
    finally:
        rnn.backend = saved


class LayerTrace(NamedTuple):
    """What one layer did over a (T, N) batch of characters."""

    h: np.ndarray  # (T, N, P) outputs h_t
    c: np.ndarray | None  # (T, N, H) LSTM cell states c_t
    gates: np.ndarray | None  # (T, N, G) activated gates (LSTM [i f g o], GRU [r z n])


def _layer_traces(rnn, output) -> list[LayerTrace]:
    """Per-layer h, c and gates of the last forward of ``rnn`` (reference backend, eval mode)."""
    ctx = rnn._ctx
    traces = []
    for k, layer in enumerate(ctx.layers):
        h = ctx.layers[k + 1].x if k + 1 < len(ctx.layers) else output  # no dropout in eval mode
        steps = layer.directions[0].steps
        c = gates = None
        if rnn.mode == "lstm":
            gates = np.stack([s.gates for s in steps])
            H = rnn.hidden_size
            i, f, g = gates[..., :H], gates[..., H : 2 * H], gates[..., 2 * H : 3 * H]
            c = f * np.stack([s.c_prev for s in steps]) + i * g  # c_t = f ⊙ c_{t−1} + i ⊙ g
        elif rnn.mode == "gru":
            gates = np.stack([s.gates for s in steps])
        traces.append(LayerTrace(np.array(h), c, gates))
    return traces


def trace(model, ids, window: int = 200, need_logits: bool = True):
    """Run ``model`` (eval mode) over ids (T, N) in windows of ``window`` steps, state carried.

    Returns (logits (T, N, V) or None, [LayerTrace per layer, bottom first], each over all T).
    """
    ids = np.asarray(ids)
    if model.rnn.bidirectional:
        raise ValueError("inspect needs a unidirectional model")
    was_training = model.training
    model.eval()
    state, logits, parts = None, [], []
    try:
        with _reference_loop(model) as rnn:
            for t0 in range(0, ids.shape[0], window):
                # CharLM.forward in eval mode, spelled out to keep the top layer's output
                h, state = rnn(model._inputs(ids[t0 : t0 + window]), state)
                parts.append(_layer_traces(rnn, h))
                if need_logits:
                    logits.append(model.decoder(h))
    finally:
        model.train(was_training)
    traces = []
    for k in range(len(parts[0])):
        fields = zip(*(p[k] for p in parts))  # (h pieces, c pieces, gates pieces)
        traces.append(LayerTrace(*(None if f[0] is None else np.concatenate(f) for f in fields)))
    return (np.concatenate(logits) if need_logits else None), traces


# ============================================================================ gradient flow


def state_gradients(model, ids, targets):
    r"""Exact ∂L_T/∂h_t^{(k)} (and ∂L_T/∂c_t^{(k)}) for every step t and layer k.

    ids (T, N) inputs, targets (N,) the character after each window.  The loss
    is the last step's cross-entropy of each window, summed over windows (so
    row n of each gradient is that of window n's own loss):

        L_T = Σ_n −log softmax(z_{T,n})[y_n],   ∂L_T/∂z_{t,n} = [t = T] (ŷ_{T,n} − onehot(y_n))

    The decoder turns that into ∂L/∂y_t^{(top)} = ∂L/∂z_t W_dec, nonzero at t = T
    only.  Then, per layer from the top, the time loop read backwards with the
    cell backward functions, as :func:`bptt.nn.recurrence.sequence_backward` does,
    but keeping the carried gradient of every step:

        ∂L/∂h_t = ∂L/∂y_t (from above) + dh_t (carried from step t+1)
        ∂L/∂c_t = dc_t (carried) + ∂L/∂h_t ⊙ o_t ⊙ (1 − tanh² c_t)          (LSTM)

    and the layer below receives ∂L/∂y_t^{(k−1)} = dgx_t W_ih^{(k)}.

    Returns a list over layers (bottom first) of (dh (T, N, P), dc (T, N, H) or None).
    """
    ids = np.asarray(ids)
    targets = np.asarray(targets)
    rnn = model.rnn
    if rnn.bidirectional or rnn.proj_size:
        raise ValueError("gradient flow is implemented for unidirectional layers without projection")
    was_training = model.training
    model.eval()
    try:
        with _reference_loop(model):
            logits, _ = model.forward(ids, None)
            ctx = rnn._ctx
    finally:
        model.train(was_training)
    T, N, V = logits.shape
    dz = softmax(logits[-1])  # (N, V)
    dz[np.arange(N), targets] -= 1.0
    dy = np.zeros((T, N, rnn.out_size), logits.dtype)
    dy[-1] = dz @ model.decoder.params["weight"]  # z = h W_decᵀ + b  ⇒  dh = dz W_dec
    out = [None] * rnn.num_layers
    for k in reversed(range(rnn.num_layers)):
        W_ih, _, W_hh, _, _ = rnn._direction_params(k, 0)
        steps = ctx.layers[k].directions[0].steps
        dh_all = np.empty_like(dy)
        dgx = np.empty((T, N, W_hh.shape[0]), dy.dtype)
        dc_all = None
        carry = np.zeros((N, rnn.out_size), dy.dtype)
        if rnn.mode == "lstm":
            H = rnn.hidden_size
            dc_all = np.empty((T, N, H), dy.dtype)
            dc_carry = np.zeros((N, H), dy.dtype)
        for t in reversed(range(T)):
            dh = carry + dy[t]  # h_t fans out to the layer above and to step t+1
            dh_all[t] = dh
            s = steps[t]
            if rnn.mode == "lstm":
                o = s.gates[:, 3 * H :]
                dc_all[t] = dc_carry + dh * o * (1.0 - s.tanh_c * s.tanh_c)  # what lstm_step_backward forms
                dgx[t], carry, dc_carry = lstm_step_backward(dh, dc_carry, s, W_hh)
            elif rnn.mode == "gru":
                dgx[t], _, carry = gru_step_backward(dh, s, W_hh)
            else:
                dgx[t], carry = rnn_step_backward(dh, s, W_hh, rnn.mode[4:])
        out[k] = (dh_all, dc_all)
        dy = dgx @ W_ih  # ∂L/∂(this layer's input) = the output gradient of the layer below
    return out


def gradient_norms(model, ids, targets) -> list[dict]:
    """Mean over windows of ‖∂L_T/∂h_t‖ (and ‖∂L_T/∂c_t‖) per layer, indexed by distance T − t.

    Returns [{"layer": k, "h": (T,) array, "c": (T,) array or None}], element d
    being distance d (d = 0 is the last step).
    """
    res = []
    for k, (dh, dc) in enumerate(state_gradients(model, ids, targets)):
        row = {"layer": k, "h": np.linalg.norm(dh, axis=2).mean(axis=1)[::-1].copy(), "c": None}
        if dc is not None:
            row["c"] = np.linalg.norm(dc, axis=2).mean(axis=1)[::-1].copy()
        res.append(row)
    return res


def sample_windows(ids, window: int, batch: int, seed: int = 0):
    """``batch`` random windows of ``window`` characters and the character after each.

    Returns (x (T, N) int64, y (N,) int64).
    """
    ids = np.asarray(ids)
    if len(ids) < window + 1:
        raise DataError(f"the text has {len(ids)} characters; a window of {window} needs at least {window + 1}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - window, size=batch)
    x = np.stack([ids[s : s + window] for s in starts], axis=1).astype(np.int64)
    y = ids[starts + window].astype(np.int64)
    return x, y


# ============================================================================ gates


def gate_saturation(gates, mode: str, hidden: int, lo: float = 0.1, hi: float = 0.9) -> dict:
    """Fraction of time each gate unit is left-saturated (< lo) or right-saturated (> hi).

    gates: (T, N, G) activated gates of one layer.  Returns
    {gate name: {"left": (H,), "right": (H,)}} over the sigmoid gates of ``mode``.
    """
    flat = gates.reshape(-1, gates.shape[-1])
    out = {}
    for name, slot in zip(GATE_NAMES[mode], _GATE_SLOTS[mode]):
        g = flat[:, slot * hidden : (slot + 1) * hidden]
        out[name] = {"left": (g < lo).mean(axis=0), "right": (g > hi).mean(axis=0)}
    return out


# ============================================================================ units


#: the text properties units are ranked against, with what each one measures
PROPERTIES = {
    "in_quotes": "inside a '…' or \"…\" string (triple quotes span lines)",
    "in_brackets": "inside ( ), [ ] or { }",
    "bracket_depth": "nesting depth of brackets",
    "column": "position in the line (characters since the newline)",
    "indent": "indentation of the current line (leading spaces, tab = 4)",
    "in_comment": "after a # (outside strings) up to the end of the line",
}


def text_properties(text: str) -> dict[str, np.ndarray]:
    """Simple properties of every character of ``text``, each a (T,) float array.

    A small scanner: a quote opens a string that the same delimiter closes
    (backslash escapes; a one-line string also ends at the newline, a
    triple-quoted one does not); ``#`` outside a string starts a comment up to
    the newline; brackets outside strings and comments change the depth (never
    below 0, reset at a blank line so that a stray bracket in prose does not
    last).  Each value describes the text up to and including that character,
    what the state after reading it can know; ``indent`` counts the leading
    whitespace read so far on the line.
    """
    T = len(text)
    props = {name: np.zeros(T) for name in PROPERTIES}
    quote, closing, escaped, skip = None, False, False, -1  # skip: last index of a multi-char delimiter
    comment, depth, col, indent, at_line_start, prev = False, 0, 0, 0, True, ""
    for i, ch in enumerate(text):
        if ch == "\n":
            comment = escaped = False
            if quote is not None and len(quote) == 1:
                quote, closing = None, False
            if prev == "\n":
                depth = 0
            col, indent, at_line_start = 0, 0, True
        else:
            col += 1
            if at_line_start and ch in " \t":
                indent += 4 if ch == "\t" else 1
            else:
                at_line_start = False
        if i <= skip or ch == "\n":
            pass
        elif quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif text.startswith(quote, i):
                closing, skip = True, i + len(quote) - 1
        elif comment:
            pass
        elif ch == "#":
            comment = True
        elif ch in "'\"":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            skip = i + len(quote) - 1
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        props["in_quotes"][i] = quote is not None
        props["in_comment"][i] = comment
        props["bracket_depth"][i] = depth
        props["column"][i] = col
        props["indent"][i] = indent
        if closing and i >= skip:  # the closing delimiter still belongs to the string
            quote, closing = None, False
        prev = ch
    props["in_brackets"] = (props["bracket_depth"] > 0).astype(float)
    return props


def unit_correlations(act, props: dict[str, np.ndarray]) -> np.ndarray:
    """Pearson r between every unit and every property: act (T, H), props F × (T,) → (H, F).

    r = Σ (a − ā)(p − p̄) / (‖a − ā‖ ‖p − p̄‖);  0 where either is constant over the text
    (a property that never changes, such as comments in prose, ranks nothing).
    """
    a = act - act.mean(axis=0)
    P = np.stack([p - p.mean() for p in props.values()], axis=1)  # (T, F)
    num = a.T @ P  # (H, F)
    den = np.linalg.norm(a, axis=0)[:, None] * np.linalg.norm(P, axis=0)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return r


def top_predictions(logits, k: int = 5):
    """The k most likely next characters at every step: logits (T, V) → ids (T, k), probabilities (T, k)."""
    p = softmax(logits.astype(np.float64))
    k = min(k, p.shape[1])
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(p, ids, axis=1)


def _script_json(obj) -> str:
    """JSON that is safe inside <script>: no '<' can close the element early."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def units_page(text: str, act, props: dict[str, np.ndarray], pred_ids, pred_probs, vocab_chars,
               units=None, top: int = 20, title: str = "", subtitle: str = "") -> str:
    """A self-contained HTML page: text coloured by unit activations, units ranked, predictions on hover.

    text: T characters; act (T, H) activations in [−1, 1] (h, or tanh c) after reading each
    character; props F × (T,); pred_ids / pred_probs (T, k) the top next-character predictions.
    ``units``: the units to offer first (default: the ``top`` best ranked).  The page embeds the
    activations of the ranked units and the chosen ones only, rounded to 0.01.
    """
    chars = list(text)
    T, H = act.shape
    if len(chars) != T:
        raise ValueError(f"text has {len(chars)} characters but activations have {T} rows")
    r = unit_correlations(act, props)  # (H, F)
    names = list(props)
    best = np.abs(r).argmax(axis=1)  # each unit's best property
    score = np.abs(r)[np.arange(H), best]
    order = [int(u) for u in np.argsort(-score, kind="stable")[:top]]
    chosen = [int(u) for u in units] if units else order[:5]
    per_prop = []
    for j, n in enumerate(names):
        if not np.any(r[:, j]):
            per_prop.append({"prop": n, "unit": None, "r": 0.0})
            continue
        u = int(np.abs(r[:, j]).argmax())
        per_prop.append({"prop": n, "unit": u, "r": round(float(r[u, j]), 3)})
    shown = list(dict.fromkeys(chosen + order + [p["unit"] for p in per_prop if p["unit"] is not None]))
    ranking = [{"unit": u, "prop": names[best[u]], "r": round(float(r[u, best[u]]), 3),
                "all": {n: round(float(r[u, j]), 3) for j, n in enumerate(names)}} for u in shown]
    data = {
        "title": title, "subtitle": subtitle, "text": text, "vocab": list(vocab_chars),
        "acts": {str(u): np.rint(np.clip(act[:, u], -1, 1) * 100).astype(int).tolist() for u in shown},
        "chosen": chosen, "ranked": order, "ranking": ranking, "perProp": per_prop, "props": PROPERTIES,
        "predIds": np.asarray(pred_ids).tolist(),
        "predProbs": np.rint(np.asarray(pred_probs) * 1000).astype(int).tolist(),
    }
    return _PAGE.replace("__TITLE__", html.escape(title or "bptt inspect units")).replace("__DATA__", _script_json(data))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --pos: 214, 39, 40; --neg: 31, 119, 180; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; background: #fafafa; }
  header { padding: 10px 16px; background: #fff; border-bottom: 1px solid #ddd; position: sticky; top: 0; z-index: 2; }
  header h1 { font-size: 17px; margin: 0 0 2px; }
  header .sub { color: #666; font-size: 12.5px; }
  #current { margin-top: 6px; font-size: 14px; }
  .legend { display: inline-flex; align-items: center; gap: 6px; margin-left: 14px; font-size: 12px; color: #555; vertical-align: middle; }
  .legend .bar { width: 160px; height: 12px; border: 1px solid #ccc;
    background: linear-gradient(to right, rgb(var(--neg)), #fff, rgb(var(--pos))); }
  .wrap { display: flex; align-items: flex-start; }
  aside { width: 330px; flex: none; padding: 10px 12px; position: sticky; top: 78px; max-height: calc(100vh - 80px); overflow-y: auto; }
  main { flex: 1; min-width: 0; padding: 10px 16px; }
  #text { font: 13px/1.55 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap;
    word-break: break-all; background: #fff; border: 1px solid #ddd; padding: 10px 12px; margin: 0; }
  #text span { cursor: default; }
  #text span.hl { outline: 2px solid #111; }
  h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: #555; margin: 12px 0 6px; }
  table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
  th, td { text-align: left; padding: 2px 5px; border-bottom: 1px solid #eee; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.unit { cursor: pointer; }
  tr.unit:hover { background: #f0f0f0; }
  tr.sel { background: #ffe9a8 !important; }
  .rbar { display: inline-block; height: 8px; background: #888; vertical-align: middle; }
  .chips button { font: inherit; font-size: 12px; margin: 0 4px 4px 0; padding: 2px 8px; border: 1px solid #bbb;
    border-radius: 10px; background: #fff; cursor: pointer; }
  .chips button.sel { background: #222; color: #fff; border-color: #222; }
  #tip { position: absolute; display: none; z-index: 5; background: #fff; border: 1px solid #999; border-radius: 4px;
    box-shadow: 0 2px 8px rgba(0,0,0,.2); padding: 6px 8px; font-size: 12px; min-width: 190px; pointer-events: none; }
  #tip .c { font-family: ui-monospace, "DejaVu Sans Mono", monospace; background: #eee; padding: 0 3px; }
  #tip table td { border: none; padding: 1px 4px; }
  #tip tr.next td { font-weight: bold; }
  .pbar { display: inline-block; height: 8px; background: #6a9; vertical-align: middle; }
  .note { color: #777; font-size: 12px; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div class="sub" id="subtitle"></div>
  <div id="current"></div>
</header>
<div class="wrap">
  <aside>
    <h2>Chosen units</h2>
    <div class="chips" id="chips"></div>
    <h2>Units ranked by |r| with a text property</h2>
    <table id="ranking"><thead><tr><th>unit</th><th>tracks</th><th class="num">r</th><th></th></tr></thead><tbody></tbody></table>
    <h2>Best unit per property</h2>
    <table id="perprop"><thead><tr><th>property</th><th>unit</th><th class="num">r</th></tr></thead><tbody></tbody></table>
    <p class="note">r: Pearson correlation over this text between the unit's activation after each character and the
    property at that character. Hover a character for the model's top predictions of the next one.</p>
  </aside>
  <main><pre id="text"></pre></main>
</div>
<div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
(function () {
  var D = JSON.parse(document.getElementById("data").textContent);
  var chars = Array.from(D.text);
  var textEl = document.getElementById("text"), tip = document.getElementById("tip");
  var spans = [], current = null, info = {};
  D.ranking.forEach(function (r) { info[r.unit] = r; });

  function show(ch) {
    if (ch === "\\n") return "\\\\n";
    if (ch === "\\t") return "\\\\t";
    if (ch === " ") return "\\u2423";
    return ch;
  }
  function colour(v) {  // v in [-1, 1]: blue for negative, red for positive
    var a = Math.min(1, Math.abs(v)) * 0.9;
    return "rgba(" + (v >= 0 ? "214,39,40" : "31,119,180") + "," + a.toFixed(3) + ")";
  }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  document.getElementById("title").textContent = D.title;
  document.getElementById("subtitle").textContent = D.subtitle;
  var frag = document.createDocumentFragment();
  chars.forEach(function (ch, i) {
    var s = el("span", ch);
    s.dataset.i = i;
    spans.push(s);
    frag.appendChild(s);
  });
  textEl.appendChild(frag);

  var chips = document.getElementById("chips");
  D.chosen.forEach(function (u) {
    var b = el("button", "unit " + u);
    b.dataset.unit = u;
    b.addEventListener("click", function () { select(u); });
    chips.appendChild(b);
  });
  var tbody = document.querySelector("#ranking tbody");
  D.ranked.forEach(function (u) {
    var r = info[u], tr = el("tr", undefined, "unit");
    tr.dataset.unit = u;
    tr.appendChild(el("td", String(u)));
    tr.appendChild(el("td", r.prop));
    tr.appendChild(el("td", (r.r >= 0 ? "+" : "") + r.r.toFixed(2), "num"));
    var td = el("td"), bar = el("span", undefined, "rbar");
    bar.style.width = Math.round(Math.abs(r.r) * 60) + "px";
    td.appendChild(bar);
    tr.appendChild(td);
    tr.title = Object.keys(r.all).map(function (k) { return k + ": " + r.all[k].toFixed(2); }).join("\\n");
    tr.addEventListener("click", function () { select(u); });
    tbody.appendChild(tr);
  });
  var pbody = document.querySelector("#perprop tbody");
  D.perProp.forEach(function (p) {
    var tr = el("tr", undefined, p.unit === null ? "" : "unit");
    tr.appendChild(el("td", p.prop));
    tr.appendChild(el("td", p.unit === null ? "(constant here)" : String(p.unit)));
    tr.appendChild(el("td", p.unit === null ? "" : (p.r >= 0 ? "+" : "") + p.r.toFixed(2), "num"));
    tr.title = D.props[p.prop];
    if (p.unit !== null && D.acts[p.unit]) {
      tr.dataset.unit = p.unit;
      tr.addEventListener("click", function () { select(p.unit); });
    }
    pbody.appendChild(tr);
  });

  function select(u) {
    var a = D.acts[u];
    if (!a) return;
    current = u;
    for (var i = 0; i < spans.length; i++) spans[i].style.backgroundColor = colour(a[i] / 100);
    document.querySelectorAll("[data-unit]").forEach(function (e) {
      e.classList.toggle("sel", String(e.dataset.unit) === String(u));
    });
    var r = info[u], cur = document.getElementById("current");
    cur.textContent = "";
    cur.appendChild(el("b", "unit " + u));
    cur.appendChild(document.createTextNode(r ? "  tracks " + r.prop + " \u2014 " + D.props[r.prop] + ": r = " +
      (r.r >= 0 ? "+" : "") + r.r.toFixed(2) : ""));
    var lg = el("span", undefined, "legend");
    lg.appendChild(document.createTextNode("\\u22121"));
    lg.appendChild(el("span", undefined, "bar"));
    lg.appendChild(document.createTextNode("+1"));
    cur.appendChild(lg);
  }

  function tipFor(i) {
    tip.textContent = "";
    var head = el("div");
    head.appendChild(document.createTextNode("after "));
    head.appendChild(el("span", show(chars[i]), "c"));
    head.appendChild(document.createTextNode(" (char " + i + ")"));
    tip.appendChild(head);
    if (current !== null) tip.appendChild(el("div", "unit " + current + " = " + (D.acts[current][i] / 100).toFixed(2)));
    var t = el("table"), next = i + 1 < chars.length ? chars[i + 1] : null;
    D.predIds[i].forEach(function (id, k) {
      var p = D.predProbs[i][k] / 1000, ch = D.vocab[id];
      var tr = el("tr", undefined, ch === next ? "next" : "");
      var c1 = el("td"); c1.appendChild(el("span", show(ch), "c"));
      tr.appendChild(c1);
      var c2 = el("td"), b = el("span", undefined, "pbar");
      b.style.width = Math.round(p * 80) + "px";
      c2.appendChild(b);
      tr.appendChild(c2);
      tr.appendChild(el("td", p.toFixed(3), "num"));
      t.appendChild(tr);
    });
    tip.appendChild(el("div", "next-character predictions:", "note"));
    tip.appendChild(t);
    if (next !== null) {
      var n = el("div", "actual next: ", "note");
      n.appendChild(el("span", show(next), "c"));
      tip.appendChild(n);
    }
    tip.style.display = "block";
  }
  function place(x, y) {
    var w = tip.offsetWidth, maxX = window.scrollX + document.documentElement.clientWidth - w - 8;
    tip.style.left = Math.max(4, Math.min(x + 14, maxX)) + "px";
    tip.style.top = (y + 18) + "px";
  }
  var lit = null;
  textEl.addEventListener("mouseover", function (e) {
    var s = e.target;
    if (!s.dataset || s.dataset.i === undefined) return;
    if (lit) lit.classList.remove("hl");
    lit = s; s.classList.add("hl");
    tipFor(+s.dataset.i);
    place(e.pageX, e.pageY);
  });
  textEl.addEventListener("mousemove", function (e) { if (tip.style.display === "block") place(e.pageX, e.pageY); });
  textEl.addEventListener("mouseleave", function () {
    tip.style.display = "none";
    if (lit) { lit.classList.remove("hl"); lit = null; }
  });

  // #unit=17&char=120 selects a unit and pins the hover panel at a character (for links and screenshots)
  var q = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (kv) { var p = kv.split("="); if (p[1]) q[p[0]] = p[1]; });
  select(q.unit !== undefined && D.acts[q.unit] ? +q.unit : D.chosen[0]);
  if (q.char !== undefined && spans[+q.char]) {
    var s = spans[+q.char], box = s.getBoundingClientRect();
    s.classList.add("hl"); lit = s;
    tipFor(+q.char);
    place(box.left + window.scrollX, box.top + window.scrollY);
  }
})();
</script>
</body>
</html>
"""


# ============================================================================ hidden-state statistics


def hidden_stats(model) -> dict[str, float]:
    """Mean and variance of h per layer over the last forward, read from its cache (no extra work).

    Uses ``SequenceCache.h_prev`` (T, N, P), the states h_{t−1} entering the T
    steps (the carried state and the first T−1 outputs), which every backend
    keeps for ∂L/∂W_hh and which is taken before inter-layer dropout.
    Returns {"h_mean_l0": …, "h_var_l0": …, "h_mean_l1": …, …}.
    """
    rnn = getattr(model, "rnn", model)
    ctx = getattr(rnn, "_ctx", None)
    if ctx is None:
        raise ValueError("hidden_stats needs a forward pass first (the layer has no cache)")
    out = {}
    parts = [sub for _, sub in ctx.parts] or [ctx]  # batch slices run in threads: their rows, in order
    for k in range(len(parts[0].layers)):
        h = np.concatenate([np.concatenate([d.h_prev for d in p.layers[k].directions], axis=-1) for p in parts], axis=1)
        out[f"h_mean_l{k}"] = float(h.mean())
        out[f"h_var_l{k}"] = float(h.var())
    return out


# ============================================================================ the command


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
    unknown = vocab.unknown(text)
    if unknown:
        count = sum(text.count(c) for c in unknown)
        raise DataError(f"{what} has {count} characters outside the vocabulary of {model_name} "
                        f"({len(unknown)} distinct: {show_chars(unknown)})")
    return vocab.encode(text).astype(np.int64)


def _load_checkpoint(path, dtype=None):
    from bptt.lm.train import load_model

    model, vocab, meta = load_model(path, dtype=dtype)
    c = model.config
    it = meta.get("iteration")
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


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bptt inspect gradients|units|gates`` to the CLI's subparsers."""
    p = subparsers.add_parser("inspect", help="look inside a network: gradient flow, units, gate saturation")
    sub = p.add_subparsers(dest="inspect_command", metavar="{gradients,units,gates}", required=True)

    def text_options(q, default_max):
        q.add_argument("--text", help="text file to run the model on (default: the built-in Python-source corpus)")
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
    g.add_argument("--out", default="gradient_flow.png", help="PNG path; the CSV and JSON go beside it")
    text_options(g, None)
    g.set_defaults(func=cmd_gradients)

    u = sub.add_parser("units", help="HTML page: text coloured by unit activations, units ranked by what they track")
    u.add_argument("checkpoint")
    text_options(u, 3000)
    u.add_argument("--layer", type=int, default=None, help="layer, 0 = bottom (default: the top layer)")
    u.add_argument("--kind", choices=("h", "c"), default="h", help="hidden state h or LSTM cell state c (default: h)")
    u.add_argument("--units", help="comma-separated units to offer first, e.g. 3,17 (default: the best ranked)")
    u.add_argument("--top", type=int, default=20, help="units in the ranking (default: 20)")
    u.add_argument("--out", default="units.html", help="the HTML file to write (default: units.html)")
    u.set_defaults(func=cmd_units)

    s = sub.add_parser("gates", help="gate saturation scatter per layer (Karpathy et al. 2015)")
    s.add_argument("checkpoint")
    text_options(s, 20000)
    s.add_argument("--streams", type=int, default=20, help="parallel streams the text is cut into (default: 20)")
    s.add_argument("--out", default="gates.png", help="PNG path; the JSON goes beside it")
    s.set_defaults(func=cmd_gates)
    return p
