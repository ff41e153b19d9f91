"""One time step of a vanilla RNN, an LSTM and a GRU: forward and backward side by side.

Shape legend (used in every module of bptt):
    T  time steps          N  batch size         D  input features
    H  hidden units        P  LSTM projection size (P = H without projection)
    V  vocabulary size     L  layers

Conventions are PyTorch's, so weights load unchanged: rows are batch items
(``x_t`` is (N, D), ``h_t`` is (N, H)), a weight ``W`` of shape (out, in) acts as
``x Wᵀ``, LSTM gates are stacked i, f, g, o and GRU gates r, z, n.

Each step comes as a pair of pure functions::

    *_step_forward(gx, state, weights) -> (new state, cache)
    *_step_backward(d new state, cache, weights) -> (d pre-activations, d state)

``gx = x_t W_ihᵀ + b_ih`` is the input projection, computed by the caller: a
layer computes it for all T steps in one matrix product, a cell for its one
step.  Backward returns the gradient of the pre-activations instead of
accumulating weight gradients, so that a layer can form ``∂L/∂W`` for all time
steps in one matrix product after the loop.  Caches are NamedTuples of
post-activation values, so derivatives come from outputs (``1 − h²``).

The derivations are in ``docs/rnn.md``, ``docs/lstm.md`` and ``docs/gru.md``.
The fused kernels in :mod:`bptt.kernels` compute the same steps and are tested
against these.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt.nn import gates
from bptt.nn.module import Module, as_float_array

__all__ = [
    "sigmoid",
    "RNNStepCache",
    "LSTMStepCache",
    "GRUStepCache",
    "rnn_step_forward",
    "rnn_step_backward",
    "lstm_step_forward",
    "lstm_step_backward",
    "gru_step_forward",
    "gru_step_backward",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "uniform_init",
    "resolve_rng",
]


def sigmoid(a: np.ndarray) -> np.ndarray:
    """σ(a) = 1 / (1 + e^{−a}), written via tanh so it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * a))


# ============================================================================ vanilla RNN
#   a_t = x_t W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh          (N, H)
#   h_t = tanh(a_t)   or   relu(a_t)


class RNNStepCache(NamedTuple):
    h_prev: np.ndarray  # (N, H) state entering the step
    h: np.ndarray  # (N, H) state leaving it (post-activation)


def rnn_step_forward(gx, h_prev, W_hh, b_hh, nonlinearity="tanh"):
    """h = φ(gx + h_prev W_hhᵀ + b_hh), φ = tanh or relu.

    gx (N, H) = x W_ihᵀ + b_ih;  h_prev (N, H);  W_hh (H, H);  b_hh (H,) or None.
    """
    a = gx + h_prev @ W_hh.T
    if b_hh is not None:
        a += b_hh
    h = np.tanh(a, out=a) if nonlinearity == "tanh" else np.maximum(a, 0.0, out=a)
    return h, RNNStepCache(h_prev, h)


def rnn_step_backward(dh, cache: RNNStepCache, W_hh, nonlinearity="tanh"):
    """Returns (da, dh_prev): da = dh ⊙ φ'(a), dh_prev = da W_hh.

    φ'(a) = 1 − h² for tanh, [h > 0] for relu: both read from the output h.
    ``da`` is ∂L/∂gx and ∂L/∂(h_prev W_hhᵀ + b_hh) at once.
    """
    h = cache.h
    da = dh * (1.0 - h * h) if nonlinearity == "tanh" else dh * (h > 0)
    return da, da @ W_hh


# ============================================================================ LSTM
#   a_t = x_t W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh = [a_i a_f a_g a_o]   (N, 4H)
#   i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
#   c_t = f ⊙ c_{t−1} + i ⊙ g
#   m_t = o ⊙ tanh(c_t)
#   h_t = m_t                 (no projection)
#   h_t = m_t W_hrᵀ           (proj_size P > 0: W_hr is (P, H), h_t is (N, P))


class LSTMStepCache(NamedTuple):
    h_prev: np.ndarray  # (N, P) hidden state entering the step
    c_prev: np.ndarray  # (N, H) cell state entering the step
    gates: np.ndarray  # (N, 4H) activated gates [i f g o]
    tanh_c: np.ndarray  # (N, H) tanh(c_t)


