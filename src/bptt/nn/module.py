"""Parameters, gradients and state dicts: the bookkeeping every layer shares.

A :class:`Module` owns named parameter arrays and a gradient array of the same
shape for each.  Children are registered by name, so that full names compose
with dots exactly like PyTorch's (``encoder.weight_ih_l0``); this is what lets
``load_state_dict`` take ``torch_model.state_dict()`` unchanged.

There is no autograd here.  Every module that computes something has a
``forward`` that saves what its ``backward`` needs, and a ``backward`` that
accumulates (``+=``) into ``self.grads`` and returns the gradient of its inputs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["Module", "StateDictError", "as_float_array", "frozen"]


def frozen(model):
    """``model.frozen_weights()`` (see :meth:`Module.frozen_weights`), or an empty block for a model
    without one (run in ONNX Runtime, say)."""
    block = getattr(model, "frozen_weights", None)
    return block() if block is not None else contextlib.nullcontext()


class StateDictError(ValueError):
    """A state dict whose keys or shapes do not fit the module."""


def as_float_array(x, dtype, name: str = "input") -> np.ndarray:
    """``x`` as an array of ``dtype``; a clear ValueError for anything non-numeric."""
    if type(x) is np.ndarray and x.dtype == dtype:  # the common case, on every layer's every call: no checks to make
        return x
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


class Module:
    """Base class: named parameters, their gradients, children, train/eval.

    Subclasses call ``self.add_param(name, array)`` for each parameter and
    ``self.add_module(name, child)`` for each child.  ``self.params`` and
    ``self.grads`` are flat dicts keyed by full dotted names; the arrays in them
    are the live storage (optimizers update them in place).
    """

    frozen_cache: dict | None = None  # inside frozen_weights(): values derived from the weights, else None

    def __init__(self) -> None:
        self._own_params: dict[str, np.ndarray] = {}
        self._own_grads: dict[str, np.ndarray] = {}
        self._children: dict[str, Module] = {}
        self.training = True

    # ------------------------------------------------------------------ registration
    def add_param(self, name: str, value: np.ndarray) -> np.ndarray:
        value = np.ascontiguousarray(value)
        self._own_params[name] = value
        self._own_grads[name] = np.zeros_like(value)
        return value

    def add_module(self, name: str, module: Module) -> Module:
        self._children[name] = module
        return module

    # ------------------------------------------------------------------ traversal
    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Yield ``(full_name, param, grad)`` for this module and all children."""
        for name, p in self._own_params.items():
            yield prefix + name, p, self._own_grads[name]
        for cname, child in self._children.items():
            yield from child.named_parameters(prefix + cname + ".")

    def modules(self) -> Iterator[Module]:
        yield self
        for child in self._children.values():
            yield from child.modules()

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {n: p for n, p, _ in self.named_parameters()}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return {n: g for n, _, g in self.named_parameters()}

    def num_parameters(self) -> int:
        return sum(p.size for _, p, _ in self.named_parameters())

    @property
    def dtype(self) -> np.dtype:
        for _, p, _ in self.named_parameters():
            return p.dtype
        return np.dtype(getattr(self, "_dtype", np.float32))

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def replica(self) -> Module:
        """A copy of this module tree that shares its parameter arrays but has gradients of its own
        (zeros): another thread can run a forward and backward through it while this one runs its
        own, and its gradients are then added to this one's (:meth:`bptt.lm.model.CharLM.train_step`).
        Every other attribute is copied by reference (a shallow copy of each module): forward contexts
        and recurrent state are rebound by each module's own calls, but a mutable object shared with
        the original (a random generator, a frozen_cache dict) stays shared.  Attributes that point to
        a module of the tree (a tied decoder's embedding) point to that module's copy."""
        clones: dict[int, Module] = {}

        def clone(m):
            c = copy.copy(m)
            clones[id(m)] = c
            c._own_grads = {name: np.zeros_like(g) for name, g in m._own_grads.items()}
            c._children = {name: clone(child) for name, child in m._children.items()}
            return c

        top = clone(self)
        for c in clones.values():
            for name, value in list(vars(c).items()):
                if isinstance(value, Module) and id(value) in clones:
                    setattr(c, name, clones[id(value)])
        return top

    @contextlib.contextmanager
    def frozen_weights(self):
        """A promise, for the duration of the block, that no parameter of this module changes
        (an evaluation pass, a decoding run): a layer may then derive something from its
        weights once and reuse it in every call inside the block.  The recurrent layers keep
        their weights packed for the step products (:mod:`bptt.nn.rnn`; repacking on every
        call was 4% of a 2×128 LSTM's validation pass and 9% of a 2×512's).

        Each module's ``frozen_cache`` is a dict inside the block (the outermost block's, when
        blocks nest) and None outside: whatever a module keeps there is dropped on exit, so a
        weight changed after the block is read afresh.  Changing a weight inside the block
        breaks the promise: calls may then use the old values.
        """
        opened = [m for m in self.modules() if m.frozen_cache is None]
        for m in opened:
            m.frozen_cache = {}
        try:
            yield self
        finally:
            for m in opened:
                m.frozen_cache = None

    def zero_grad(self) -> None:
        for _, _, g in self.named_parameters():
            g.fill(0.0)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, keyed by PyTorch-style dotted names."""
        return {n: p.copy() for n, p, _ in self.named_parameters()}

    def load_state_dict(self, state: Mapping[str, object], strict: bool = True) -> None:
        """Copy ``state`` into the parameters in place (optimizer references stay valid).

        Accepts NumPy arrays or anything ``np.asarray`` understands (PyTorch
        tensors via ``.numpy()``).  Missing keys, unexpected keys and shape
        mismatches are all reported together in one :class:`StateDictError`.
        """
        own = {n: p for n, p, _ in self.named_parameters()}
        problems = []
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        arrays = {}
        for k, p in own.items():
            if k not in state:
                continue
            v = state[k]
            if hasattr(v, "detach"):  # a torch tensor, without importing torch
                v = v.detach().cpu().numpy()
            v = np.asarray(v)
            if v.shape != p.shape:
                problems.append(f"{k}: expected shape {p.shape}, got {v.shape}")
            elif not np.issubdtype(v.dtype, np.number):
                problems.append(f"{k}: expected a numeric array, got dtype {v.dtype}")
            else:
                arrays[k] = v
        if problems:
            raise StateDictError("cannot load state dict into " + type(self).__name__ + ": " + "; ".join(problems))
        for k, v in arrays.items():
            own[k][...] = v

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the parameters as a safetensors file (no pickle anywhere)."""
        from safetensors.numpy import save_file

        save_file(self.state_dict(), str(path), metadata=metadata)

    def load(self, path: str | Path, strict: bool = True) -> None:
        """Read parameters written by :meth:`save` (or by ``safetensors.torch.save_file``)."""
        from safetensors.numpy import load_file

        self.load_state_dict(load_file(str(path)), strict=strict)

    # ------------------------------------------------------------------ calling
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def _saved(self, ctx):
        """The context of the last forward, or a clear error if there is none."""
        if ctx is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called without a preceding forward() "
                "(or the context was already consumed)"
            )
        return ctx

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return f"{type(self).__name__}({extra})"

    def extra_repr(self) -> str:
        return ""
