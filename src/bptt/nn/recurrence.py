"""The time loop: one direction of one recurrent layer over a whole sequence.

Shape legend: T time steps, N batch, H hidden units, G = g·H stacked gate
pre-activations (g = 1 RNN, 4 LSTM, 3 GRU), P the width of h (P = H unless an
LSTM has a projection).

This is the seam between the layers and the compiled kernels.  A layer hands
over the input projection of every time step at once, ``gx = X W_ihᵀ + b_ih``
(T, N, G), and receives back the gradient of that projection; the matrix
products with ``W_ih`` (and the weight gradients of ``W_ih`` and ``W_hh``, one
product each over all T·N rows) stay in the layer.  What happens in between,
step after step, is here, written as a plain Python loop over the cells of
:mod:`bptt.nn.cells`.  :mod:`bptt.kernels` provides compiled versions of
:func:`sequence_forward` / :func:`sequence_backward` with the same contract.

Variable lengths use a mask ``m_t`` (N,) of 0/1 per step: a padded step keeps
the state it was given and outputs zero,

    h_t = m_t ⊙ h̃_t + (1 − m_t) ⊙ h_{t−1},    y_t = m_t ⊙ h̃_t,

so the gradient passes a padded step unchanged.  Running the reverse direction
over padded sequences with the same rule keeps it at h_0 until each sequence's
own last step, which is where PyTorch's packed sequences start it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn.cells import (
    gru_step_backward,
    gru_step_forward,
    lstm_step_backward,
    lstm_step_forward,
    rnn_step_backward,
    rnn_step_forward,
)

__all__ = ["Weights", "SequenceCache", "sequence_forward", "sequence_backward", "WholeSequence"]


class Weights(NamedTuple):
    """The recurrent weights of one direction of one layer."""

    W_hh: np.ndarray  # (G, P)
    b_hh: np.ndarray | None  # (G,)
    W_hr: np.ndarray | None = None  # (P, H), LSTM projection only


class SequenceCache(NamedTuple):
    """What the backward pass needs; arrays are in time order (index t = step t)."""

    mode: str  # "rnn_tanh" | "rnn_relu" | "lstm" | "gru"
    reverse: bool
    mask: np.ndarray | None  # (T, N) bool, None when every sequence is full length
    h_prev: np.ndarray  # (T, N, P) state entering step t: the rows of ∂L/∂W_hh = Σ dghᵀ h_prev
    steps: list  # per-step caches of bptt.nn.cells (the reference loop) or kernel arrays


def _time_order(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def sequence_forward(mode, gx, h0, c0, weights: Weights, mask=None, reverse=False):
    """Run one direction over T steps.

    Args:
        mode: "rnn_tanh", "rnn_relu", "lstm" or "gru".
        gx: (T, N, G) input projections x_t W_ihᵀ + b_ih.
        h0: (N, P) initial hidden state;  c0: (N, H) initial cell state (LSTM) or None.
        weights: W_hh (G, P), b_hh (G,) or None, W_hr (P, H) or None.
        mask: (T, N) bool, True where step t is inside sequence n; None = all True.
        reverse: run from t = T−1 down to 0.

    Returns:
        y (T, N, P) outputs (zero at padded steps), h_n (N, P), c_n (N, H) or None, cache.
    """
    T, N, _ = gx.shape
    P = h0.shape[1]
    y = np.empty((T, N, P), dtype=gx.dtype)
    h_prev_all = np.empty((T, N, P), dtype=gx.dtype)
    steps = [None] * T
    h, c = h0, c0
    for t in _time_order(T, reverse):
        h_prev_all[t] = h
        if mode == "lstm":
            h_new, c_new, steps[t] = lstm_step_forward(gx[t], h, c, weights.W_hh, weights.b_hh, weights.W_hr)
        elif mode == "gru":
            h_new, steps[t] = gru_step_forward(gx[t], h, weights.W_hh, weights.b_hh)
        else:
            h_new, steps[t] = rnn_step_forward(gx[t], h, weights.W_hh, weights.b_hh, mode[4:])
        if mask is None:
            y[t] = h_new
            h = h_new
            if mode == "lstm":
                c = c_new
        else:
            m = mask[t][:, None]
            y[t] = np.where(m, h_new, 0.0)
            h = np.where(m, h_new, h)
            if mode == "lstm":
                c = np.where(m, c_new, c)
    cache = SequenceCache(mode, reverse, mask, h_prev_all, steps)
    return y, h, c, cache


def sequence_backward(dy, dh_n, dc_n, cache: SequenceCache, weights: Weights, on_step=None, recurrent_scale=None):
    """Backpropagate through the T steps of :func:`sequence_forward`.

    Args:
        dy: (T, N, P) ∂L/∂y;  dh_n (N, P) and dc_n (N, H) or None: ∂L/∂(final states).
        on_step: if given, called as ``on_step(t, dh_t, dc_t)`` at every step with the gradient reaching
            h_t (from the output and from step t+1) and, for the LSTM, the carried dc_t (None otherwise):
            what ``bptt inspect gradients`` plots.
        recurrent_scale: (T,) factors r_t or None (all ones).  The gradient that step t carries back to
            the state it was given is multiplied by r_t before it reaches step t − 1:

                dh_{t−1} ← r_t · (∂h_t/∂h_{t−1})ᵀ dh_t        (and dc_{t−1} ← r_t · (∂c_t/∂c_{t−1})ᵀ dc_t, LSTM)

            while the output gradients dy_t keep weight 1.  With r_t = 1/(1 − c_t), c_t the probability
            that randomized truncation cuts the window before step t, this is ARTBP's unbiasing
            (Tallec & Ollivier 2017; see :mod:`bptt.lm.windows`).  r_0 multiplies dh_0, the gradient
            of the initial state.  Forward direction only.

    Returns:
        dgx (T, N, G): ∂L/∂gx, the gradient of the input projections;
        dgh (T, N, G): ∂L/∂(h_{t−1} W_hhᵀ + b_hh) (the same array as dgx except for the GRU);
        dh0 (N, P), dc0 (N, H) or None;
        dW_hr (P, H) or None: ∂L/∂W_hr = Σ_t dh̃_tᵀ m_t, one product over all steps (LSTM projection only).
    """
    mode, mask, steps = cache.mode, cache.mask, cache.steps
    T, N, P = dy.shape
    if recurrent_scale is not None:
        recurrent_scale = np.asarray(recurrent_scale, dtype=dy.dtype)
        if recurrent_scale.shape != (T,):
            raise ValueError(f"recurrent_scale must have shape (T,) = ({T},), got {recurrent_scale.shape}")
        if cache.reverse:
            raise ValueError("recurrent_scale is defined for the forward direction only")
    G = weights.W_hh.shape[0]
    dgx = np.empty((T, N, G), dtype=dy.dtype)
    dgh = np.empty((T, N, G), dtype=dy.dtype) if mode == "gru" else dgx
    dh_all = np.empty_like(dy) if weights.W_hr is not None else None
    dh = np.zeros((N, P), dy.dtype) if dh_n is None else dh_n.copy()
    dc = None
    if mode == "lstm":
        H = steps[0].c_prev.shape[1] if T else 0
        dc = np.zeros((N, H), dy.dtype) if dc_n is None else dc_n.copy()
    for t in _time_order(T, not cache.reverse):  # the forward order, read backwards
        dh_step = dh + dy[t]  # the state fans out to the output and to step t+1
        if mask is not None:
            m = mask[t][:, None]
            dh_step = np.where(m, dh_step, 0.0)
            if mode == "lstm":
                dc_step = np.where(m, dc, 0.0)
        elif mode == "lstm":
            dc_step = dc
        if on_step is not None:
            on_step(t, dh_step, dc_step if mode == "lstm" else None)
        if mode == "lstm":
            if dh_all is not None:
                dh_all[t] = dh_step
            dgx[t], dh_prev, dc_prev = lstm_step_backward(dh_step, dc_step, steps[t], weights.W_hh, weights.W_hr)
        elif mode == "gru":
            dgx[t], dgh[t], dh_prev = gru_step_backward(dh_step, steps[t], weights.W_hh)
        else:
            dgx[t], dh_prev = rnn_step_backward(dh_step, steps[t], weights.W_hh, mode[4:])
        if recurrent_scale is not None:  # what crosses from step t to step t − 1, and only that, is scaled
            dh_prev = recurrent_scale[t] * dh_prev
            if mode == "lstm":
                dc_prev = recurrent_scale[t] * dc_prev
        if mask is None:
            dh = dh_prev
            if mode == "lstm":
                dc = dc_prev
        else:  # padded steps pass the carry through untouched
            dh = np.where(m, dh_prev, dh)
            if mode == "lstm":
                dc = np.where(m, dc_prev, dc)
    dW_hr = None
    if dh_all is not None:  # m_t = o ⊙ tanh(c_t) was the projection's input (H set above: LSTM only)
        m_all = np.stack([s.gates[:, 3 * H :] * s.tanh_c for s in steps])  # (T, N, H)
        dW_hr = dh_all.reshape(-1, P).T @ m_all.reshape(-1, H)
    return dgx, dgh, dh, dc, dW_hr


class WholeSequence:
    """The run interface of :class:`bptt.kernels.ForwardRun` / ``BackwardRun``
    (``steps(t0, t1)``, ``result()``) over a function of the whole sequence:
    the readable loops above, which run in one chunk (RNNBase uses it for the reference loop)."""

    def __init__(self, T, gx, compute):
        self.T, self.gx, self._compute, self._result = T, gx, compute, None

    def steps(self, t0, t1):
        if (t0, t1) != (0, self.T):
            raise RuntimeError("the reference loop runs whole sequences only")
        self._result = self._compute()

    def result(self):
        return self._result

    def gx_rows(self, t0, t1):
        return self.gx[t0:t1]

    @property
    def y(self):  # forward: the output;  backward: dgx
        return self._result[0]

    dgx = y

    @property
    def dgh(self):  # backward only
        return self._result[1]
