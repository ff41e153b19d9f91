"""AdaptiveLogSoftmaxWithLoss: parity with torch.nn.AdaptiveLogSoftmaxWithLoss on the same weights (loss,
per-target log-probabilities, the full log_prob, predict, every gradient), a float64 gradient check,
and the checks PyTorch makes of its arguments."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bptt.nn.adaptive import AdaptiveLogSoftmaxWithLoss
from bptt.nn.gradcheck import gradcheck, rel_error
from conftest import require_torch

TOL = {np.float64: 1e-12, np.float32: 1e-5}
# float32 parameter gradients are sums over the N rows, which can cancel: with D = 1 (a 1×1 projection)
# one drawn case differed from torch's by 1.8e-5 of its size under OpenBLAS's default sgemm kernel
# (under OPENBLAS_CORETYPE's it passed); float64 keeps 1e-12
GRAD_TOL = {np.float64: 1e-12, np.float32: 1e-4}

# torch's own warning when it builds a zero-width projection (⌊D / div_value^(i+1)⌋ = 0), which both allow
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")


@st.composite
def configs(draw):
    """A random layout: V classes cut into a head and 1-4 clusters, D features, N rows."""
    V = draw(st.integers(3, 120))
    k = draw(st.integers(1, min(4, V - 1)))
    cutoffs = sorted(draw(st.lists(st.integers(1, V - 1), min_size=k, max_size=k, unique=True)))
    D = draw(st.integers(1, 24))
    div = draw(st.sampled_from([1.0, 1.5, 2.0, 4.0]))
    return dict(V=V, cutoffs=cutoffs, D=D, div=div, head_bias=draw(st.booleans()), N=draw(st.integers(1, 40)),
                dtype=draw(st.sampled_from([np.float64, np.float32])), seed=draw(st.integers(0, 2**16)))


def _pair(torch, D, V, cutoffs, div, head_bias, dtype, seed):
    torch.manual_seed(seed)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    tm = torch.nn.AdaptiveLogSoftmaxWithLoss(D, V, cutoffs, div_value=div, head_bias=head_bias, dtype=tdt)
    bm = AdaptiveLogSoftmaxWithLoss(D, V, cutoffs, div_value=div, head_bias=head_bias, dtype=dtype, rng=seed)
    assert {k: v.shape for k, v in bm.state_dict().items()} == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    bm.load_state_dict(tm.state_dict())
    return tm, bm


def _targets(rng, V, cutoffs, N):
    """Targets that reach the head and, when N allows, every cluster (the rest uniform)."""
    edges = [0, *cutoffs, V]
    first = [rng.integers(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    y = rng.integers(0, V, N)
    y[: min(N, len(first))] = first[:N]
    return rng.permutation(y)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_matches_torch(c):
    torch = require_torch()
    dtype, tol = c["dtype"], TOL[c["dtype"]]
    tm, bm = _pair(torch, c["D"], c["V"], c["cutoffs"], c["div"], c["head_bias"], dtype, c["seed"])
    rng = np.random.default_rng(c["seed"])
    x = (2 * rng.standard_normal((c["N"], c["D"]))).astype(dtype)
    y = _targets(rng, c["V"], c["cutoffs"], c["N"])
    g = rng.standard_normal(c["N"]).astype(dtype)  # a weight on each output besides the loss
    tx = torch.tensor(x, requires_grad=True)
    t_out = tm(tx, torch.tensor(y))
    (0.7 * t_out.loss + (t_out.output * torch.tensor(g)).sum()).backward()

    out = bm(x, y)
    dx = bm.backward(0.7, g)
    assert out.output.dtype == dtype and dx.dtype == dtype
    assert rel_error(out.output, t_out.output.detach().numpy()) < tol
    assert abs(out.loss - t_out.loss.item()) <= tol * max(1.0, abs(out.loss))
    assert rel_error(dx, tx.grad.numpy()) < tol
    for name, p in tm.named_parameters():
        expected = np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy()  # a cluster with no target
        assert rel_error(bm.grads[name], expected) < GRAD_TOL[dtype], name
    with torch.no_grad():
        t_logp = tm.log_prob(tx).numpy()
        t_pred = tm.predict(tx).numpy()
    logp = bm.log_prob(x)
    assert logp.shape == (c["N"], c["V"]) and logp.dtype == dtype
    assert rel_error(logp, t_logp) < tol
    np.testing.assert_array_equal(bm.predict(x), t_pred)
    # the per-target outputs are the full distribution's entries, and it sums to one
    assert rel_error(out.output, logp[np.arange(c["N"]), y]) < tol
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(1), 1.0, rtol=10 * tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_unbatched_row_matches_torch(torch, dtype):
    tm, bm = _pair(torch, 6, 20, [4, 12], 2.0, True, dtype, 3)
    x = np.random.default_rng(0).standard_normal(6).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    t_out = tm(tx, torch.tensor(15))
    t_out.loss.backward()
    out = bm(x, np.int64(15))
    dx = bm.backward()
    assert out.output.shape == () and dx.shape == (6,)
    assert rel_error(out.output, t_out.output.detach().numpy()) < TOL[dtype]
    assert rel_error(dx, tx.grad.numpy()) < TOL[dtype]
    for name, p in tm.named_parameters():
        if p.grad is not None:
            assert rel_error(bm.grads[name], p.grad.numpy()) < TOL[dtype], name


def test_zero_width_projection_matches_torch(torch):
    """D = 3, div_value 4: the first cluster projects to ⌊3/4⌋ = 0 features (uniform within the cluster)."""
    tm, bm = _pair(torch, 3, 12, [4], 4.0, False, np.float64, 0)
    assert bm.state_dict()["tail.0.0.weight"].shape == (0, 3)
    x = np.random.default_rng(1).standard_normal((5, 3))
    y = np.array([0, 4, 11, 7, 3])
    tx = torch.tensor(x, requires_grad=True)
    tm(tx, torch.tensor(y)).loss.backward()
    out = bm(x, y)
    dx = bm.backward()
    assert rel_error(dx, tx.grad.numpy()) < 1e-12
    assert rel_error(bm.grads["head.weight"], tm.head.weight.grad.numpy()) < 1e-12
    logp = bm.log_prob(x)
    np.testing.assert_allclose(logp[:, 4:] - logp[:, 4:5], 0.0, atol=1e-15)  # one probability in the cluster
    assert out.output[1] == pytest.approx(logp[1, 4], abs=1e-15)


@pytest.mark.parametrize("head_bias", [False, True])
def test_gradcheck(head_bias):
    rng = np.random.default_rng(5)
    m = AdaptiveLogSoftmaxWithLoss(7, 30, [3, 10, 22], div_value=1.5, head_bias=head_bias, dtype=np.float64, rng=2)
    x = rng.standard_normal((11, 7))
    y = _targets(rng, 30, [3, 10, 22], 11)
    g = rng.standard_normal(11)

    def f():
        out = m(x, y)
        return 0.3 * out.loss + float(np.sum(out.output * g))

    m.zero_grad()
    f()
    dx = m.backward(0.3, g)
    errors = gradcheck(f, {"x": x, **m.params}, {"x": dx, **m.grads}, tol=1e-7)
    assert set(errors) == {"x", *m.params}


def test_only_the_targets_clusters_are_evaluated_and_grads_accumulate():
    m = AdaptiveLogSoftmaxWithLoss(32, 40, [5, 15, 30], dtype=np.float64, rng=0)
    x = np.random.default_rng(0).standard_normal((4, 32))
    y = np.array([1, 2, 20, 29])  # head and cluster 1 only
    m(x, y)
    m.backward()
    g = m.grads
    assert not g["tail.0.0.weight"].any() and not g["tail.2.1.weight"].any()
    assert g["tail.1.0.weight"].any() and g["tail.1.1.weight"].any()
    first = {k: v.copy() for k, v in g.items()}
    m(x, y)
    m.backward()
    for k in first:
        np.testing.assert_allclose(m.grads[k], 2 * first[k], rtol=1e-14)  # += , not =


def test_init_bounds_and_layout():
    m = AdaptiveLogSoftmaxWithLoss(64, 1000, [100, 400], head_bias=True, rng=0)
    assert (m.shortlist_size, m.n_clusters, m.head_size, m.cutoffs) == (100, 2, 102, [100, 400, 1000])
    shapes = {k: v.shape for k, v in m.state_dict().items()}
    assert shapes == {"head.weight": (102, 64), "head.bias": (102,), "tail.0.0.weight": (16, 64),
                      "tail.0.1.weight": (300, 16), "tail.1.0.weight": (4, 64), "tail.1.1.weight": (600, 4)}
    for name, fan_in in (("head.weight", 64), ("head.bias", 64), ("tail.0.1.weight", 16), ("tail.1.1.weight", 4)):
        w = m.state_dict()[name]
        assert w.dtype == np.float32
        assert np.abs(w).max() <= 1 / np.sqrt(fan_in) and np.abs(w).max() > 0.9 / np.sqrt(fan_in)


@pytest.mark.parametrize("cutoffs", [[], [0, 5], [5, 3], [4, 4], [10], [2.5], [3, 12]])
def test_bad_cutoffs_are_refused_as_torch_refuses_them(torch, cutoffs):
    with pytest.raises(ValueError):
        torch.nn.AdaptiveLogSoftmaxWithLoss(4, 10, cutoffs)
    with pytest.raises(ValueError, match="cutoffs"):
        AdaptiveLogSoftmaxWithLoss(4, 10, cutoffs)


def test_bad_input():
    m = AdaptiveLogSoftmaxWithLoss(4, 10, [3], dtype=np.float64)
    x = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"Target values should be in \[0, 9\]"):
        m(x, np.array([1, 10]))
    with pytest.raises(ValueError, match=r"Target values should be in \[0, 9\]"):
        m(x, np.array([-1, 0]))
    with pytest.raises(ValueError, match="same size in the batch"):
        m(x, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="1D target tensor expects 2D input"):
        m(np.zeros(4), np.array([1]))
    with pytest.raises(ValueError, match="multi-target"):
        m(x, np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="integer"):
        m(x, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        m(np.zeros((2, 5)), np.array([1, 2]))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        m.log_prob(np.zeros(4))
    with pytest.raises(ValueError, match="div_value"):
        AdaptiveLogSoftmaxWithLoss(4, 10, [3], div_value=0.0)
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        AdaptiveLogSoftmaxWithLoss(4, 10, [3]).backward()
    m(x, np.array([1, 2]))
    with pytest.raises(ValueError, match="doutput must have the output's shape"):
        m.backward(1.0, np.zeros(3))
