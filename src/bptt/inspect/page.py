"""The units page: a self-contained HTML file that colours text by one unit's activation, ranks units by
how well they track properties of the text, and shows the model's predictions on hover.

The page's markup, style and script are package data (``templates/units.html``); this module fills in
its title and one JSON object of data.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources

import numpy as np

from bptt.inspect.analyses import PROPERTIES, unit_correlations

__all__ = ["units_page"]


@cache
def _template() -> str:
    return resources.files("bptt.inspect").joinpath("templates/units.html").read_text(encoding="utf-8")


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
    return _template().replace("__TITLE__", html.escape(title or "bptt inspect units")).replace("__DATA__", _script_json(data))
