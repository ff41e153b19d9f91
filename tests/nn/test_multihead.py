"""Scaled dot-product and multi-head attention: parity with torch (outputs, weights, every gradient),
gradient checks, the all-masked row, state dicts and bad input."""

import warnings

import numpy as np
import pytest

from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.nn.multihead import (
    MultiheadAttention,
    causal_mask,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
)

TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _tdtype(torch, dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def _make_masks(rng, kind, N, h, L, S, batched, dtype):
    """attn_mask, key_padding_mask for one of the mask configurations (every query keeps a key)."""
    attn, kpm = None, None
    if "attn_bool" in kind:
        attn = rng.random((L, S)) < 0.3
        attn[:, 0] = False
    if "attn_float3d" in kind:
        attn = rng.standard_normal((N * h, L, S) if batched else (h, L, S)).astype(dtype)
    if "causal" in kind:
        attn = causal_mask(L, S)
    if "kpm_bool" in kind:
        kpm = rng.random((N, S) if batched else (S,)) < 0.4
        kpm[..., 0] = False
    if "kpm_float" in kind:
        kpm = np.where(rng.random((N, S) if batched else (S,)) < 0.4, -1e9, 0.0).astype(dtype)
    return attn, kpm


# (E, h, kdim, vdim, bias, batch_first, batched, masks, need_weights, average, L, S, N)
CONFIGS = [
    (8, 2, None, None, True, False, True, "", True, True, 4, 5, 3),
    (12, 3, 5, 7, True, True, True, "attn_bool", True, False, 3, 6, 2),
    (6, 1, None, None, False, False, True, "kpm_bool", True, True, 5, 5, 2),
    (16, 8, 9, None, True, True, True, "attn_float3d+kpm_bool", False, True, 2, 7, 3),
    (10, 5, None, 3, False, True, True, "causal", True, False, 4, 4, 1),
    (9, 3, None, None, True, False, True, "causal+kpm_float", True, True, 6, 6, 2),
    (8, 4, 11, 13, True, False, False, "attn_float3d+kpm_bool", True, False, 3, 5, 1),
    (7, 7, None, None, True, True, False, "attn_bool", False, True, 2, 3, 1),
    (20, 4, None, None, True, False, True, "attn_bool+kpm_bool", True, True, 1, 9, 4),
]


def _mha_parity(torch, cfg, dtype, seed):
    E, h, kdim, vdim, bias, bf, batched, masks, need_weights, average, L, S, N = cfg
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tm = torch.nn.MultiheadAttention(E, h, bias=bias, batch_first=bf, kdim=kdim, vdim=vdim, dtype=_tdtype(torch, dtype))
    bm = MultiheadAttention(E, h, bias=bias, batch_first=bf, kdim=kdim, vdim=vdim, dtype=dtype, rng=seed)
    assert sorted(bm.state_dict()) == sorted(tm.state_dict())
    bm.load_state_dict(tm.state_dict())

    def shape(T, D):
        return (T, D) if not batched else ((N, T, D) if bf else (T, N, D))

    q = rng.standard_normal(shape(L, E)).astype(dtype)
    k = rng.standard_normal(shape(S, kdim or E)).astype(dtype)
    v = rng.standard_normal(shape(S, vdim or E)).astype(dtype)
    attn, kpm = _make_masks(rng, masks, N, h, L, S, batched, dtype)
    is_causal = "causal" in masks
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tkw = dict(key_padding_mask=None if kpm is None else torch.tensor(kpm),
               attn_mask=None if attn is None else torch.tensor(attn))
    with warnings.catch_warnings():  # torch warns when the two masks' types differ (still supported)
        warnings.simplefilter("ignore", UserWarning)
        tout, tw = tm(tq, tk, tv, need_weights=need_weights, average_attn_weights=average, is_causal=is_causal, **tkw)
    dout = rng.standard_normal(tout.shape).astype(dtype)
    loss = (tout * torch.tensor(dout)).sum()
    dw = None
    if need_weights:
        dw = rng.standard_normal(tw.shape).astype(dtype)
        loss = loss + (tw * torch.tensor(dw)).sum()
    loss.backward()

    out, w = bm(q, k, v, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn,
                average_attn_weights=average, is_causal=is_causal)
    dq, dk, dv = bm.backward(dout, dw)
    errs = {"output": rel_error(out, tout.detach().numpy())}
    if need_weights:
        errs["weights"] = rel_error(w, tw.detach().numpy())
    else:
        assert w is None and tw is None
    for name, mine, theirs in (("dquery", dq, tq), ("dkey", dk, tk), ("dvalue", dv, tv)):
        assert mine.shape == theirs.shape and mine.dtype == dtype
        errs[name] = rel_error(mine, theirs.grad.numpy())
    for name, p in tm.named_parameters():
        errs[name] = rel_error(bm.grads[name], p.grad.numpy())
    assert out.dtype == dtype and out.shape == tuple(tout.shape)
    return errs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_mha_matches_torch(torch, i, dtype):
    errs = _mha_parity(torch, CONFIGS[i], dtype, seed=100 + i)
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, bad
    assert len(errs) >= 6  # output, 3 input grads and at least the two projection weights were compared


def test_all_masked_row_matches_torch(torch):
    """torch 2.13: NaN output and weights with need_weights=True, zeros (then out_proj) without."""
    rng = np.random.default_rng(3)
    E, h, L, S, N = 8, 2, 3, 4, 2
    tm = torch.nn.MultiheadAttention(E, h, dtype=torch.float64)
    with torch.no_grad():
        tm.out_proj.bias.uniform_(-1, 1)  # a non-zero bias makes "zeros, then out_proj" visible
    bm = MultiheadAttention(E, h, dtype=np.float64)
    bm.load_state_dict(tm.state_dict())
    q, k = rng.standard_normal((L, N, E)), rng.standard_normal((S, N, E))
    kpm = np.zeros((N, S), bool)
    kpm[1] = True  # batch item 1 has no key at all
    for need_weights in (True, False):
        tq = torch.tensor(q, requires_grad=True)
        tout, tw = tm(tq, torch.tensor(k), torch.tensor(k), key_padding_mask=torch.tensor(kpm), need_weights=need_weights)
        out, w = bm(q, k, k, key_padding_mask=kpm, need_weights=need_weights)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(tout.detach().numpy()))
        np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-14, equal_nan=True)
        if need_weights:
            assert np.isnan(out[:, 1]).all() and np.isnan(w[1]).all() and not np.isnan(out[:, 0]).any()
            np.testing.assert_array_equal(np.isnan(w), np.isnan(tw.detach().numpy()))
        else:
            np.testing.assert_allclose(out[:, 1], np.broadcast_to(bm.params["out_proj.bias"], (L, E)), rtol=1e-15)
            tout.sum().backward()
            dq, _, _ = bm.backward(np.ones_like(out))
            np.testing.assert_allclose(dq, tq.grad.numpy(), rtol=1e-10, atol=1e-14)
            assert np.all(dq[:, 1] == 0.0)  # the dead row sends no gradient to its query


