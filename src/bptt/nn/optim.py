"""Optimizers, gradient clipping and learning-rate schedules, with PyTorch's semantics.

Every optimizer reproduces the corresponding ``torch.optim`` class step for step
(same eps placement, bias correction, first-step momentum buffer, ...); the
tests compare parameters against PyTorch to 1e-12 relative in float64.

Notation in the docstrings (as in the PyTorch documentation): θ parameters,
g_t the gradient at step t (t counts from 1), γ the learning rate, λ the weight
decay.  Updates are in place: the parameter arrays of a :class:`~bptt.nn.module.Module`
are the live storage, so the model sees the new values without any copying.

Usage::

    opt = Adam(model, lr=2e-3)
    sched = CosineLR(2e-3, total_steps=10_000, warmup_steps=500)
    for step in range(10_000):
        opt.zero_grad()
        ...                         # forward, loss, backward (fills model.grads)
        clip_grad_norm(model, 5.0)
        opt.lr = sched(step)
        opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from bptt.nn.module import Module

__all__ = [
    "Optimizer",
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "clip_grad_norm",
    "clip_grad_value",
    "Schedule",
    "ConstantLR",
    "StepLR",
    "CharRNNDecay",
    "CosineLR",
    "make_optimizer",
    "make_schedule",
    "OPTIMIZERS",
    "SCHEDULES",
]


# ============================================================================ optimizers
class Optimizer:
    """Base class: holds ``(name, param, grad)`` triples and per-parameter state.

    Args:
        params: a :class:`~bptt.nn.module.Module`, or an iterable of
            ``(name, param, grad)`` triples (as yielded by ``Module.named_parameters()``).
            The arrays are kept by reference and updated in place.
        lr: learning rate; a public attribute, so a schedule may set it before each step.

    Subclasses list their per-parameter buffers in ``_buffer_names()`` and
    implement ``_update``.  State buffers are allocated (zeros, the parameter's
    dtype) at construction, so ``state_dict`` always has the same keys.
    """

    #: hyperparameter names saved in ``state_dict()`` meta (besides ``lr``)
    _hyper: tuple[str, ...] = ()

    def __init__(self, params, lr: float) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        self.lr = float(lr)
        self.step_count = 0
        self._params: list[tuple[str, np.ndarray, np.ndarray]] = _collect_params(params)
        # Scratch space shared by all parameters of one dtype (sized for the largest),
        # so a step allocates no parameter-sized temporaries.
        self._scratch: dict[tuple[str, int], np.ndarray] = {}
        self.state: dict[str, dict[str, np.ndarray]] = {
            buf: {name: np.zeros_like(p) for name, p, _ in self._params} for buf in self._buffer_names()
        }

    # ------------------------------------------------------------------ public API
    @property
    def param_names(self) -> list[str]:
        return [name for name, _, _ in self._params]

    @property
    def grads(self) -> list[np.ndarray]:
        return [g for _, _, g in self._params]

    def zero_grad(self) -> None:
        """Set every gradient to zero (in place, so modules keep their references)."""
        for _, _, g in self._params:
            g.fill(0.0)

    def step(self) -> None:
        """Apply one update to every parameter from its current gradient."""
        self.step_count += 1
        for name, p, g in self._params:
            self._update(name, p, g)

    def hyperparameters(self) -> dict:
        """The JSON-serialisable hyperparameters, ``lr`` included."""
        out = {"lr": self.lr}
        for k in self._hyper:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(arrays, meta)``: copies of all state buffers, and JSON-able metadata.

        ``arrays`` is keyed ``"<buffer>.<param name>"`` (e.g. ``"exp_avg.weight_ih_l0"``);
        ``meta`` holds the optimizer type, its hyperparameters and the step count.
        The pair fits a safetensors file (arrays) plus a JSON string (meta).
        """
        arrays = {f"{buf}.{name}": a.copy() for buf, per in self.state.items() for name, a in per.items()}
        meta = {"type": type(self).__name__, "step": self.step_count, "hyperparameters": self.hyperparameters()}
        return arrays, meta

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Restore what :meth:`state_dict` returned, exactly (a resumed run continues bit for bit).

        Hyperparameters (``lr`` included) and the step count are taken from
        ``meta``, as PyTorch does.  Raises ValueError naming every missing,
        unexpected or mismatched key; nothing is modified in that case.
        """
        problems = []
        kind = meta.get("type")
        if kind != type(self).__name__:
            problems.append(f"state is for optimizer {kind!r}, not {type(self).__name__!r}")
        hyper = dict(meta.get("hyperparameters", {}))
        missing_h = [k for k in ("lr", *self._hyper) if k not in hyper]
        if missing_h:
            problems.append("missing hyperparameters: " + ", ".join(missing_h))
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            problems.append(f"meta 'step' must be a non-negative int, got {step!r}")
        own = {f"{buf}.{name}": a for buf, per in self.state.items() for name, a in per.items()}
        missing = [k for k in own if k not in arrays]
        unexpected = [k for k in arrays if k not in own]
        if missing:
            problems.append("missing keys: " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        for k, a in own.items():
            if k in arrays:
                v = np.asarray(arrays[k])
                if v.shape != a.shape or v.dtype != a.dtype:
                    problems.append(f"{k}: expected {a.dtype} {a.shape}, got {v.dtype} {v.shape}")
        if problems:
            raise ValueError(f"cannot load {type(self).__name__} state: " + "; ".join(problems))
        for k, a in own.items():
            a[...] = arrays[k]
        self.lr = float(hyper["lr"])
        for k in self._hyper:
            v = hyper[k]
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.step_count = step

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hp})"

    # ------------------------------------------------------------------ for subclasses
    def _buffer_names(self) -> list[str]:
        return []

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _work(self, p: np.ndarray, k: int) -> np.ndarray:
        """The k-th scratch array, viewed with ``p``'s shape and dtype."""
        key = (p.dtype.str, k)
        buf = self._scratch.get(key)
        if buf is None:
            size = max(q.size for _, q, _ in self._params if q.dtype == p.dtype)
            buf = self._scratch[key] = np.empty(size, dtype=p.dtype)
        return buf[: p.size].reshape(p.shape)

    def _decayed_grad(self, p: np.ndarray, g: np.ndarray, weight_decay: float) -> np.ndarray:
        """g + λθ in scratch 0 (or ``g`` itself when λ = 0): the user's grad is never modified."""
        if weight_decay == 0:
            return g
        out = np.multiply(p, weight_decay, out=self._work(p, 0))
        out += g
        return out


