"""The Transformer's compiled passes (bptt.kernels.transformer) against their NumPy references, in float64
and float32: the normal CDF of the exact GELU, the GELU, LayerNorm forward and backward, the attention
softmax forward and backward (causal, masked, dead rows); and a whole encoder layer run both ways."""

import math

import numpy as np
import pytest

from conftest import require_numba

require_numba()

from numba import njit  # noqa: E402

from bptt.kernels import mathfn  # noqa: E402
from bptt.kernels import transformer as kt  # noqa: E402
from bptt.nn.feedforward import gelu_reference  # noqa: E402
from bptt.nn.multihead import causal_mask, softmax_rows, softmax_rows_backward  # noqa: E402
from bptt.nn.norm import layer_norm_backward, layer_norm_forward  # noqa: E402

DTYPES = [np.float64, np.float32]


@njit(cache=False)
def _cdf(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = mathfn.act_normal_cdf(x[i])
    return out


def test_normal_cdf32_against_erfc():
    """Φ for float32 against ½ erfc(−x/√2) in float64: absolute error < 6e-8 everywhere (that of the
    float32 formula ½ (1 + erff) the reference computes: 5.9e-8 on this grid), within 1 ulp where Φ ≥ ½
    (measured: 0.96), and in [0, 1]."""
    x = np.concatenate([np.linspace(-20, 20, 400_001), np.geomspace(1e-30, 1, 500), -np.geomspace(1e-30, 1, 500),
                        [0.0, -0.0, np.sqrt(2), -np.sqrt(2), 4 * np.sqrt(2), -4 * np.sqrt(2)]]).astype(np.float32)
    got = _cdf(x)
    assert got.dtype == np.float32
    truth = np.array([0.5 * math.erfc(-float(v) / math.sqrt(2.0)) for v in x])
    err = np.abs(got.astype(np.float64) - truth)
    assert err.max() < 6e-8, err.max()
    upper = x >= 0
    ulps = err[upper] / np.spacing(truth[upper].astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0, ulps.max()
    assert ((got >= 0) & (got <= 1)).all()


def test_normal_cdf_float64_is_libm():
    x = np.linspace(-9, 9, 10_001)
    want = np.array([0.5 * (1.0 + math.erf(v * (1 / math.sqrt(2.0)))) for v in x])
    np.testing.assert_array_equal(_cdf(x), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_equals_reference(dtype):
    """y and dy/dx: float64 y to 2e-16 relative (the same libm erf), dy/dx = Φ + x φ to 4e-16 (1 + |x|)
    absolute (e^{−x²/2} from the kernels' exp, and Φ + x φ cancels for x < 0); float32 within
    2e-7 (1 + |x|) absolute — the size of the reference's own float32 error."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20_000) * 3, np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30]])
    x = x.astype(dtype).reshape(-1, 4)  # any shape
    y, g = kt.gelu_forward(x)
    y_ref, g_ref = gelu_reference(x)
    assert y.dtype == dtype and g.dtype == dtype and y.shape == x.shape
    if dtype == np.float64:
        np.testing.assert_allclose(y, y_ref, rtol=2e-16, atol=1e-300)
        assert (np.abs(g - g_ref) <= 4e-16 * (1 + np.abs(x))).all()
    else:
        tol = 2e-7 * (1 + np.abs(x.astype(np.float64)))
        assert (np.abs(y.astype(np.float64) - y_ref) <= tol).all()
        assert (np.abs(g.astype(np.float64) - g_ref) <= tol).all()
        big = np.abs(x) > 0.5  # away from 0, relative: a few ulp
        np.testing.assert_allclose(y[big & (x > 0)], y_ref[big & (x > 0)], rtol=3e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_value_alone_is_the_same_y(dtype):
    x = (np.random.default_rng(2).standard_normal((50, 33)) * 4).astype(dtype)
    y, g = kt.gelu_forward(x)
    y_only, none = kt.gelu_forward(x, need_grad=False)
    assert none is None
    np.testing.assert_array_equal(y_only, y)


def test_gelu_declines_what_it_cannot_do():
    assert kt.gelu_forward(np.ones((3, 4), np.float32)[:, ::2]) is None  # not contiguous
    assert kt.gelu_forward(np.ones(3, np.int64)) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_equals_numpy(dtype):
    rng = np.random.default_rng(5)
    y = np.maximum(rng.standard_normal((64, 33)), 0).astype(dtype)
    y[3, :3] = [np.nan, -0.0, 0.0]
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = np.full_like(dy, 7.0)
    assert kt.relu_backward(dy, y, dx) is dx
    np.testing.assert_array_equal(dx, np.where(y <= 0, 0, dy))
    view = np.empty((64, 40), dtype)[:, :33]  # rows apart, each contiguous
    kt.relu_backward(dy, y, view)
    np.testing.assert_array_equal(view, dx)
    assert kt.relu_backward(dy[:, ::2], y[:, ::2], dx[:, ::2]) is None  # strided rows: declined
    assert kt.relu_backward(dy, y.astype(np.float64 if dtype == np.float32 else np.float32), dx) is None


def _ln_reference(x2, eps, weight, bias):
    xhat, cache = layer_norm_forward(x2, eps)
    y = None if weight is None else xhat * weight + (0 if bias is None else bias)
    return y, xhat, cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_equals_reference(dtype, affine):
    """Forward (y, x̂, rstd) and backward (dx, and dγ, dβ added to what was there) against the NumPy
    formulas of bptt.nn.norm evaluated in float64 on the same numbers (for float32 data the kernel sums
    in float64, where the float32 reference loses digits on a row with a large mean: 3e-4 relative
    here); rows with a large mean, and a constant row (σ² = 0)."""
    rng = np.random.default_rng(1)
    M, n, eps = 37, 48, 1e-5
    x2 = rng.standard_normal((M, n)) * 2
    x2[3] += 300.0
    x2[5] = 0.25
    x2 = x2.astype(dtype)
    weight = (1 + 0.3 * rng.standard_normal(n)).astype(dtype) if affine != "none" else None
    bias = (0.3 * rng.standard_normal(n)).astype(dtype) if affine == "weight+bias" else None
    y, xhat, rstd = kt.layer_norm_forward(x2, eps, weight, bias)
    f64 = (lambda a: None if a is None else a.astype(np.float64))
    y_ref, xhat_ref, cache = _ln_reference(f64(x2), eps, f64(weight), f64(bias))
    tol = {np.float64: 1e-13, np.float32: 1e-6}[dtype]
    np.testing.assert_allclose(xhat, xhat_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(rstd, cache.rstd, rtol=tol)
    assert xhat.dtype == dtype and rstd.shape == (M, 1) and rstd.dtype == dtype
    if weight is None:
        assert y is None
    else:
        assert y.dtype == dtype
        np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)

    dy = rng.standard_normal((M, n)).astype(dtype)
    dweight = np.full(n, 0.5, dtype) if weight is not None else None
    dbias = np.full(n, -0.25, dtype) if bias is not None else None
    dx = kt.layer_norm_backward(dy, xhat, rstd, weight, dweight, dbias)
    dx_ref = layer_norm_backward(f64(dy) if weight is None else f64(dy) * f64(weight), cache)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, dx_ref, rtol=10 * tol, atol=10 * tol)
    if weight is not None:
        np.testing.assert_allclose(dweight, 0.5 + (f64(dy) * xhat_ref).sum(0), rtol=10 * tol)
    if bias is not None:
        np.testing.assert_allclose(dbias, -0.25 + f64(dy).sum(0), rtol=10 * tol)


def _scores(rng, B, L, S, dtype):
    return (3 * rng.standard_normal((B, L, S))).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(7, 7), (5, 9), (9, 4), (40, 37), (20, 70)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [0.37, -0.8])
def test_softmax_rows_equals_reference(dtype, L, S, causal, scale):
    """Forward and backward with a scale (a negative one too: F.scaled_dot_product_attention takes any),
    causal (top-left aligned, also when L ≠ S) or not; the kernel's causal slots are exactly 0 whatever
    the scores held there.  Rows of 37 and 70 keys run the row maximum's 16 lanes and its tail."""
    rng = np.random.default_rng(2)
    s = _scores(rng, 6, L, S, dtype)
    a = kt.softmax_rows(s.copy(), scale, causal)
    a_ref = softmax_rows(s.copy(), scale, causal)
    rtol = {np.float64: 1e-14, np.float32: 1e-6}[dtype]
    np.testing.assert_allclose(a, a_ref, rtol=rtol, atol=1e-300 if dtype == np.float64 else 1e-30)
    if causal:
        assert (a[:, causal_mask(L, S)] == 0).all()
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=rtol * 10)

    da = rng.standard_normal(a.shape).astype(dtype)
    ds = kt.softmax_rows_backward(a, da.copy(), scale, causal)
    ds_ref = softmax_rows_backward(a, da.copy(), scale, causal)
    np.testing.assert_allclose(ds, ds_ref, rtol=rtol * 10, atol=rtol)
    if causal:
        assert (ds[:, causal_mask(L, S)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nan", [False, True])
def test_softmax_rows_masked_and_dead_rows(dtype, nan):
    """−∞ scores (masks added beforehand) get weight 0; a row of only −∞ becomes 0 (sdpa) or NaN."""
    rng = np.random.default_rng(3)
    s = _scores(rng, 3, 5, 6, dtype)
    s[rng.random(s.shape) < 0.4] = -np.inf
    s[0, 2] = -np.inf  # a dead row
    s[1, :, 0] = 1.0  # every other row of matrix 1 has a key
    a = kt.softmax_rows(s.copy(), 1.0, False, dead_rows_nan=nan)
    a_ref = softmax_rows(s.copy(), 1.0, False, dead_rows_nan=nan)
    np.testing.assert_allclose(a, a_ref, rtol=1e-6, equal_nan=True)
    assert np.isnan(a[0, 2]).all() if nan else (a[0, 2] == 0).all()
    assert (a[np.isneginf(s) & ~np.isnan(a)] == 0).all()


def test_whole_encoder_layer_kernels_equal_numpy(monkeypatch):
    """A pre-norm GELU encoder layer with the causal mask, forward and backward in float64, compiled
    passes against the NumPy references (bptt.kernels.transformer made to decline everything)."""
    from bptt.nn.transformer import TransformerEncoderLayer

    rng = np.random.default_rng(4)
    E, h, T, N = 12, 3, 6, 4
    x = rng.standard_normal((T, N, E))
    G = rng.standard_normal((T, N, E))
    layer = TransformerEncoderLayer(E, h, 4 * E, dropout=0.0, activation="gelu", norm_first=True, dtype=np.float64,
                                    rng=0)
    for p in layer.params.values():
        p += 0.1 * rng.standard_normal(p.shape)

    def run():
        layer.zero_grad()
        out = layer(x, is_causal=True)
        dx = layer.backward(G)
        return out, dx, {k: v.copy() for k, v in layer.grads.items()}

    out_k, dx_k, g_k = run()
    monkeypatch.setattr(kt, "HAVE_NUMBA", False)
    assert kt.gelu_forward(x) is None
    out_n, dx_n, g_n = run()
    np.testing.assert_allclose(out_k, out_n, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx_k, dx_n, rtol=1e-12, atol=1e-13)
    for k in g_n:
        np.testing.assert_allclose(g_k[k], g_n[k], rtol=1e-11, atol=1e-12, err_msg=k)