# (batch_first, batched, mask, need_weights): self-attention, the same array as query, key and value
SELF_CONFIGS = [(False, True, "is_causal", False), (True, True, "causal_given", True), (False, True, "float_causal", False),
                (True, True, "attn_bool+kpm_bool", True), (False, False, "is_causal", True), (True, True, "", False)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cfg", SELF_CONFIGS)
def test_self_attention_fused_matches_torch(torch, cfg, dtype):
    """One array x passed three times: Q, K, V from one product and, with backward_self, dx from one
    product; the causal mask (built, given as bool, or as float) applied inside the softmax.  Against
    torch's output, ∂L/∂x and every parameter gradient; backward() (three gradients) sums to the same."""
    bf, batched, masks, need_weights = cfg
    E, h, T, N = 12, 3, 5, 2
    rng = np.random.default_rng(7)
    tdt = _tdtype(torch, dtype)
    tm = torch.nn.MultiheadAttention(E, h, batch_first=bf, dtype=tdt)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=tdt))  # non-zero biases
    bm = MultiheadAttention(E, h, batch_first=bf, dtype=dtype)
    bm.load_state_dict(tm.state_dict())
    x = rng.standard_normal(((N, T, E) if bf else (T, N, E)) if batched else (T, E)).astype(dtype)
    attn, kpm, is_causal = None, None, masks == "is_causal"
    if masks == "causal_given":
        attn = causal_mask(T)
    elif masks == "float_causal":
        attn = np.where(causal_mask(T), -np.inf, 0.0).astype(dtype)
    elif masks:
        attn, kpm = _make_masks(rng, masks, N, h, T, T, batched, dtype)
    tmask = torch.tensor(causal_mask(T)) if is_causal else (None if attn is None else torch.tensor(attn))
    tx = torch.tensor(x, requires_grad=True)
    tout, tw = tm(tx, tx, tx, attn_mask=tmask, key_padding_mask=None if kpm is None else torch.tensor(kpm),
                  need_weights=need_weights, is_causal=is_causal)
    dout = rng.standard_normal(tout.shape).astype(dtype)
    (tout * torch.tensor(dout)).sum().backward()

    out, w = bm(x, x, x, attn_mask=attn, key_padding_mask=kpm, need_weights=need_weights, is_causal=is_causal)
    dx = bm.backward_self(dout)
    tol = TOL[dtype]
    assert out.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    assert rel_error(out, tout.detach().numpy()) < tol
    if need_weights:
        assert rel_error(w, tw.detach().numpy()) < tol
    assert rel_error(dx, tx.grad.numpy()) < tol
    for name, p in tm.named_parameters():
        assert rel_error(bm.grads[name], p.grad.numpy()) < tol, name
    grads = {k: v.copy() for k, v in bm.grads.items()}
    bm.zero_grad()
    bm(x, x, x, attn_mask=attn, key_padding_mask=kpm, need_weights=need_weights, is_causal=is_causal)
    dq, dk, dv = bm.backward(dout)
    assert rel_error(dq + dk + dv, dx) < tol
    for k, v in grads.items():
        assert rel_error(bm.grads[k], v) < tol, k


