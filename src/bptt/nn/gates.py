"""The gate layout of the recurrent cells, defined once.

Shape legend: H hidden units, G = g·H stacked gate pre-activations (g gates).

Every recurrent weight of bptt (and of PyTorch) stacks its cell's gates along the
first axis in one fixed order: W_ih (G, D), W_hh (G, P), b_ih and b_hh (G,), and
the per-step pre-activations a_t (N, G).  Gate k of a cell occupies rows
[k·H, (k+1)·H).  The cells, the layers, the compiled kernels and the analyses
read the layout from here.
"""

from __future__ import annotations

__all__ = ["GATES", "gate_count", "gate_slice"]

# mode -> gate names in stacking order (PyTorch's): i input, f forget, g cell candidate,
# o output (LSTM); r reset, z update, n new (GRU); an Elman RNN has the one pre-activation h.
GATES: dict[str, tuple[str, ...]] = {
    "rnn_tanh": ("h",),
    "rnn_relu": ("h",),
    "lstm": ("i", "f", "g", "o"),
    "gru": ("r", "z", "n"),
}


def gate_count(mode: str) -> int:
    """g, the number of stacked gates of ``mode`` (1 RNN, 4 LSTM, 3 GRU)."""
    try:
        return len(GATES[mode])
    except KeyError:
        raise ValueError(f"unknown recurrent mode {mode!r}; expected one of {sorted(GATES)}") from None


def gate_slice(mode: str, name: str, H: int) -> slice:
    """The rows (or columns) of gate ``name`` in a (G, ·) weight or (·, G) pre-activation:
    ``gate_slice("lstm", "f", H) == slice(H, 2 * H)``."""
    names = GATES[mode] if mode in GATES else ()
    if name not in names:
        raise ValueError(f"mode {mode!r} has no gate {name!r}; its gates are {names}")
    k = names.index(name)
    return slice(k * H, (k + 1) * H)