def _kernels():
    """bptt.kernels, imported on first use (importing Numba is slow)."""
    from bptt import kernels

    return kernels


def _collect_params(params) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if isinstance(params, Module):
        triples = list(params.named_parameters())
    elif isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise TypeError(
            "params must be a bptt Module or an iterable of (name, param, grad) triples, "
            f"got {type(params).__name__}"
        )
    else:
        triples = list(params)
    out, seen = [], set()
    for i, t in enumerate(triples):
        if not (isinstance(t, tuple) and len(t) == 3):
            raise TypeError(f"params[{i}] must be a (name, param, grad) triple")
        name, p, g = t
        if not isinstance(p, np.ndarray) or not isinstance(g, np.ndarray):
            raise TypeError(f"{name}: param and grad must be NumPy arrays (they are updated in place)")
        if not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"{name}: parameters must be floating point, got {p.dtype}")
        if p.shape != g.shape or p.dtype != g.dtype:
            raise ValueError(f"{name}: grad {g.dtype} {g.shape} does not match param {p.dtype} {p.shape}")
        if name in seen:
            raise ValueError(f"duplicate parameter name {name!r}")
        seen.add(name)
        out.append((name, p, g))
    return out


class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with momentum (PyTorch's ``torch.optim.SGD``).

    For t ≥ 1::

        g_t ← g_t + λ θ_{t−1}                      if λ ≠ 0
        b_t ← g_t                                  if t = 1      (momentum μ ≠ 0)
        b_t ← μ b_{t−1} + (1 − τ) g_t              if t > 1
        g_t ← g_t + μ b_t   if nesterov,  else  g_t ← b_t
        θ_t ← θ_{t−1} − γ g_t

    τ is the dampening.  Note the first momentum buffer is the gradient itself,
    not (1 − τ) g_1, exactly as in PyTorch.  Nesterov needs μ > 0 and τ = 0.
    """

    _hyper = ("momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        if not momentum >= 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        super().__init__(params, lr)

    def _buffer_names(self) -> list[str]:
        return ["momentum_buffer"] if self.momentum != 0 else []

    def _update(self, name, p, g):
        d = self._decayed_grad(p, g, self.weight_decay)
        tmp = self._work(p, 1)
        if self.momentum != 0:
            buf = self.state["momentum_buffer"][name]
            if self.step_count == 1:
                np.copyto(buf, d)
            else:
                buf *= self.momentum
                if self.dampening == 0:
                    buf += d
                else:
                    buf += np.multiply(d, 1.0 - self.dampening, out=tmp)
            if self.nesterov:
                nest = np.multiply(buf, self.momentum, out=tmp)
                nest += d
                d = nest
            else:
                d = buf
        p -= np.multiply(d, self.lr, out=tmp)


class Adagrad(Optimizer):
    r"""Adagrad (PyTorch's ``torch.optim.Adagrad``).

    With lr decay η, accumulator initial value s_0 and ε, for t ≥ 1::

        g_t ← g_t + λ θ_{t−1}                      if λ ≠ 0
        γ̃  ← γ / (1 + (t − 1) η)
        s_t ← s_{t−1} + g_t²
        θ_t ← θ_{t−1} − γ̃ g_t / (√s_t + ε)
    """

    _hyper = ("lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> None:
        for what, v in (("lr_decay", lr_decay), ("weight_decay", weight_decay),
                        ("initial_accumulator_value", initial_accumulator_value), ("epsilon", eps)):
            if not v >= 0.0:
                raise ValueError(f"Invalid {what} value: {v}")
        self.lr_decay = float(lr_decay)
        self.weight_decay = float(weight_decay)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.eps = float(eps)
        super().__init__(params, lr)
        for a in self.state["sum"].values():
            a.fill(self.initial_accumulator_value)

    def _buffer_names(self) -> list[str]:
        return ["sum"]

    def _update(self, name, p, g):
        d = self._decayed_grad(p, g, self.weight_decay)
        tmp = self._work(p, 1)
        clr = self.lr / (1 + (self.step_count - 1) * self.lr_decay)
        acc = self.state["sum"][name]
        acc += np.multiply(d, d, out=tmp)
        std = np.sqrt(acc, out=tmp)
        std += self.eps
        step = np.divide(d, std, out=tmp)
        step *= clr
        p -= step


class RMSprop(Optimizer):
    r"""RMSprop (PyTorch's ``torch.optim.RMSprop``; ε outside the square root).

    With smoothing α, momentum μ, for t ≥ 1 (v_0 = 0, ḡ_0 = 0, b_0 = 0)::

        g_t ← g_t + λ θ_{t−1}                      if λ ≠ 0
        v_t ← α v_{t−1} + (1 − α) g_t²
        ṽ_t ← v_t − ḡ_t²,  ḡ_t ← α ḡ_{t−1} + (1 − α) g_t     if centered,  else  ṽ_t ← v_t
        b_t ← μ b_{t−1} + g_t / (√ṽ_t + ε),   θ_t ← θ_{t−1} − γ b_t     if μ > 0
        θ_t ← θ_{t−1} − γ g_t / (√ṽ_t + ε)                              otherwise

    Unlike SGD, the momentum buffer starts at zero.
    """

    _hyper = ("alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        for what, v in (("alpha", alpha), ("epsilon", eps), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not v >= 0.0:
                raise ValueError(f"Invalid {what} value: {v}")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.centered = bool(centered)
        super().__init__(params, lr)

    def _buffer_names(self) -> list[str]:
        names = ["square_avg"]
        if self.momentum > 0:
            names.append("momentum_buffer")
        if self.centered:
            names.append("grad_avg")
        return names

    def _update(self, name, p, g):
        buf = self.state["momentum_buffer"][name] if self.momentum > 0 else None
        if not self.centered and _kernels().rmsprop_step(p, g, self.state["square_avg"][name], buf, self.lr,
                                                         self.alpha, self.eps, self.weight_decay, self.momentum):
            return  # the formulas below, compiled into one pass (bptt.kernels)
        d = self._decayed_grad(p, g, self.weight_decay)
        tmp = self._work(p, 1)
        a = self.alpha
        sq = self.state["square_avg"][name]
        sq *= a
        t = np.multiply(d, d, out=tmp)
        t *= 1.0 - a
        sq += t
        if self.centered:
            gavg = self.state["grad_avg"][name]
            gavg *= a
            gavg += np.multiply(d, 1.0 - a, out=tmp)
            avg = np.multiply(gavg, gavg, out=tmp)
            np.subtract(sq, avg, out=avg)
            np.sqrt(avg, out=avg)
        else:
            avg = np.sqrt(sq, out=tmp)
        avg += self.eps
        step = np.divide(d, avg, out=tmp)
        if self.momentum > 0:
            buf = self.state["momentum_buffer"][name]
            buf *= self.momentum
            buf += step
            step = np.multiply(buf, self.lr, out=tmp)
        else:
            step *= self.lr
        p -= step


class Adam(Optimizer):
    r"""Adam (PyTorch's ``torch.optim.Adam``), optionally AMSGrad.

    With β₁, β₂, ε, for t ≥ 1 (m_0 = v_0 = v̂max_0 = 0)::

        g_t ← g_t + λ θ_{t−1}                      if λ ≠ 0   (L2 penalty, coupled)
        m_t ← β₁ m_{t−1} + (1 − β₁) g_t
        v_t ← β₂ v_{t−1} + (1 − β₂) g_t²
        v_t^max ← max(v_{t−1}^max, v_t)  and use it in place of v_t     if amsgrad
        θ_t ← θ_{t−1} − (γ / (1 − β₁^t)) · m_t / (√v_t / √(1 − β₂^t) + ε)

    ε is added after the bias correction of √v_t, as in PyTorch.
    """

    _hyper = ("betas", "eps", "weight_decay", "amsgrad")
    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        b1, b2 = betas
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {b1}")
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {b2}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.amsgrad = bool(amsgrad)
        super().__init__(params, lr)

    def _buffer_names(self) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if self.amsgrad else [])

    def _update(self, name, p, g):
        b1, b2 = self.betas
        if self._decoupled:
            if self.weight_decay != 0:
                p *= 1.0 - self.lr * self.weight_decay
        m = self.state["exp_avg"][name]
        v = self.state["exp_avg_sq"][name]
        n = self.step_count
        vmax = self.state["max_exp_avg_sq"][name] if self.amsgrad else None
        if _kernels().adam_step(p, g, m, v, vmax, self.lr / (1 - b1**n), b1, b2, self.eps,
                                0.0 if self._decoupled else self.weight_decay, (1 - b2**n) ** 0.5):
            return  # the formulas below, compiled into one pass (bptt.kernels)
        d = g if self._decoupled else self._decayed_grad(p, g, self.weight_decay)
        tmp = self._work(p, 1)
        m *= b1
        m += np.multiply(d, 1.0 - b1, out=tmp)
        v *= b2
        sq = np.multiply(d, d, out=tmp)
        sq *= 1.0 - b2
        v += sq
        if self.amsgrad:
            np.maximum(vmax, v, out=vmax)
            v = vmax
        step_size = self.lr / (1 - b1**n)
        denom = np.sqrt(v, out=tmp)
        denom /= (1 - b2**n) ** 0.5
        denom += self.eps
        step = np.divide(m, denom, out=tmp)
        step *= step_size
        p -= step


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay (PyTorch's ``torch.optim.AdamW``).

    As :class:`Adam` with λ = 0 in the gradient, but first, for t ≥ 1::

        θ_{t−1} ← θ_{t−1} (1 − γ λ)

    then the Adam step (m, v, optional AMSGrad max, bias corrections) from g_t.
    """

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


# ============================================================================ clipping
def _grad_arrays(grads_or_module) -> list[np.ndarray]:
    if isinstance(grads_or_module, Module):
        return [g for _, _, g in grads_or_module.named_parameters()]
    if isinstance(grads_or_module, Optimizer):
        return grads_or_module.grads
    if isinstance(grads_or_module, np.ndarray):
        return [grads_or_module]
    if isinstance(grads_or_module, Mapping):  # e.g. Module.grads
        grads_or_module = grads_or_module.values()
    out = list(grads_or_module)
    for g in out:
        if not isinstance(g, np.ndarray):
            raise TypeError(f"gradients must be NumPy arrays (they are modified in place), got {type(g).__name__}")
    return out


def clip_grad_norm(grads_or_module, max_norm: float) -> float:
    r"""Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    ::

        ‖g‖ = √(Σ_arrays Σ_i g_i²)
        c   = max_norm / (‖g‖ + 1e-6)
        g  ← c g        if c < 1

    as ``torch.nn.utils.clip_grad_norm_`` (which multiplies by min(c, 1)).
    Accepts a Module, an Optimizer, a dict of grads or an iterable of arrays;
    returns the norm before clipping.  A non-finite norm is returned without
    touching the gradients (PyTorch would fill them with NaN), so the caller can
    skip the step.
    """
    if not max_norm >= 0.0:
        raise ValueError(f"max_norm must be non-negative, got {max_norm}")
    grads = _grad_arrays(grads_or_module)
    total = math.sqrt(sum(_sum_of_squares(g) for g in grads))
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


def _sum_of_squares(g: np.ndarray, chunk: int = 1 << 20) -> float:
    """Σ g_i² in float64 (float32 squares of a large model's gradients lose precision when summed).

    NumPy ufuncs in bounded chunks, not ``np.dot``: a BLAS dot outside the step wakes OpenBLAS's
    thread pool, whose threads then spin on the cores the next step's compiled loop runs on — it
    halved the throughput of the 2×256 char LM (32 k → 18 k characters a second on 2 cores).
    """
    flat = g.reshape(-1)
    return sum(float(np.square(flat[i:i + chunk], dtype=np.float64).sum()) for i in range(0, flat.size, chunk))


def clip_grad_value(grads_or_module, clip: float) -> None:
    """Clamp every gradient element to [−clip, clip] in place (``torch.nn.utils.clip_grad_value_``)."""
    if not clip >= 0.0:
        raise ValueError(f"clip must be non-negative, got {clip}")
    for g in _grad_arrays(grads_or_module):
        np.clip(g, -clip, clip, out=g)


# ============================================================================ schedules
class Schedule:
    """A learning rate as a function of the optimizer step (counted from 0).

    ``config()`` is JSON-able and ``make_schedule(**config)`` rebuilds the schedule.
    """

    name = ""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _check_step(step: int) -> int:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


class ConstantLR(Schedule):
    """lr(t) = lr."""

    name = "constant"

    def __init__(self, lr: float) -> None:
        self.lr = float(lr)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.lr


class StepLR(Schedule):
    """lr(t) = lr · γ^⌊t / step_size⌋: multiplied by γ every ``step_size`` steps."""

    name = "step"

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1) -> None:
        if int(step_size) < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        self.lr = float(lr)
        self.step_size = int(step_size)
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** (_check_step(step) // self.step_size)


class CharRNNDecay(Schedule):
    """char-rnn's exponential decay, one factor per epoch after a warm period.

    Karpathy's ``train.lua`` runs iterations i = 1, 2, ... and, after iteration
    i with i mod steps_per_epoch = 0 (the end of epoch e = i / steps_per_epoch),
    multiplies the learning rate by ``decay_rate`` if e ≥ ``decay_after_epochs``.
    With t = i − 1 counting steps from 0, the lr used by step t is therefore::

        k(t)  = max(0, ⌊t / steps_per_epoch⌋ − max(decay_after_epochs, 1) + 1)
        lr(t) = lr · decay_rate^k(t)

    E.g. 100 steps per epoch, decay after 10: steps 0..999 use lr, steps
    1000..1099 use 0.97 lr (the first decay happens at the end of epoch 10).
    """

    name = "charrnn"

    def __init__(self, lr: float, steps_per_epoch: int, decay_after_epochs: int = 10,
                 decay_rate: float = 0.97) -> None:
        if int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if int(decay_after_epochs) < 0:
            raise ValueError(f"decay_after_epochs must be >= 0, got {decay_after_epochs}")
        self.lr = float(lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay_after_epochs = int(decay_after_epochs)
        self.decay_rate = float(decay_rate)

    def __call__(self, step: int) -> float:
        epochs_done = _check_step(step) // self.steps_per_epoch
        k = max(0, epochs_done - max(self.decay_after_epochs, 1) + 1)
        return self.lr * self.decay_rate**k


class CosineLR(Schedule):
    """Linear warm-up, then half a cosine from ``lr`` down to ``min_lr``.

    With W = warmup_steps, S = total_steps::

        lr(t) = lr · (t + 1) / W                                   for t < W
        p     = min(1, (t − W) / max(1, S − W))
        lr(t) = min_lr + (lr − min_lr) · (1 + cos(π p)) / 2          for t ≥ W

    So the first step already trains (lr/W), step W−1 uses lr, step W uses lr,
    and every step t ≥ S uses min_lr.
    """

    name = "cosine"

    def __init__(self, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= int(warmup_steps) <= int(total_steps):
            raise ValueError(f"warmup_steps must be in [0, total_steps], got {warmup_steps}")
        self.lr = float(lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)

    def __call__(self, step: int) -> float:
        t = _check_step(step)
        w = self.warmup_steps
        if t < w:
            return self.lr * (t + 1) / w
        p = min(1.0, (t - w) / max(1, self.total_steps - w))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


# ============================================================================ factories
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
}

SCHEDULES: dict[str, type[Schedule]] = {
    "constant": ConstantLR,
    "step": StepLR,
    "charrnn": CharRNNDecay,
    "cosine": CosineLR,
}


def make_optimizer(name: str, params, lr: float, **kw) -> Optimizer:
    """``make_optimizer("adam", model, 2e-3, betas=(0.9, 0.99))``; name is case-insensitive."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return cls(params, lr, **kw)


def make_schedule(name: str, **kw) -> Schedule:
    """``make_schedule("cosine", lr=1e-3, total_steps=1000)``; also ``make_schedule(**sched.config())``."""
    cls = SCHEDULES.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    return cls(**kw)