def test_only_the_exact_causal_mask_runs_as_causal():
    """A given mask counts as the causal one only when it is exactly it (−∞ / True above the diagonal,
    0 / False elsewhere): the given causal mask and is_causal agree; a mask that also blocks one more
    slot, or adds a constant below the diagonal, gives its own, correct weights."""
    E, h, T = 4, 1, 4
    m = MultiheadAttention(E, h, dtype=np.float64, rng=0)
    x = np.random.default_rng(0).standard_normal((T, 1, E))
    _, w_causal = m(x, x, x, attn_mask=causal_mask(T))
    _, w_built = m(x, x, x, attn_mask=None, is_causal=True)
    np.testing.assert_array_equal(w_causal, w_built)
    more = causal_mask(T)
    more[3, 0] = True
    _, w_more = m(x, x, x, attn_mask=more)
    assert w_more[0, 3, 0] == 0 and w_causal[0, 3, 0] > 0
    np.testing.assert_allclose(w_more[0, :3], w_causal[0, :3], rtol=1e-15)
    shifted = np.where(causal_mask(T), -np.inf, 0.5)  # not 0 below the diagonal: an additive bias
    _, w_shifted = m(x, x, x, attn_mask=shifted)
    np.testing.assert_allclose(w_shifted, w_causal, rtol=1e-14)  # a constant per row cancels in softmax


