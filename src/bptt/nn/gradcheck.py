"""Centred-difference gradient checking, usable on any layer, model or loss.

For a scalar function L of an array x, the centred difference

    ∂L/∂x_i ≈ (L(x + ε e_i) − L(x − ε e_i)) / 2ε

has error O(ε²); in float64 with ε = 1e-6 it agrees with a correct analytic
gradient to about 1e-8 relative.  Compare with :func:`rel_error`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["numerical_gradient", "rel_error", "gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """An analytic gradient that disagrees with the numerical one."""


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max(|a|, |b|): one number for a whole array (0 when both are 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(a - b)) / scale)


def numerical_gradient(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """∂f/∂x by centred differences; ``f`` reads ``x`` (modified in place and restored)."""
    if x.dtype != np.float64:
        raise ValueError(f"gradient checks need float64 arrays, got {x.dtype}")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous so it can be perturbed in place")
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(
    f: Callable[[], float],
    wrt: Mapping[str, np.ndarray],
    analytic: Mapping[str, np.ndarray],
    eps: float = 1e-6,
    tol: float = 1e-6,
    raise_on_failure: bool = True,
) -> dict[str, float]:
    """Compare analytic gradients with centred differences.

    Args:
        f: computes the scalar loss from the current contents of the arrays in ``wrt``.
        wrt: name → float64 array that ``f`` reads (perturbed in place, then restored).
        analytic: name → the analytic ∂f/∂array, same shapes.
        eps, tol: step size, and the largest relative error (:func:`rel_error`) accepted.

    Returns name → relative error.  Raises :class:`GradcheckError` naming every
    array whose error exceeds ``tol`` (unless ``raise_on_failure`` is False).

    Example::

        out, _ = rnn(x); rnn.zero_grad(); rnn.backward(dout)     # dout = ∂L/∂out
        gradcheck(lambda: float(np.sum(rnn(x)[0] * dout)), rnn.params, rnn.grads)
    """
    errors = {}
    for name, x in wrt.items():
        if name not in analytic:
            raise KeyError(f"no analytic gradient for {name!r}")
        num = numerical_gradient(f, x, eps)
        errors[name] = rel_error(analytic[name], num)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad and raise_on_failure:
        detail = ", ".join(f"{k}: {v:.2e}" for k, v in bad.items())
        raise GradcheckError(f"gradient check failed (tol {tol:.0e}): {detail}")
    return errors
