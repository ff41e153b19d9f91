"""Evaluating a language model: mean loss over TBPTT windows, and per-unit figures on any text.

Shape legend: T time steps per window, N parallel streams, V vocabulary, L ids of a text.
Evaluation runs the model in eval mode (no dropout) and computes the loss without its gradient:
Σ −log p(y) from the model's own ``nll`` where it has one (a recurrent model: with an adaptive
softmax it evaluates only each target's cluster, the exact log-probability all the same), else
from the logits ``forward`` gives (a Transformer, a model run in ONNX Runtime).
"""

from __future__ import annotations

import numpy as np

from bptt.lm.model import model_context
from bptt.lm.data import DataError, TBPTTBatches
from bptt.lm.units import as_units, lm_metrics
from bptt.nn.losses import cross_entropy
from bptt.nn.module import frozen

__all__ = ["evaluate", "evaluate_ids", "evaluate_text", "summed_nll"]


def summed_nll(model, x, y, state, mask=None) -> tuple[float, object]:
    """(Σ −log p(y | x) over the (T, N) window's counted positions, next state); ``mask`` (T, N) bool."""
    nll = getattr(model, "nll", None)
    if nll is not None:
        return nll(x, y, state, mask=mask)
    logits, state = model.forward(x, state)
    loss, _ = cross_entropy(logits, y, mask=mask, reduction="sum", need_grad=False)
    return float(loss), state


def evaluate(model, batches: TBPTTBatches, max_windows: int = 0, world=None) -> float:
    """Mean loss in nats per unit over the windows of ``batches``, the state carried across them.

    With a data-parallel ``world`` (:mod:`bptt.dist`) each rank runs its own streams
    (columns ``world.shard(N)``) and the sums of losses and units are reduced over ranks.
    """
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    n = len(batches) if not max_windows else min(max_windows, len(batches))
    cols = slice(None) if world is None else world.shard(batches.batch_size)
    with frozen(model):
        for k in range(n):
            x, y = batches.batch(k)
            x, y = x[:, cols], y[:, cols]
            with model.blas_scope(*x.shape):
                loss, state = summed_nll(model, x, y, state)
            total += loss
            count += y.size
    model.train(was_training)
    if world is not None:
        total, count = world.allreduce_sum([total, count])
    return total / max(count, 1)


def evaluate_ids(model, ids: np.ndarray, window: int = 100, streams: int = 32) -> tuple[float, int]:
    """(summed loss in nats, predicted ids) of ``model`` on the (L,) ids: every id but the first.

    The ids are cut into up to ``streams`` contiguous streams read in parallel, each in windows of
    ``window`` steps with the state carried; every id but the first of each stream is predicted from
    all that precedes it in its stream (with fewer than 4·window·2 ids: one stream, i.e. from all
    that precedes it).  The last stream is padded and the padding masked out of the loss.
    """
    ids = np.asarray(ids).astype(np.int64)
    if len(ids) < 2:
        raise DataError(f"need at least 2 known units to evaluate, got {len(ids)}")
    context = model_context(model)
    if context:  # a Transformer reads at most its context at once: windows no longer than that
        window = min(window, context)
    x, y = ids[:-1], ids[1:]
    N = max(1, min(streams, len(x) // (4 * window)))
    S = -(-len(x) // N)  # ceil: stream length
    pad = N * S - len(x)
    valid = np.concatenate([np.ones(len(x), bool), np.zeros(pad, bool)]).reshape(N, S).T  # (S, N)
    x = np.concatenate([x, np.zeros(pad, np.int64)]).reshape(N, S).T
    y = np.concatenate([y, np.zeros(pad, np.int64)]).reshape(N, S).T
    was_training = model.training
    model.eval()
    state, total = None, 0.0
    with frozen(model):
        for t0 in range(0, S, window):
            with model.blas_scope(*x[t0 : t0 + window].shape):
                loss, state = summed_nll(model, x[t0 : t0 + window], y[t0 : t0 + window], state,
                                         mask=valid[t0 : t0 + window])
            total += loss
    model.train(was_training)
    return float(total), int(len(ids) - 1)


def evaluate_text(model, vocab, text, window: int = 100, streams: int = 32) -> dict:
    """Loss of ``model`` on ``text`` (str; bytes for a byte model) in the model's own units.

    ``vocab`` is the model's units (:mod:`bptt.lm.units`) or a :class:`bptt.lm.data.Vocab`.
    Returns loss (nats per unit), bits_per_unit, perplexity, unit, count (predicted units) and
    unknown_count / unknown (units outside the vocabulary), plus the figures usual for the unit:

    * characters: bits_per_char, characters; unseen characters are mapped to <unk> when the
      vocabulary has one, else left out of the text (unknown_chars lists them);
    * bytes: bits_per_byte, bytes, and nats_per_char = total nats / (characters − 1) of the text
      decoded as UTF-8 (invalid bytes count one character each), to compare with a character model;
    * words: words, and perplexity per word (every token, <eos> included, is a predicted word);
      unseen words are <unk> (counted).
    """
    units = as_units(vocab)
    if units.kind == "char" and units.unk_id is None:
        unknown = units.unknown(text)
        unknown_count = 0
        if unknown:  # without <unk>: left out of the text, and reported
            bad = set(unknown)
            unknown_count = sum(1 for ch in text if ch in bad)
            text = "".join(ch for ch in text if ch not in bad)
        enc_ids = units.encode(text)
    else:
        enc = units.encode_counted(text)
        enc_ids, unknown_count, unknown = enc.ids, enc.unknown, enc.unknown_units
    total, count = evaluate_ids(model, enc_ids, window, streams)
    result = lm_metrics(total, count, units)
    result |= {"unknown_count": int(unknown_count), "unknown": [str(u) for u in unknown]}
    if units.kind == "char":
        result |= {"bits_per_char": result["bits_per_unit"], "characters": count, "unknown_chars": unknown}
    elif units.kind == "byte":
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        chars = len(data.decode("utf-8", "replace"))
        result |= {"bits_per_byte": result["bits_per_unit"], "bytes": count,
                   "nats_per_char": total / max(chars - 1, 1), "decoded_characters": chars}
    else:
        result |= {"words": count}
    return result
