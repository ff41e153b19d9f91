"""Regularised and normalised recurrent steps: forward and backward side by side.

Shape legend: N batch, H hidden units, G = g·H stacked gate pre-activations
(g = 1 RNN, 4 LSTM gates i f g o, 3 GRU gates r z n).  (No projection here: h is (N, H).)

One step of each cell with every option of :mod:`bptt.nn.regularized_loop` switched on
or off by what is passed (None = off)::

    h̄     = h_{t−1} ⊙ m_h                      variational recurrent dropout (Keras' recurrent_dropout):
                                                one mask m_h (N, H) per sequence, on the recurrent product only
    gh    = h̄ W̃_hhᵀ + b_hh                     W̃_hh = W_hh ⊙ M / (1 − p): weight drop (the caller passes W̃_hh)
    gx    = x̃_t W_ihᵀ + b_ih                   computed by the caller for all T steps (x̃: input dropout)
    a     = LN_ih(gx) + LN_hh(gh)              layer norm (Ba et al. 2016), or a = gx + gh without it
    ... the cell (LSTM with optional peepholes; GRU; RNN) gives the candidate state h̃ (and c̃) ...
    h_t   = d_h ⊙ h_{t−1} + (1 − d_h) ⊙ h̃      zoneout (Krueger et al. 2016): d_h ~ Bernoulli(z_h) per step
    c_t   = d_c ⊙ c_{t−1} + (1 − d_c) ⊙ c̃      in training, d = z (the expectation) in evaluation

where LN(v; γ, β) = γ ⊙ (v − μ(v)) / √(σ²(v) + ε) + β over the G features of each row.

Each step is a pair ``*_forward(gx, h_prev, [c_prev,] p, d_h[, d_c]) → (new state, cache)`` and
``*_backward(dh, [dc,] cache, p, d_h[, d_c], pgrads) → (dgx, dgh, dh_prev[, dc_prev])``: dgx is
∂L/∂gx, dgh is ∂L/∂gh (they differ once layer norm sits between them and a), so the caller forms
∂L/∂W_ih = Σ dgxᵀ x̃ and ∂L/∂W̃_hh = Σ dghᵀ h̄ in one product each after the loop.  The small
parameters of the options (layer-norm gains and biases, peephole weights) are accumulated here,
per step, into the dict ``pgrads``.  The derivations are in ``docs/regularization.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn.cells import sigmoid

__all__ = [
    "LN_EPS", "StepParams", "LayerNorm", "Peephole",
    "layer_norm_forward", "layer_norm_backward",
    "LSTMCache", "lstm_forward", "lstm_backward",
    "GRUCache", "gru_forward", "gru_backward",
    "RNNCache", "rnn_forward", "rnn_backward",
]

LN_EPS = 1e-5  # ε in the layer-norm denominator (PyTorch's nn.LayerNorm default)


class LayerNorm(NamedTuple):
    """Gains and biases of the normalisations of one layer and direction."""

    g_ih: np.ndarray  # (G,) gain of LN_ih (on x W_ihᵀ + b_ih)
    b_ih: np.ndarray  # (G,)
    g_hh: np.ndarray  # (G,) gain of LN_hh (on h̄ W̃_hhᵀ + b_hh)
    b_hh: np.ndarray  # (G,)
    g_c: np.ndarray | None = None  # (H,) LSTM only: LN_c on the cell state, for the output
    b_c: np.ndarray | None = None  # (H,)


class Peephole(NamedTuple):
    """Diagonal cell-to-gate weights (Gers & Schmidhuber 2000), each (H,)."""

    w_ci: np.ndarray  # c_{t−1} → input gate
    w_cf: np.ndarray  # c_{t−1} → forget gate
    w_co: np.ndarray  # c_t → output gate (the new cell state, as in Gers et al.)


class StepParams(NamedTuple):
    """What every step of one layer and direction reads (None = option off)."""

    W_hh: np.ndarray  # (G, H) the recurrent weight as used: W_hh ⊙ M / (1 − p) under weight drop
    b_hh: np.ndarray | None  # (G,)
    m_h: np.ndarray | None  # (N, H) recurrent-dropout mask on h_{t−1} (scaled by 1/(1 − p))
    ln: LayerNorm | None
    peep: Peephole | None = None
    relu: bool = False  # RNN only: φ = relu instead of tanh


# ============================================================================ layer norm
#   μ = mean(v), σ² = mean((v − μ)²), v̂ = (v − μ)/s, s = √(σ² + ε),   y = γ ⊙ v̂ + β      (over the last axis)
#   backward: dv̂ = dy ⊙ γ,   dv = (dv̂ − mean(dv̂) − v̂ ⊙ mean(dv̂ ⊙ v̂)) / s,   dγ = Σ_rows dy ⊙ v̂,   dβ = Σ_rows dy


class _LN(NamedTuple):
    v_hat: np.ndarray  # (N, F) the normalised input
    inv_s: np.ndarray  # (N, 1) 1/√(σ² + ε)


def layer_norm_forward(v, gamma, beta):
    """y = γ ⊙ (v − μ)/√(σ² + ε) + β over the last axis; v (N, F), γ, β (F,) → (y, cache)."""
    mu = v.mean(axis=-1, keepdims=True)
    centred = v - mu
    inv_s = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + LN_EPS)
    v_hat = centred * inv_s
    return v_hat * gamma + beta, _LN(v_hat, inv_s)


def layer_norm_backward(dy, cache: _LN, gamma, dgamma, dbeta):
    """∂L/∂v from ∂L/∂y; accumulates ∂L/∂γ into dgamma and ∂L/∂β into dbeta (both (F,))."""
    v_hat, inv_s = cache
    dgamma += (dy * v_hat).sum(axis=0)
    dbeta += dy.sum(axis=0)
    dv_hat = dy * gamma
    return (dv_hat - dv_hat.mean(axis=-1, keepdims=True)
            - v_hat * (dv_hat * v_hat).mean(axis=-1, keepdims=True)) * inv_s


def _mix(keep, old, new):
    """Zoneout: keep ⊙ old + (1 − keep) ⊙ new (keep: a 0/1 mask, the rate z, or None = new)."""
    if keep is None:
        return new
    return new + keep * (old - new)


def _recurrent_product(h_prev, p: StepParams):
    """(h̄, gh): h̄ = h_{t−1} ⊙ m_h,  gh = h̄ W̃_hhᵀ + b_hh."""
    h_bar = h_prev if p.m_h is None else h_prev * p.m_h
    gh = h_bar @ p.W_hh.T
    if p.b_hh is not None:
        gh += p.b_hh
    return h_bar, gh


def _normalise(gx, gh, p: StepParams):
    """(ax, ah, ln caches): the two terms of a, normalised when layer norm is on."""
    if p.ln is None:
        return gx, gh, None
    ax, cx = layer_norm_forward(gx, p.ln.g_ih, p.ln.b_ih)
    ah, ch = layer_norm_forward(gh, p.ln.g_hh, p.ln.b_hh)
    return ax, ah, (cx, ch)


def _denormalise(dax, dah, ln_caches, p: StepParams, pgrads):
    """(dgx, dgh) from (∂L/∂ax, ∂L/∂ah): back through LN_ih and LN_hh when layer norm is on."""
    if p.ln is None:
        return dax, dah
    cx, ch = ln_caches[:2]
    dgx = layer_norm_backward(dax, cx, p.ln.g_ih, pgrads["ln_ih_weight"], pgrads["ln_ih_bias"])
    dgh = layer_norm_backward(dah, ch, p.ln.g_hh, pgrads["ln_hh_weight"], pgrads["ln_hh_bias"])
    return dgx, dgh


def _recurrent_back(dgh, p: StepParams):
    """∂L/∂h_{t−1} through gh = (h_{t−1} ⊙ m_h) W̃_hhᵀ + b_hh."""
    dh_bar = dgh @ p.W_hh
    return dh_bar if p.m_h is None else dh_bar * p.m_h


# ============================================================================ LSTM
#   a = LN_ih(gx) + LN_hh(gh) = [a_i a_f a_g a_o]
#   i = σ(a_i + w_ci ⊙ c_{t−1})   f = σ(a_f + w_cf ⊙ c_{t−1})   g = tanh(a_g)        (peepholes: w = 0 without)
#   c̃ = f ⊙ c_{t−1} + i ⊙ g
#   o = σ(a_o + w_co ⊙ c̃)
#   h̃ = o ⊙ tanh(LN_c(c̃))                           (tanh(c̃) without layer norm)
#   c_t = d_c ⊙ c_{t−1} + (1 − d_c) ⊙ c̃,   h_t = d_h ⊙ h_{t−1} + (1 − d_h) ⊙ h̃      (zoneout)


class LSTMCache(NamedTuple):
    h_prev: np.ndarray  # (N, H)
    c_prev: np.ndarray  # (N, H)
    h_bar: np.ndarray  # (N, H) h_{t−1} ⊙ m_h: the rows of ∂L/∂W̃_hh
    gates: np.ndarray  # (N, 4H) activated [i f g o]
    c_tilde: np.ndarray  # (N, H) the candidate cell state
    tanh_c: np.ndarray  # (N, H) tanh(LN_c(c̃)) (tanh(c̃) without layer norm)
    ln: tuple | None  # (LN_ih cache, LN_hh cache, LN_c cache)


def lstm_forward(gx, h_prev, c_prev, p: StepParams, d_h=None, d_c=None):
    """One LSTM step with the options in ``p``; d_h, d_c: zoneout keep factors (N, H), a scalar, or None.

    gx (N, 4H) = x̃_t W_ihᵀ + b_ih.  Returns (h_t, c_t, cache).
    """
    H = c_prev.shape[1]
    h_bar, gh = _recurrent_product(h_prev, p)
    ax, ah, ln = _normalise(gx, gh, p)
    a = ax + ah
    if p.peep is not None:
        a[:, :H] += p.peep.w_ci * c_prev
        a[:, H : 2 * H] += p.peep.w_cf * c_prev
    gates = np.empty_like(a)
    gates[:, : 2 * H] = sigmoid(a[:, : 2 * H])  # i, f
    gates[:, 2 * H : 3 * H] = np.tanh(a[:, 2 * H : 3 * H])  # g
    i, f, g = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H]
    c_tilde = f * c_prev + i * g
    a_o = a[:, 3 * H :] if p.peep is None else a[:, 3 * H :] + p.peep.w_co * c_tilde
    gates[:, 3 * H :] = sigmoid(a_o)
    o = gates[:, 3 * H :]
    if p.ln is not None:
        c_hat, cc = layer_norm_forward(c_tilde, p.ln.g_c, p.ln.b_c)
        ln = ln + (cc,)
    else:
        c_hat = c_tilde
    tanh_c = np.tanh(c_hat)
    h_tilde = o * tanh_c
    h = _mix(d_h, h_prev, h_tilde)
    c = _mix(d_c, c_prev, c_tilde)
    return h, c, LSTMCache(h_prev, c_prev, h_bar, gates, c_tilde, tanh_c, ln)


def lstm_backward(dh, dc, cache: LSTMCache, p: StepParams, d_h, d_c, pgrads):
    """Backward of :func:`lstm_forward`, the forward read bottom to top.

    dh = ∂L/∂h_t (N, H), dc = ∂L/∂c_t (N, H) from step t+1.  Returns (dgx, dgh, dh_prev, dc_prev).
    """
    H = cache.c_prev.shape[1]
    gates, c_prev = cache.gates, cache.c_prev
    i, f, g, o = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H], gates[:, 3 * H :]
    # zoneout: h_t = d_h h_{t−1} + (1 − d_h) h̃, likewise c
    dh_tilde = dh if d_h is None else dh * (1.0 - d_h)
    dc_tilde = dc if d_c is None else dc * (1.0 - d_c)
    # h̃ = o ⊙ tanh(ĉ), ĉ = LN_c(c̃)
    do = dh_tilde * cache.tanh_c
    dc_hat = dh_tilde * o * (1.0 - cache.tanh_c * cache.tanh_c)
    if p.ln is not None:
        dc_hat = layer_norm_backward(dc_hat, cache.ln[2], p.ln.g_c, pgrads["ln_c_weight"], pgrads["ln_c_bias"])
    da = np.empty_like(gates)
    da[:, 3 * H :] = do * o * (1.0 - o)  # ∂L/∂(a_o + w_co c̃)
    dc_t = dc_tilde + dc_hat  # c̃ feeds c_t (carry) and the output
    if p.peep is not None:  # ... and the output gate
        dc_t = dc_t + da[:, 3 * H :] * p.peep.w_co
        pgrads["weight_co"] += (da[:, 3 * H :] * cache.c_tilde).sum(axis=0)
    da[:, :H] = dc_t * g * i * (1.0 - i)
    da[:, H : 2 * H] = dc_t * c_prev * f * (1.0 - f)
    da[:, 2 * H : 3 * H] = dc_t * i * (1.0 - g * g)
    dc_prev = dc_t * f  # the constant error carousel
    if p.peep is not None:  # c_{t−1} also feeds the input and forget gates
        dc_prev += da[:, :H] * p.peep.w_ci + da[:, H : 2 * H] * p.peep.w_cf
        pgrads["weight_ci"] += (da[:, :H] * c_prev).sum(axis=0)
        pgrads["weight_cf"] += (da[:, H : 2 * H] * c_prev).sum(axis=0)
    if d_c is not None:
        dc_prev += d_c * dc
    dgx, dgh = _denormalise(da, da, cache.ln, p, pgrads)
    dh_prev = _recurrent_back(dgh, p)
    if d_h is not None:
        dh_prev += d_h * dh
    return dgx, dgh, dh_prev, dc_prev


# ============================================================================ GRU
#   ax = LN_ih(gx) = [ax_r ax_z ax_n],  ah = LN_hh(gh) = [ah_r ah_z ah_n]
#   r = σ(ax_r + ah_r)   z = σ(ax_z + ah_z)   n = tanh(ax_n + r ⊙ ah_n)
#   h̃ = (1 − z) ⊙ n + z ⊙ h_{t−1}       (h_{t−1} undropped: the mask is on the recurrent product only, as Keras)
#   h_t = d_h ⊙ h_{t−1} + (1 − d_h) ⊙ h̃


class GRUCache(NamedTuple):
    h_prev: np.ndarray  # (N, H)
    h_bar: np.ndarray  # (N, H)
    gates: np.ndarray  # (N, 3H) activated [r z n]
    ah_n: np.ndarray  # (N, H) what r multiplies
    ln: tuple | None


def gru_forward(gx, h_prev, p: StepParams, d_h=None):
    """One GRU step with the options in ``p``.  gx (N, 3H).  Returns (h_t, cache)."""
    H = h_prev.shape[1]
    h_bar, gh = _recurrent_product(h_prev, p)
    ax, ah, ln = _normalise(gx, gh, p)
    gates = np.empty_like(ax)
    gates[:, : 2 * H] = sigmoid(ax[:, : 2 * H] + ah[:, : 2 * H])  # r, z
    r, z = gates[:, :H], gates[:, H : 2 * H]
    ah_n = ah[:, 2 * H :]
    gates[:, 2 * H :] = np.tanh(ax[:, 2 * H :] + r * ah_n)
    n = gates[:, 2 * H :]
    h_tilde = n + z * (h_prev - n)
    return _mix(d_h, h_prev, h_tilde), GRUCache(h_prev, h_bar, gates, ah_n, ln)


def gru_backward(dh, cache: GRUCache, p: StepParams, d_h, pgrads):
    """Backward of :func:`gru_forward`.  Returns (dgx, dgh, dh_prev)."""
    H = cache.h_prev.shape[1]
    gates, h_prev = cache.gates, cache.h_prev
    r, z, n = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H :]
    dh_tilde = dh if d_h is None else dh * (1.0 - d_h)
    da_n = dh_tilde * (1.0 - z) * (1.0 - n * n)
    dax = np.empty_like(gates)
    dax[:, :H] = da_n * cache.ah_n * r * (1.0 - r)  # r
    dax[:, H : 2 * H] = dh_tilde * (h_prev - n) * z * (1.0 - z)  # z
    dax[:, 2 * H :] = da_n  # n
    dah = dax.copy()
    dah[:, 2 * H :] *= r  # ah_n is scaled by r
    dgx, dgh = _denormalise(dax, dah, cache.ln, p, pgrads)
    dh_prev = dh_tilde * z + _recurrent_back(dgh, p)
    if d_h is not None:
        dh_prev += d_h * dh
    return dgx, dgh, dh_prev


# ============================================================================ RNN
#   h̃ = φ(LN_ih(gx) + LN_hh(gh)),  φ = tanh or relu;   h_t = d_h ⊙ h_{t−1} + (1 − d_h) ⊙ h̃


class RNNCache(NamedTuple):
    h_prev: np.ndarray  # (N, H)
    h_bar: np.ndarray  # (N, H)
    h_tilde: np.ndarray  # (N, H) φ(a): its derivative is read from it
    ln: tuple | None


def rnn_forward(gx, h_prev, p: StepParams, d_h=None):
    """One Elman step with the options in ``p``.  gx (N, H).  Returns (h_t, cache)."""
    h_bar, gh = _recurrent_product(h_prev, p)
    ax, ah, ln = _normalise(gx, gh, p)
    a = ax + ah
    h_tilde = np.maximum(a, 0.0) if p.relu else np.tanh(a)
    return _mix(d_h, h_prev, h_tilde), RNNCache(h_prev, h_bar, h_tilde, ln)


def rnn_backward(dh, cache: RNNCache, p: StepParams, d_h, pgrads):
    """Backward of :func:`rnn_forward`.  Returns (dgx, dgh, dh_prev)."""
    h_tilde = cache.h_tilde
    dh_tilde = dh if d_h is None else dh * (1.0 - d_h)
    da = dh_tilde * (h_tilde > 0) if p.relu else dh_tilde * (1.0 - h_tilde * h_tilde)
    dgx, dgh = _denormalise(da, da, cache.ln, p, pgrads)
    dh_prev = _recurrent_back(dgh, p)
    if d_h is not None:
        dh_prev += d_h * dh
    return dgx, dgh, dh_prev
