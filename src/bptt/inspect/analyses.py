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

The per-step gate values are read from the caches of the readable reference
loop (:mod:`bptt.nn.recurrence`), so these functions switch the layer to
``backend = "reference"`` while they run, whatever backend it normally uses.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from bptt.nn.gates import gate_slice
from bptt.nn.recurrence import Weights, sequence_backward
from bptt.lm.data import DataError
from bptt.nn.losses import softmax

__all__ = [
    "LayerTrace",
    "trace",
    "state_gradients",
    "gradient_norms",
    "sample_windows",
    "gate_saturation",
    "text_properties",
    "unit_correlations",
    "top_predictions",
    "PROPERTIES",
    "GATE_NAMES",
]

#: the gates that are sigmoids (the tanh candidate g / n is not a gate)
GATE_NAMES = {"lstm": ("input", "forget", "output"), "gru": ("reset", "update")}
_GATE_LETTERS = {"input": "i", "forget": "f", "output": "o", "reset": "r", "update": "z"}  # bptt.nn.gates' names


# ============================================================================ running the model


@contextmanager
def _reference_loop(model):
    """Run the recurrent layer with the reference loop (per-step caches we can read)."""
    rnn = model.rnn
    if rnn.regularizer is not None:  # its caches are bptt.nn.regularized_loop's, which these analyses do not read
        raise ValueError(f"bptt inspect does not support models with regularised or normalised cells yet ({rnn!r})")
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
    layers = rnn.last_forward_caches()
    traces = []
    for k, (_, directions) in enumerate(layers):
        h = layers[k + 1][0] if k + 1 < len(layers) else output  # the next layer's input: no dropout in eval mode
        steps = directions[0].steps
        c = gates = None
        if rnn.mode == "lstm":
            gates = np.stack([s.gates for s in steps])
            i, f, g = (gates[..., gate_slice("lstm", name, rnn.hidden_size)] for name in ("i", "f", "g"))
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
                h, state = rnn(model.inputs(ids[t0 : t0 + window]), state)
                parts.append(_layer_traces(rnn, h))
                if need_logits:
                    logits.append(model.scores(h))
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
    cell backward functions — :func:`bptt.nn.recurrence.sequence_backward` itself, asked to
    report the carried gradient of every step:

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
    if model.config.adaptive_softmax:
        raise ValueError("gradient flow is implemented for the full softmax (z = h W_decᵀ + b), not an adaptive one")
    was_training = model.training
    model.eval()
    try:
        with _reference_loop(model):
            logits, _ = model.forward(ids, None)
            layers = rnn.last_forward_caches()
    finally:
        model.train(was_training)
    T, N, V = logits.shape
    dz = softmax(logits[-1])  # (N, V)
    dz[np.arange(N), targets] -= 1.0
    dy = np.zeros((T, N, rnn.out_size), logits.dtype)
    dy[-1] = dz @ model.decoder.params["weight"]  # z = h W_decᵀ + b  ⇒  dh = dz W_dec
    out = [None] * rnn.num_layers
    for k in reversed(range(rnn.num_layers)):
        W_ih, _, W_hh, b_hh, _ = rnn.layer_weights(k, 0)
        cache = layers[k][1][0]
        dh_all = np.empty_like(dy)
        dc_all = np.empty((T, N, rnn.hidden_size), dy.dtype) if rnn.mode == "lstm" else None

        def keep(t, dh, dc, steps=cache.steps, dh_all=dh_all, dc_all=dc_all):
            dh_all[t] = dh  # h_t fans out to the layer above and to step t+1
            if dc is not None:  # the whole gradient on c_t, as lstm_step_backward forms it
                o = steps[t].gates[:, gate_slice("lstm", "o", rnn.hidden_size)]
                dc_all[t] = dc + dh * o * (1.0 - steps[t].tanh_c * steps[t].tanh_c)

        dgx, _, _, _, _ = sequence_backward(dy, None, None, cache, Weights(W_hh, b_hh), on_step=keep)
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
    for name in GATE_NAMES[mode]:
        g = flat[:, gate_slice(mode, _GATE_LETTERS[name], hidden)]
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
