"""The vectorisable exp / tanh / sigmoid (bptt.kernels.mathfn) against NumPy's, in both dtypes,
called the way the kernels call them (act_* inside a compiled loop)."""

import numpy as np
import pytest

from conftest import require_numba

require_numba()

from numba import njit  # noqa: E402

from bptt.kernels import mathfn  # noqa: E402


@njit(cache=False)
def _apply(x, which):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        if which == 0:
            out[i] = mathfn.act_tanh(x[i])
        elif which == 1:
            out[i] = mathfn.act_sigmoid(x[i])
        else:
            out[i] = mathfn.act_exp_neg(-abs(x[i]))
    return out


def points(dtype):
    x = np.concatenate([np.linspace(-30, 30, 20001), np.geomspace(1e-12, 1e-1, 200), -np.geomspace(1e-12, 1e-1, 200),
                        [0.0, -0.0, 0.0625, -0.0625, 700.0, -700.0, -1e4, 1e4]])
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_act_functions_match_numpy(dtype):
    """Error within 4 ulp of the dtype (measured: at most 2.2 in float64, 2.4 in float32), relative,
    but for float64 tanh near 0, absolute; float32 tanh has an odd series there), finite at the ends."""
    x = points(dtype)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want = {0: np.tanh(x64), 1: 1 / (1 + np.exp(-x64)), 2: np.exp(-np.abs(x64))}
    ulps = {np.float64: 4, np.float32: 4}[dtype]
    eps = np.finfo(dtype).eps
    for which, w in want.items():
        got = _apply(x, which)
        assert got.dtype == dtype
        assert np.isfinite(got).all()
        tiny = np.finfo(dtype).tiny
        scale = np.maximum(np.abs(w), tiny)
        if which == 0 and dtype == np.float64:  # no small-x series in float64: near 0, 1 − e^{−2|x|}
            scale = np.maximum(scale, 1.0)  # cancels to a few ulp of 1 (absolute), as in the kernels
        err = np.abs(got.astype(np.float64) - w) / scale
        big = np.abs(w) > 1e3 * tiny  # e^x below float's range flushes to 0 (the kernels clamp there)
        assert err[big].max() <= ulps * eps, (which, err[big].max() / eps)


def test_tanh_and_sigmoid_are_odd_and_symmetric():
    x = np.linspace(0, 20, 4001)
    np.testing.assert_array_equal(_apply(-x, 0), -_apply(x, 0))
    s, s_neg = _apply(x, 1), _apply(-x, 1)
    assert np.abs(s + s_neg - 1).max() <= 2 * np.finfo(np.float64).eps
