"""Attention over a padded memory: dot, general (Luong) and additive (Bahdanau) scores.

Shape legend: N batch, T target steps (queries), S source steps (memory slots),
H query width (decoder hidden), C memory width (encoder output, K·H_enc),
A additive-attention width.

Everything is batch-first and batched over all T queries at once (the decoder
runs over the whole sequence first, then attends; see ``docs/attention.md``)::

    scores   e_{n,t,s} = score(h_{n,t}, m_{n,s})                       (N, T, S)
             dot       h · m                                   (needs H = C)
             general   h W_a mᵀ                                W_a (H, C)
             additive  vᵀ tanh(W_q h + W_k m)                  W_q (A, H), W_k (A, C), v (A,)
    weights  a = softmax_s(e) with e = −∞ at padded slots      (N, T, S)
    context  c_{n,t} = Σ_s a_{n,t,s} m_{n,s}                    (N, T, C)

and backward, the same read upwards::

    ∂L/∂a = ∂L/∂c mᵀ (+ ∂L/∂a given directly),    ∂L/∂m += aᵀ ∂L/∂c
    ∂L/∂e = a ⊙ (∂L/∂a − Σ_s a ⊙ ∂L/∂a)            (zero at padded slots, since a = 0 there)
    then through the score function (per variant, in :meth:`Attention.backward`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn.cells import resolve_rng, uniform_init
from bptt.nn.module import Module, as_float_array
from bptt.nn.ops import affine_forward  # x Wᵀ as one 2-d product over all rows (NumPy runs a 3-d x @ W per row)

__all__ = ["Attention", "ATTENTION_KINDS", "masked_softmax"]

ATTENTION_KINDS = ("dot", "general", "additive")


def masked_softmax(e: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """softmax over the last axis with masked-out slots at exactly 0.

    e (N, T, S); mask (N, S) bool, True for real slots (None: all real).
    Every row must keep at least one real slot.
    """
    if mask is not None:
        e = np.where(mask[:, None, :], e, -np.inf)
    a = e - e.max(axis=-1, keepdims=True)
    np.exp(a, out=a)  # exp(−∞) = 0 at padded slots
    a /= a.sum(axis=-1, keepdims=True)
    return a


class _Cache(NamedTuple):
    q: np.ndarray  # (N, T, H) queries (decoder states)
    m: np.ndarray  # (N, S, C) memory (encoder outputs)
    a: np.ndarray  # (N, T, S) attention weights
    keys: np.ndarray | None  # general: m W_aᵀ (N, S, H), or q W_a (N, T, C) (keys_on_queries); additive: None
    z: np.ndarray | None  # additive: tanh(W_q h + W_k m) (N, T, S, A)
    keys_on_queries: bool = False  # general: W_a was applied to the queries, not to the memory


class Attention(Module):
    """``Attention(kind, query_size, memory_size, attn_size=None)``.

    ``forward(q, m, mask)`` → ``(context, weights)``:
        q (N, T, H), m (N, S, C), mask (N, S) bool or None
        context (N, T, C), weights (N, T, S)
    ``backward(dcontext, dweights=None)`` → ``(dq, dm)``; parameter gradients accumulate.

    Parameters: general ``W_a`` (H, C); additive ``W_q`` (A, H), ``W_k`` (A, C), ``v`` (A,).
    """

    def __init__(self, kind, query_size, memory_size, attn_size=None, dtype=np.float32, rng=None):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {kind!r}; expected one of {', '.join(ATTENTION_KINDS)}")
        self.kind = kind
        self.query_size, self.memory_size = int(query_size), int(memory_size)
        self.attn_size = int(attn_size or query_size)
        self._dtype = np.dtype(dtype)
        rng = resolve_rng(rng)
        H, C, A = self.query_size, self.memory_size, self.attn_size
        if kind == "dot" and H != C:
            raise ValueError(f"dot attention needs equal query and memory widths, got {H} and {C}; use 'general'")
        if kind == "general":
            self.add_param("W_a", uniform_init(rng, (H, C), 1.0 / np.sqrt(C), self._dtype))
        elif kind == "additive":
            self.add_param("W_q", uniform_init(rng, (A, H), 1.0 / np.sqrt(H), self._dtype))
            self.add_param("W_k", uniform_init(rng, (A, C), 1.0 / np.sqrt(C), self._dtype))
            self.add_param("v", uniform_init(rng, (A,), 1.0 / np.sqrt(A), self._dtype))
        self._ctx = None

    def extra_repr(self):
        return f"{self.kind!r}, {self.query_size}, {self.memory_size}" + (
            f", attn_size={self.attn_size}" if self.kind == "additive" else ""
        )

    # ------------------------------------------------------------------ forward
    def forward(self, q, m, mask=None):
        q = as_float_array(q, self._dtype, "query")
        m = as_float_array(m, self._dtype, "memory")
        if q.ndim != 3 or m.ndim != 3 or q.shape[0] != m.shape[0]:
            raise ValueError(f"attention expects q (N, T, H) and m (N, S, C), got {q.shape} and {m.shape}")
        if q.shape[2] != self.query_size or m.shape[2] != self.memory_size:
            raise ValueError(
                f"attention expects widths H={self.query_size}, C={self.memory_size}, got {q.shape[2]} and {m.shape[2]}"
            )
        if mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape != (m.shape[0], m.shape[1]):
                raise ValueError(f"mask must have shape {(m.shape[0], m.shape[1])}, got {mask.shape}")
            if not mask.any(axis=1).all():
                raise ValueError("every memory row needs at least one unmasked slot")
        p = self._own_params
        keys = z = None
        on_queries = False
        if self.kind == "dot":
            e = q @ m.transpose(0, 2, 1)  # (N, T, S)
        elif self.kind == "general":
            # e = (q W_a) mᵀ = q (m W_aᵀ)ᵀ: W_a goes to the side with fewer rows. A decoding step (T = 1)
            # then costs N·H·C, not N·S·H·C (greedy decoding of 256 sources of 20–29 tokens: 57–61 → 34 ms)
            on_queries = q.shape[1] <= m.shape[1]
            if on_queries:
                keys = affine_forward(q, p["W_a"].T, None)  # (N, T, C)
                e = keys @ m.transpose(0, 2, 1)
            else:
                keys = affine_forward(m, p["W_a"], None)  # (N, S, H)
                e = q @ keys.transpose(0, 2, 1)
        else:
            u = affine_forward(q, p["W_q"], None)  # (N, T, A)
            w = affine_forward(m, p["W_k"], None)  # (N, S, A)
            z = np.tanh(u[:, :, None, :] + w[:, None, :, :])  # (N, T, S, A)
            e = z @ p["v"]  # (N, T, S)
        a = masked_softmax(e, mask)
        context = a @ m  # (N, T, C)
        self._ctx = _Cache(q, m, a, keys, z, on_queries)
        return context, a

    # ------------------------------------------------------------------ backward
    def backward(self, dcontext, dweights=None):
        q, m, a, keys, z, on_queries = self._saved(self._ctx)
        dc = as_float_array(dcontext, self._dtype, "dcontext")
        da = dc @ m.transpose(0, 2, 1)  # (N, T, S)
        if dweights is not None:
            da = da + dweights
        dm = a.transpose(0, 2, 1) @ dc  # (N, S, C): the context is a weighted sum of memory rows
        # softmax Jacobian-vector product; padded slots have a = 0 and so get de = 0
        de = a * (da - np.sum(a * da, axis=-1, keepdims=True))
        p, g = self._own_params, self._own_grads
        if self.kind == "dot":
            dq = de @ m
            dm += de.transpose(0, 2, 1) @ q
        elif self.kind == "general" and on_queries:  # e = u mᵀ, u = q W_a
            du = de @ m  # (N, T, C)
            dm += de.transpose(0, 2, 1) @ keys
            g["W_a"] += q.reshape(-1, self.query_size).T @ du.reshape(-1, self.memory_size)
            dq = affine_forward(du, p["W_a"], None)  # du W_aᵀ
        elif self.kind == "general":  # e = q kᵀ, k = m W_aᵀ
            dq = de @ keys
            dkeys = de.transpose(0, 2, 1) @ q  # (N, S, H)
            g["W_a"] += dkeys.reshape(-1, self.query_size).T @ m.reshape(-1, self.memory_size)
            dm += affine_forward(dkeys, p["W_a"].T, None)
        else:
            A = self.attn_size
            g["v"] += np.einsum("nts,ntsa->a", de, z)
            dpre = (de[..., None] * p["v"]) * (1.0 - z * z)  # (N, T, S, A) through the tanh
            du = dpre.sum(axis=2)  # (N, T, A): W_q h is broadcast over slots
            dw = dpre.sum(axis=1)  # (N, S, A): W_k m is broadcast over queries
            g["W_q"] += du.reshape(-1, A).T @ q.reshape(-1, self.query_size)
            g["W_k"] += dw.reshape(-1, A).T @ m.reshape(-1, self.memory_size)
            dq = affine_forward(du, p["W_q"].T, None)
            dm += affine_forward(dw, p["W_k"].T, None)
        return dq, dm

