"""Sampling from a language model, one unit (character, byte, word) at a time.

For logits z (V,) at temperature τ the next character is drawn from

    p = softmax(z / τ)            (τ → 0: argmax;  τ = 1: the model's own distribution)

optionally restricted to the k most likely characters (top-k).  The model runs
through its stateful ``step`` API: the priming text is fed first, then each
drawn character is fed back in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bptt.lm.data import DataError
from bptt.lm.model import model_context
from bptt.lm.units import as_units, encode_prime
from bptt.nn.losses import softmax

__all__ = ["next_char_distribution", "generate"]


def next_char_distribution(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
    """p = softmax(z / τ), zeroed outside the top k (k = 0: no restriction).  logits (V,) → p (V,) float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if top_k and top_k < z.size:
        cutoff = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cutoff, z, -np.inf)
    return softmax(z)


class _Stepper:
    """Feeds one id at a time.  A model with a finite context (a Transformer's key/value cache) slides:
    when the cache is full it restarts from the last half of the context, so generation goes on for
    as long as asked at the cost of re-reading C/2 positions every C/2 characters."""

    def __init__(self, model, context: int | None):
        self.model, self.context, self.history = model, context, []

    def __call__(self, i: int) -> np.ndarray:
        if self.context and len(self.history) == self.context:
            self.history = self.history[-(self.context // 2) :]
            self.model.reset_state()
            for j in self.history:
                self.model.step(np.array([j]))
        if self.context:
            self.history.append(i)
        return self.model.step(np.array([i]))[0]


def generate(
    model,
    vocab,
    length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    prime: str = "",
    argmax: bool = False,
    rng: np.random.Generator | None = None,
    on_char: Callable[[str], None] | None = None,
) -> str:
    """Generate ``length`` units (characters, bytes or words) after ``prime``; returns their text
    (without the prime).

    ``vocab`` is the model's units (:mod:`bptt.lm.units`) or a :class:`bptt.lm.data.Vocab`.
    ``on_char`` is called with the prime, then with the text of each unit as soon as it is drawn
    (streaming): bytes pass through an incremental UTF-8 decoder, so a character is shown once its
    bytes are complete and an invalid sequence shows as ``\\xNN``; words are joined with spaces
    (none before punctuation, a newline for <eos>).  An empty prime starts from a character drawn
    uniformly from the vocabulary (char-rnn's habit), from a newline byte, or from <eos>.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not argmax and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; for the most likely unit at every step use "
                         "argmax (--argmax)")
    if top_k < 0:
        raise ValueError(f"top-k must be >= 0, got {top_k}")
    units = as_units(vocab)
    prime_ids = encode_prime(units, prime)
    context = model_context(model)
    if context and len(prime_ids) > context:
        raise DataError(f"the priming text is {len(prime_ids)} {units.unit_name}s; this model reads at most "
                        f"{context} (its context): give a shorter --prime")
    rng = rng or np.random.default_rng()
    if prime and on_char is not None:
        on_char(prime)
    was_training = model.training
    model.eval()
    model.reset_state()
    try:
        if len(prime_ids):
            ids = prime_ids
        elif units.kind == "char":
            ids = np.array([rng.integers(len(units))])
        else:
            ids = np.array([ord("\n") if units.kind == "byte" else units.eos_id])
        decode = units.decoder()
        if len(prime_ids):
            decode(prime_ids)  # the decoder's state (a word's spacing) continues after the prime
        step = _Stepper(model, context)
        logits = None
        for i in ids:  # prime the state
            logits = step(int(i))
        out = []
        for _ in range(length):
            if argmax:
                nxt = int(np.argmax(logits))
            else:
                p = next_char_distribution(logits, temperature, top_k)
                nxt = int(rng.choice(p.size, p=p))
            piece = decode([nxt])
            out.append(piece)
            if on_char is not None and piece:
                on_char(piece)
            logits = step(nxt)
        tail = decode([], final=True)  # bytes of an unfinished character: shown as \\xNN
        if tail:
            out.append(tail)
            if on_char is not None:
                on_char(tail)
        return "".join(out)
    finally:
        model.reset_state()
        model.train(was_training)