def lstm_step_forward(gx, h_prev, c_prev, W_hh, b_hh, W_hr=None):
    """One LSTM step.  gx (N, 4H) = x W_ihᵀ + b_ih; W_hh (4H, P); W_hr (P, H) or None.

    Returns (h (N, P), c (N, H), cache).
    """
    H = c_prev.shape[1]
    a = gx + h_prev @ W_hh.T
    if b_hh is not None:
        a += b_hh
    gates = a  # activated in place: a is not needed again
    gates[:, : 2 * H] = sigmoid(a[:, : 2 * H])  # i, f
    np.tanh(a[:, 2 * H : 3 * H], out=gates[:, 2 * H : 3 * H])  # g
    gates[:, 3 * H :] = sigmoid(a[:, 3 * H :])  # o
    i, f, g, o = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H], gates[:, 3 * H :]
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    if W_hr is not None:
        h = h @ W_hr.T
    return h, c, LSTMStepCache(h_prev, c_prev, gates, tanh_c)


def lstm_step_backward(dh, dc, cache: LSTMStepCache, W_hh, W_hr=None):
    """Backward of one LSTM step: the forward read bottom to top.

    dh (N, P) = ∂L/∂h_t, dc (N, H) = ∂L/∂c_t arriving from step t+1 (may be None).
    Returns (da (N, 4H), dh_prev (N, P), dc_prev (N, H)).  With a projection the
    caller forms ∂L/∂W_hr = Σ_t dh_tᵀ m_t from the dh it passed in.
    """
    H = cache.c_prev.shape[1]
    gates, tanh_c = cache.gates, cache.tanh_c
    i, f, g, o = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H], gates[:, 3 * H :]
    dm = dh @ W_hr if W_hr is not None else dh  # backprop through the projection
    do = dm * tanh_c
    dc = dm * o * (1.0 - tanh_c * tanh_c) + (0.0 if dc is None else dc)  # h_t = o ⊙ tanh(c_t)
    da = np.empty_like(gates)
    da[:, :H] = dc * g * i * (1.0 - i)  # ∂L/∂a_i = dc ⊙ g ⊙ σ'
    da[:, H : 2 * H] = dc * cache.c_prev * f * (1.0 - f)  # ∂L/∂a_f = dc ⊙ c_{t−1} ⊙ σ'
    da[:, 2 * H : 3 * H] = dc * i * (1.0 - g * g)  # ∂L/∂a_g = dc ⊙ i ⊙ tanh'
    da[:, 3 * H :] = do * o * (1.0 - o)  # ∂L/∂a_o = do ⊙ σ'
    dc_prev = dc * f  # the constant error carousel
    dh_prev = da @ W_hh
    return da, dh_prev, dc_prev


# ============================================================================ GRU
#   gx = x_t W_ihᵀ + b_ih = [gx_r gx_z gx_n]        gh = h_{t−1} W_hhᵀ + b_hh = [gh_r gh_z gh_n]
#   r = σ(gx_r + gh_r)      z = σ(gx_z + gh_z)
#   n = tanh(gx_n + r ⊙ gh_n)                      (PyTorch's "reset after" form)
#   h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}


class GRUStepCache(NamedTuple):
    h_prev: np.ndarray  # (N, H)
    gates: np.ndarray  # (N, 3H) activated [r z n]
    gh_n: np.ndarray  # (N, H) h_{t−1} W_hnᵀ + b_hn, what r multiplies


def gru_step_forward(gx, h_prev, W_hh, b_hh):
    """One GRU step.  gx (N, 3H) = x W_ihᵀ + b_ih; W_hh (3H, H); b_hh (3H,) or None."""
    H = h_prev.shape[1]
    gh = h_prev @ W_hh.T
    if b_hh is not None:
        gh += b_hh
    gates = np.empty_like(gh)
    gates[:, : 2 * H] = sigmoid(gx[:, : 2 * H] + gh[:, : 2 * H])  # r, z
    r, z = gates[:, :H], gates[:, H : 2 * H]
    gh_n = gh[:, 2 * H :]
    np.tanh(gx[:, 2 * H :] + r * gh_n, out=gates[:, 2 * H :])  # n
    n = gates[:, 2 * H :]
    h = n + z * (h_prev - n)  # = (1 − z) ⊙ n + z ⊙ h_{t−1}
    return h, GRUStepCache(h_prev, gates, gh_n)


