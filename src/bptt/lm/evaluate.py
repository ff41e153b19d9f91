"""Evaluating a language model: mean loss over TBPTT windows, and nats/bits per character on any text.

Shape legend: T time steps per window, N parallel streams, V vocabulary.  Evaluation runs the model
in eval mode (no dropout) and computes the loss without its gradient.
"""

from __future__ import annotations

import math

import numpy as np

from bptt.lm.data import DataError, TBPTTBatches, Vocab
from bptt.nn.losses import cross_entropy

__all__ = ["evaluate", "evaluate_text"]


def evaluate(model, batches: TBPTTBatches, max_windows: int = 0) -> float:
    """Mean loss in nats/char over the windows of ``batches``, the state carried across them."""
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    n = len(batches) if not max_windows else min(max_windows, len(batches))
    for k in range(n):
        x, y = batches.batch(k)
        with model.blas_scope(*x.shape):
            logits, state = model.forward(x, state)
            loss, _ = cross_entropy(logits, y, reduction="sum", need_grad=False)
        total += loss
        count += y.size
    model.train(was_training)
    return total / max(count, 1)


def evaluate_text(model, vocab: Vocab, text: str, window: int = 100, streams: int = 32) -> dict:
    """Loss of ``model`` on ``text``: nats/char, bits/char, perplexity.

    Characters outside the vocabulary are left out of the text and reported
    (count and which).  The text is cut into up to ``streams`` contiguous
    streams read in parallel, each in windows of ``window`` steps with the state
    carried; every character but the first of each stream is predicted from
    all that precedes it in its stream.  The last stream is padded and the
    padding masked out of the loss, so no character is skipped.
    """
    unknown = vocab.unknown(text)
    unknown_count = 0
    if unknown:
        bad = set(unknown)
        unknown_count = sum(1 for ch in text if ch in bad)
        text = "".join(ch for ch in text if ch not in bad)
    context = getattr(getattr(model, "config", None), "context", None)
    if context:  # a Transformer reads at most its context at once: windows no longer than that
        window = min(window, context)
    ids = vocab.encode(text).astype(np.int64)
    if len(ids) < 2:
        raise DataError(f"need at least 2 known characters to evaluate, got {len(ids)}")
    x, y = ids[:-1], ids[1:]
    N = max(1, min(streams, len(x) // (4 * window)))
    S = -(-len(x) // N)  # ceil: stream length
    pad = N * S - len(x)
    valid = np.concatenate([np.ones(len(x), bool), np.zeros(pad, bool)]).reshape(N, S).T  # (S, N)
    x = np.concatenate([x, np.zeros(pad, np.int64)]).reshape(N, S).T
    y = np.concatenate([y, np.zeros(pad, np.int64)]).reshape(N, S).T
    model.eval()
    state, total = None, 0.0
    for t0 in range(0, S, window):
        with model.blas_scope(*x[t0 : t0 + window].shape):
            logits, state = model.forward(x[t0 : t0 + window], state)
            loss, _ = cross_entropy(logits, y[t0 : t0 + window], mask=valid[t0 : t0 + window], reduction="sum",
                                    need_grad=False)
        total += loss
    nats = total / len(ids[1:])
    return {"loss": nats, "bits_per_char": nats / math.log(2), "perplexity": math.exp(nats),
            "characters": int(len(ids) - 1), "unknown_count": unknown_count, "unknown_chars": unknown}