@pytest.mark.parametrize("case", ["none", "bool", "float", "causal", "causal_rect", "scale", "dead_row"])
def test_sdpa_matches_torch(torch, case):
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    B, h, L, S, d, dv = 2, 3, 4, 6, 5, 7
    if case == "causal":
        S = L
    q, k, v = rng.standard_normal((B, h, L, d)), rng.standard_normal((B, h, S, d)), rng.standard_normal((B, h, S, dv))
    kw = {}
    if case == "bool":
        kw["attn_mask"] = rng.random((L, S)) < 0.7  # True = may attend (sdpa's convention)
        kw["attn_mask"][:, 0] = True
    if case == "float":
        kw["attn_mask"] = rng.standard_normal((B, 1, L, S))
    if case in ("causal", "causal_rect"):
        kw["is_causal"] = True
    if case == "scale":
        kw["scale"] = 0.37
    if case == "dead_row":
        kw["attn_mask"] = np.ones((L, S), bool)
        kw["attn_mask"][2] = False  # query 2 may attend nowhere
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tkw = {key: torch.tensor(val) if isinstance(val, np.ndarray) else val for key, val in kw.items()}
    tout = F.scaled_dot_product_attention(tq, tk, tv, **tkw)
    g = rng.standard_normal(tout.shape)
    (tout * torch.tensor(g)).sum().backward()
    out, cache = scaled_dot_product_attention(q, k, v, **kw)
    grads = scaled_dot_product_attention_backward(g, cache)
    assert rel_error(out, tout.detach().numpy()) < 1e-12
    for mine, theirs in zip(grads, (tq, tk, tv), strict=True):
        assert rel_error(mine, theirs.grad.numpy()) < 1e-12
    if case == "dead_row":
        assert np.all(out[:, :, 2] == 0.0) and np.all(cache.weights[:, :, 2] == 0.0)
    np.testing.assert_allclose(cache.weights.sum(-1)[:, :, [0, 1, 3]], 1.0, rtol=1e-12)


