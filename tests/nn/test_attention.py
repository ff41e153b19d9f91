"""Attention: gradient checks of every score function, masking, and parity with PyTorch autograd."""

import numpy as np
import pytest
from torch_reference import torch_attention

from bptt.nn.attention import ATTENTION_KINDS, Attention, masked_softmax
from bptt.nn.gradcheck import gradcheck

N, T, S, H, A = 3, 4, 5, 6, 5
LENGTHS = np.array([5, 2, 3])


def _setup(kind, rng, C=None, T=T):
    C = H if C is None else C
    att = Attention(kind, H, C, A, dtype=np.float64, rng=rng)
    q = rng.standard_normal((N, T, H))
    m = rng.standard_normal((N, S, C))
    mask = np.arange(S)[None, :] < LENGTHS[:, None]
    return att, q, m, mask


# T ≤ S and T > S: general attention applies W_a to the queries in the first case, to the memory in the second
@pytest.mark.parametrize("T", [T, S + 2])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_gradcheck(kind, T, rng):
    C = H if kind == "dot" else 7  # general and additive accept a memory width ≠ H
    att, q, m, mask = _setup(kind, rng, C, T)
    Rc = rng.standard_normal((N, T, C))  # L = Σ Rc ⊙ context + Σ Ra ⊙ weights
    Ra = rng.standard_normal((N, T, S))

    def f():
        c, a = att(q, m, mask)
        return float(np.sum(c * Rc) + np.sum(a * Ra))

    att.zero_grad()
    att(q, m, mask)
    dq, dm = att.backward(Rc, Ra)
    gradcheck(f, {"q": q, "m": m, **att.params}, {"q": dq, "m": dm, **att.grads}, tol=1e-7)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_padding_is_ignored(kind, rng):
    att, q, m, mask = _setup(kind, rng)
    c1, a1 = att(q, m, mask)
    assert np.all(a1[~np.broadcast_to(mask[:, None, :], a1.shape)] == 0.0)
    np.testing.assert_allclose(a1.sum(-1), 1.0)
    m2 = m.copy()
    m2[~mask] = 1e3 * rng.standard_normal(m2[~mask].shape)  # garbage in the padded slots
    c2, a2 = att(q, m2, mask)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)
    _, dm = att.backward(rng.standard_normal(c2.shape))
    assert np.all(dm[~mask] == 0.0)  # no gradient flows into padding


def test_masked_softmax_matches_truncated_softmax(rng):
    e = rng.standard_normal((1, 2, 5))
    a = masked_softmax(e, np.array([[True, True, True, False, False]]))
    ref = np.exp(e[..., :3]) / np.exp(e[..., :3]).sum(-1, keepdims=True)
    np.testing.assert_allclose(a[..., :3], ref, rtol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="dot attention needs equal"):
        Attention("dot", 4, 6)
    with pytest.raises(ValueError, match="unknown attention"):
        Attention("cosine", 4, 4)
    att = Attention("dot", 4, 4)
    with pytest.raises(ValueError, match="at least one unmasked"):
        att(np.zeros((1, 1, 4)), np.zeros((1, 2, 4)), np.zeros((1, 2), bool))


@pytest.mark.parametrize("T", [T, S + 2])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_matches_torch(kind, T, rng, torch):
    att, q, m, mask = _setup(kind, rng, T=T)
    Rc, Ra = rng.standard_normal((N, T, H)), rng.standard_normal((N, T, S))
    c, a = att(q, m, mask)
    att.zero_grad()
    dq, dm = att.backward(Rc, Ra)

    tq = torch.tensor(q, requires_grad=True)
    tm = torch.tensor(m, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in att.params.items()}
    tc, ta = torch_attention(torch, kind, tq, tm, torch.tensor(mask), tp)
    ((tc * torch.tensor(Rc)).sum() + (ta * torch.tensor(Ra)).sum()).backward()
    np.testing.assert_allclose(c, tc.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a, ta.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dq, tq.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dm, tm.grad.numpy(), rtol=1e-9, atol=1e-12)
    for k, g in att.grads.items():
        np.testing.assert_allclose(g, tp[k].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