def gru_step_backward(dh, cache: GRUStepCache, W_hh):
    """Backward of one GRU step.

    Returns (dgx (N, 3H), dgh (N, 3H), dh_prev (N, H)), the gradients of the
    input projection, of the recurrent projection gh, and of h_{t−1}.
    """
    H = cache.h_prev.shape[1]
    gates, h_prev = cache.gates, cache.h_prev
    r, z, n = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H :]
    dgx = np.empty_like(gates)
    dgh = np.empty_like(gates)
    da_n = dh * (1.0 - z) * (1.0 - n * n)  # through h = (1−z)n + z h_prev, then tanh
    da_r = da_n * cache.gh_n * r * (1.0 - r)  # n's pre-activation holds r ⊙ gh_n
    da_z = dh * (h_prev - n) * z * (1.0 - z)
    dgx[:, :H] = da_r
    dgx[:, H : 2 * H] = da_z
    dgx[:, 2 * H :] = da_n
    dgh[:, : 2 * H] = dgx[:, : 2 * H]  # r and z see gx and gh alike
    dgh[:, 2 * H :] = da_n * r  # gh_n is scaled by r
    dh_prev = dh * z + dgh @ W_hh
    return dgx, dgh, dh_prev


# ============================================================================ cell modules


def resolve_rng(rng) -> np.random.Generator:
    """A Generator from None (fresh entropy), an int seed, or a Generator."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def uniform_init(rng: np.random.Generator, shape, bound: float, dtype) -> np.ndarray:
    """U(−bound, bound): PyTorch's recurrent init uses bound = 1/√H."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class _CellBase(Module):
    """Shared plumbing of the three cells: parameters, validation, the stateful step.

    ``forward(x, state)`` runs one step and remembers its cache for ``backward``;
    ``step(x)`` runs one step and keeps the state between calls until
    ``reset_state()`` (the classic ``y = rnn.step(x)`` used for sampling).
    """

    gate_count = 1  # g, the gates stacked in each weight (bptt.nn.gates); set by each cell
    has_cell_state = False

    def __init__(self, input_size, hidden_size, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        if int(input_size) <= 0 or int(hidden_size) <= 0:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size}, {hidden_size}")
        self.input_size, self.hidden_size, self.bias = int(input_size), int(hidden_size), bool(bias)
        self._dtype = np.dtype(dtype)
        rng = resolve_rng(rng)
        G, H, D = self.gate_count * self.hidden_size, self.hidden_size, self.input_size
        k = 1.0 / np.sqrt(H)
        self.add_param("weight_ih", uniform_init(rng, (G, D), k, self._dtype))  # (gH, D)
        self.add_param("weight_hh", uniform_init(rng, (G, H), k, self._dtype))  # (gH, H)
        if self.bias:
            self.add_param("bias_ih", uniform_init(rng, (G,), k, self._dtype))  # (gH,)
            self.add_param("bias_hh", uniform_init(rng, (G,), k, self._dtype))  # (gH,)
        self._ctx = None
        self.state = None

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def _p(self, name):
        return self._own_params.get(name)

    def _g(self, name):
        return self._own_grads.get(name)

    def _check_x(self, x):
        x = as_float_array(x, self._dtype, "input")
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {self.input_size}) or ({self.input_size},), "
                f"got {x.shape}"
            )
        return x

    def _check_state(self, s, N, batched, name="hx"):
        if s is None:
            return np.zeros((N, self.hidden_size), self._dtype)
        s = as_float_array(s, self._dtype, name)
        want = (N, self.hidden_size) if batched else (self.hidden_size,)
        if s.shape != want:
            raise ValueError(f"{type(self).__name__}: {name} must have shape {want}, got {s.shape}")
        return s.reshape(N, self.hidden_size)

    def _input_grads(self, x, dgx, dgh, h_prev):
        """Accumulate ∂L/∂W and return ∂L/∂x from the pre-activation gradients."""
        self._g("weight_ih")[...] += dgx.T @ x
        self._g("weight_hh")[...] += dgh.T @ h_prev
        if self.bias:
            self._g("bias_ih")[...] += dgx.sum(0)
            self._g("bias_hh")[...] += dgh.sum(0)
        return dgx @ self._p("weight_ih")

    def _gx(self, x):
        gx = x @ self._p("weight_ih").T
        if self.bias:
            gx += self._p("bias_ih")
        return gx

    # the stateful step API
    def reset_state(self):
        self.state = None

    def step(self, x):
        """One step from the kept state; returns the new hidden state and keeps it."""
        out = self.forward(x, self.state)
        self._ctx = None  # streaming use: no backward through step()
        self.state = out
        return out[0] if self.has_cell_state else out


