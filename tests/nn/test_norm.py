"""LayerNorm: parity with torch.nn.LayerNorm, gradient checks, bad input."""

import numpy as np
import pytest

from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.nn.norm import LayerNorm

TOL = {np.float64: 1e-10, np.float32: 1e-5}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,norm_shape,affine,bias,eps", [
    ((3, 4, 7), 7, True, True, 1e-5),
    ((5, 6), (6,), True, False, 1e-3),
    ((2, 3, 4, 5), (4, 5), True, True, 1e-6),
    ((9, 1), 1, True, True, 1e-5),  # one number per row: x̂ = 0
    ((4, 3), 3, False, True, 1e-5),
])
def test_layer_norm_matches_torch(torch, dtype, shape, norm_shape, affine, bias, eps):
    rng = np.random.default_rng(sum(shape))
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    tm = torch.nn.LayerNorm(norm_shape, eps=eps, elementwise_affine=affine, bias=bias, dtype=tdt)
    with torch.no_grad():
        for p in tm.parameters():
            p.uniform_(-2, 2)
    bm = LayerNorm(norm_shape, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)
    assert sorted(bm.state_dict()) == sorted(tm.state_dict())
    bm.load_state_dict(tm.state_dict())
    x = (3 * rng.standard_normal(shape) + 1).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = tm(tx)
    (ty * torch.tensor(g)).sum().backward()
    y = bm(x)
    dx = bm.backward(g)
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_error(y, ty.detach().numpy()) < TOL[dtype]
    # one number per row: x̂ and dx are exactly 0 here, rounding noise in torch; the noise is relative to
    # the size of the terms that cancel, r·|g| with r = 1/√ε: compare on that scale
    floor = np.abs(g).max() / np.sqrt(eps) if x.shape[-1] == 1 else 0.0

    def err(a, b):
        return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), floor)

    assert err(dx, tx.grad.numpy()) < TOL[dtype]
    for name, p in tm.named_parameters():
        assert err(bm.grads[name], p.grad.numpy()) < TOL[dtype], name


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_gradcheck(bias):
    rng = np.random.default_rng(1)
    m = LayerNorm((3, 4), bias=bias, dtype=np.float64)
    for p in m.params.values():
        p[...] = rng.standard_normal(p.shape)
    x = rng.standard_normal((2, 5, 3, 4))
    R = rng.standard_normal(x.shape)

    def f():
        return float(np.sum(m(x) * R))

    m.zero_grad()
    f()
    dx = m.backward(R)
    gradcheck(f, {"x": x, **m.params}, {"x": dx, **m.grads}, tol=1e-7)


def test_layer_norm_statistics_and_grads_accumulate():
    m = LayerNorm(8, dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((4, 8)) * 5 + 3
    y = m(x)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0 / (1.0 + 1e-5 / x.var(-1)), rtol=1e-12)
    m.backward(np.ones_like(y))
    g1 = m.grads["bias"].copy()
    m(x)
    m.backward(np.ones_like(y))
    np.testing.assert_allclose(m.grads["bias"], 2 * g1)  # += , not =


def test_layer_norm_bad_input():
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm(0)
    with pytest.raises(ValueError, match="expects input"):
        LayerNorm(5)(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="dtype"):
        LayerNorm(5, dtype=np.int32)
    assert LayerNorm(3, elementwise_affine=False).params == {}