def test_sdpa_errors():
    q = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="not both"):
        scaled_dot_product_attention(q, q, q, attn_mask=np.ones((3, 3), bool), is_causal=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, q, q, attn_mask=np.ones((5, 3), bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, q, q, attn_mask=np.ones((4, 2, 3, 3), bool))  # would widen the batch
    with pytest.raises(ValueError, match="bool or floating"):
        scaled_dot_product_attention(q, q, q, attn_mask=np.ones((3, 3), np.int64))
    with pytest.raises(ValueError, match="value"):
        scaled_dot_product_attention(q, q, np.zeros((2, 4, 4)))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_gradcheck(packed, batch_first):
    """float64 centred differences for every parameter and input, with masks and ∂L/∂weights."""
    rng = np.random.default_rng(11)
    E, h, L, S, N = 6, 2, 3, 4, 2
    kdim, vdim = (None, None) if packed else (5, 3)
    m = MultiheadAttention(E, h, batch_first=batch_first, kdim=kdim, vdim=vdim, dtype=np.float64, rng=1)
    for p in m.params.values():
        p[...] = rng.standard_normal(p.shape) * 0.5  # non-zero biases too

    def shape(T, D):
        return (N, T, D) if batch_first else (T, N, D)

    q, k, v = rng.standard_normal(shape(L, E)), rng.standard_normal(shape(S, kdim or E)), rng.standard_normal(shape(S, vdim or E))
    kpm = np.array([[False, False, True, False], [False, True, True, False]])
    attn = rng.standard_normal((L, S))
    Ro, Rw = rng.standard_normal(shape(L, E)), rng.standard_normal((N, h, L, S))

    def f():
        out, w = m(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False)
        return float(np.sum(out * Ro) + np.sum(w * Rw))

    m.zero_grad()
    f()
    dq, dk, dv = m.backward(Ro, Rw)
    gradcheck(f, {"q": q, "k": k, "v": v, **m.params}, {"q": dq, "k": dk, "v": dv, **m.grads}, tol=1e-7)


def test_mha_dropout_gradcheck_and_weights():
    """Training-mode dropout on the weights: the same mask forward and backward (gradcheck with the
    generator reset before every forward), and the returned weights are the dropped ones (as torch's)."""
    rng = np.random.default_rng(12)
    E, h, L, N = 4, 2, 5, 2
    m = MultiheadAttention(E, h, dropout=0.4, batch_first=True, dtype=np.float64, rng=2)
    x = rng.standard_normal((N, L, E))
    R = rng.standard_normal((N, L, E))

    def f():
        m.rng = np.random.default_rng(99)
        return float(np.sum(m(x, x, x)[0] * R))

    m.zero_grad()
    f()
    dq, dk, dv = m.backward(R)
    gradcheck(f, {"x": x, **m.params}, {"x": dq + dk + dv, **m.grads}, tol=1e-7)
    m.rng = np.random.default_rng(99)
    _, w = m(x, x, x, average_attn_weights=False)
    assert np.any(w == 0.0)
    kept = w[w > 0]
    m.eval()
    _, w_eval = m(x, x, x, average_attn_weights=False)
    np.testing.assert_allclose(kept, w_eval[w > 0] / 0.6, rtol=1e-12)  # kept weights scaled by 1/(1 − p)
    np.testing.assert_allclose(w_eval.sum(-1), 1.0, rtol=1e-12)


def test_state_dict_round_trip(torch):
    for kdim in (None, 5):
        tm = torch.nn.MultiheadAttention(6, 3, kdim=kdim, vdim=kdim, dtype=torch.float64)
        bm = MultiheadAttention(6, 3, kdim=kdim, vdim=kdim, dtype=np.float64, rng=4)
        for p in bm.params.values():
            p[...] = np.random.default_rng(5).standard_normal(p.shape)
        tm.load_state_dict({k: torch.tensor(v) for k, v in bm.state_dict().items()})
        back = MultiheadAttention(6, 3, kdim=kdim, vdim=kdim, dtype=np.float64, rng=6)
        back.load_state_dict(tm.state_dict())
        for name, val in bm.state_dict().items():
            np.testing.assert_array_equal(back.state_dict()[name], val)
        x = np.random.default_rng(8).standard_normal((2, 1, 6))
        kv = np.random.default_rng(9).standard_normal((3, 1, kdim or 6))
        with torch.no_grad():
            ref = tm(torch.tensor(x), torch.tensor(kv), torch.tensor(kv))[0].numpy()
        assert rel_error(back(x, kv, kv)[0], ref) < 1e-12


def test_init_like_torch():
    m = MultiheadAttention(8, 2, kdim=4, vdim=4, rng=0)
    assert m.params["in_proj_bias"].shape == (24,) and np.all(m.params["in_proj_bias"] == 0)
    assert np.all(m.params["out_proj.bias"] == 0)
    assert np.abs(m.params["k_proj_weight"]).max() <= np.sqrt(6 / 12)
    assert m.params["q_proj_weight"].dtype == np.float32
    assert "in_proj_weight" in MultiheadAttention(8, 2).params
    assert set(MultiheadAttention(8, 2, bias=False).params) == {"in_proj_weight", "out_proj.weight"}


def test_mha_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)
    m = MultiheadAttention(8, 2, dtype=np.float64)
    x = np.zeros((3, 2, 8))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(x, x, x, attn_mask=np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(x, x, x, attn_mask=np.zeros((2, 3, 3), bool))  # needs N·h = 4
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(x, x, x, key_padding_mask=np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="bool or floating"):
        m(x, x, x, key_padding_mask=np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="features"):
        m(np.zeros((3, 2, 7)), x, x)
    with pytest.raises(ValueError, match="3-D"):
        m(x, x[0], x[0])
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        MultiheadAttention(8, 2).backward(x)
