"""Where a Transformer character model looks: every head's attention over a prompt, as a page.

Shape legend: T prompt characters (T ≤ C, the model's context), L layers, h heads, E d_model, V vocabulary.

:func:`attention_maps` runs :class:`bptt.lm.transformer.TransformerLM`'s forward on one prompt layer by
layer, asking each layer's own ``MultiheadAttention`` for its per-head weights (``need_weights=True,
average_attn_weights=False``), so the weights are those the model computes, not a re-derivation::

    a[l, j, t, s] = softmax_s(q_t · k_s / √d  with s ≤ t)      layer l, head j: query t, key s   (L, h, T, T)

and returns the logits too (equal to ``model.forward``'s, which tests check).  :func:`attention_page`
writes them into the page template ``templates/attention.html`` (package data): pick a layer and a head
(or the mean of the heads), hover a character to see where it attends.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources

import numpy as np

from bptt.nn.multihead import causal_mask

__all__ = ["attention_maps", "attention_page"]


def attention_maps(model, ids) -> tuple[np.ndarray, np.ndarray]:
    """ids (T,) → (weights (L, h, T, T), logits (T, V)) for a :class:`TransformerLM` in eval mode."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    T = ids.shape[0]
    if not 1 <= T <= model.config.context:
        raise ValueError(f"the prompt has {T} characters; the model reads 1 to {model.config.context} at once")
    was_training = model.training
    model.eval()
    try:
        x = model.pos(model.embed(ids[:, None]))  # (T, 1, E) token + position embeddings
        mask = causal_mask(T)
        maps = []
        for layer in model.encoder.layers:
            if not layer.norm_first:  # TransformerLM's blocks are pre-norm; a guard, not a second code path
                raise ValueError("attention_maps reads pre-norm blocks (TransformerLM's)")
            z = layer.norm1(x)
            out, w = layer.self_attn(z, z, z, attn_mask=mask, need_weights=True, average_attn_weights=False)
            maps.append(w[0])  # (h, T, T)
            x = x + out
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        logits = model.decoder(model.encoder.norm(x))[:, 0]
    finally:
        model.train(was_training)
    return np.stack(maps), logits


@cache
def _template() -> str:
    return resources.files("bptt.inspect").joinpath("templates/attention.html").read_text(encoding="utf-8")


def _script_json(obj) -> str:
    """JSON that is safe inside <script>: no '<' can close the element early."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def attention_page(text: str, weights: np.ndarray, title: str = "", subtitle: str = "",
                   pred_ids=None, pred_probs=None, vocab_chars=None) -> str:
    """A self-contained HTML page of attention weights (L, h, T, T) over the T characters of ``text``.

    The page embeds the weights as integers in thousandths (``Math.round(a · 1000)``), row t holding
    the t + 1 keys 0..t (the causal triangle), and optionally the top next-character predictions."""
    L, h, T, T2 = weights.shape
    if T != T2 or len(text) != T:
        raise ValueError(f"weights {weights.shape} do not fit a text of {len(text)} characters")
    milli = np.rint(np.asarray(weights, np.float64) * 1000).astype(int)
    data = {
        "title": title, "subtitle": subtitle, "text": text, "layers": L, "heads": h,
        "weights": [[[milli[l, j, t, : t + 1].tolist() for t in range(T)] for j in range(h)] for l in range(L)],
    }
    if pred_ids is not None:
        data["vocab"] = list(vocab_chars)
        data["predIds"] = np.asarray(pred_ids).tolist()
        data["predProbs"] = np.rint(np.asarray(pred_probs) * 1000).astype(int).tolist()
    page = _template().replace("__TITLE__", html.escape(title or "bptt inspect attention"))
    return page.replace("__DATA__", _script_json(data))