class RNNCell(_CellBase):
    r"""An Elman RNN cell:  h' = φ(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh),  φ = tanh or relu.

    Inputs: x (N, D) or (D,); h (N, H) or (H,), zeros if None.
    Returns: h' with h's shape.  ``backward(dh')`` returns ``(dx, dh)``.
    """

    gate_count = gates.gate_count("rnn_tanh")

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", dtype=np.float32, rng=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, dtype, rng)

    def forward(self, x, hx=None):
        x = self._check_x(x)
        batched = x.ndim == 2
        x2 = x.reshape(-1, self.input_size)
        h_prev = self._check_state(hx, x2.shape[0], batched)
        h, cache = rnn_step_forward(self._gx(x2), h_prev, self._p("weight_hh"), self._p("bias_hh"), self.nonlinearity)
        self._ctx = (x2, cache, batched)
        return h if batched else h[0]

    def backward(self, dh):
        x2, cache, batched = self._saved(self._ctx)
        dh = as_float_array(dh, self._dtype, "dh").reshape(cache.h.shape)
        da, dh_prev = rnn_step_backward(dh, cache, self._p("weight_hh"), self.nonlinearity)
        dx = self._input_grads(x2, da, da, cache.h_prev)
        return (dx, dh_prev) if batched else (dx[0], dh_prev[0])


class LSTMCell(_CellBase):
    r"""An LSTM cell (gates i, f, g, o as in PyTorch):

        [a_i a_f a_g a_o] = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh
        c' = σ(a_f) ⊙ c + σ(a_i) ⊙ tanh(a_g)
        h' = σ(a_o) ⊙ tanh(c')

    Inputs: x (N, D) or (D,); state (h, c), each (N, H) or (H,), zeros if None.
    Returns: (h', c').  ``backward(dh', dc'=None)`` returns ``(dx, (dh, dc))``.
    """

    gate_count = gates.gate_count("lstm")
    has_cell_state = True

    def forward(self, x, state=None):
        x = self._check_x(x)
        batched = x.ndim == 2
        x2 = x.reshape(-1, self.input_size)
        N = x2.shape[0]
        hx, cx = (None, None) if state is None else state
        h_prev = self._check_state(hx, N, batched, "h0")
        c_prev = self._check_state(cx, N, batched, "c0")
        h, c, cache = lstm_step_forward(self._gx(x2), h_prev, c_prev, self._p("weight_hh"), self._p("bias_hh"))
        self._ctx = (x2, cache, batched)
        return (h, c) if batched else (h[0], c[0])

    def backward(self, dh, dc=None):
        x2, cache, batched = self._saved(self._ctx)
        shape = cache.c_prev.shape
        dh = as_float_array(dh, self._dtype, "dh").reshape(shape)
        dc = None if dc is None else as_float_array(dc, self._dtype, "dc").reshape(shape)
        da, dh_prev, dc_prev = lstm_step_backward(dh, dc, cache, self._p("weight_hh"))
        dx = self._input_grads(x2, da, da, cache.h_prev)
        if batched:
            return dx, (dh_prev, dc_prev)
        return dx[0], (dh_prev[0], dc_prev[0])


class GRUCell(_CellBase):
    r"""A GRU cell (gates r, z, n as in PyTorch, reset applied after the matrix product):

        r = σ(x W_irᵀ + b_ir + h W_hrᵀ + b_hr)
        z = σ(x W_izᵀ + b_iz + h W_hzᵀ + b_hz)
        n = tanh(x W_inᵀ + b_in + r ⊙ (h W_hnᵀ + b_hn))
        h' = (1 − z) ⊙ n + z ⊙ h

    Inputs: x (N, D) or (D,); h (N, H) or (H,), zeros if None.
    Returns: h'.  ``backward(dh')`` returns ``(dx, dh)``.
    """

    gate_count = gates.gate_count("gru")

    def forward(self, x, hx=None):
        x = self._check_x(x)
        batched = x.ndim == 2
        x2 = x.reshape(-1, self.input_size)
        h_prev = self._check_state(hx, x2.shape[0], batched)
        h, cache = gru_step_forward(self._gx(x2), h_prev, self._p("weight_hh"), self._p("bias_hh"))
        self._ctx = (x2, cache, batched)
        return h if batched else h[0]

    def backward(self, dh):
        x2, cache, batched = self._saved(self._ctx)
        dh = as_float_array(dh, self._dtype, "dh").reshape(cache.h_prev.shape)
        dgx, dgh, dh_prev = gru_step_backward(dh, cache, self._p("weight_hh"))
        dx = self._input_grads(x2, dgx, dgh, cache.h_prev)
        return (dx, dh_prev) if batched else (dx[0], dh_prev[0])
