"""Transformer layers, stacks and the full model against torch.nn (outputs and every gradient), activations,
positional encodings, gradient checks and bad input."""

import math
import warnings

import numpy as np
import pytest

from bptt.nn.feedforward import (
    GELU,
    LearnedPositionalEmbedding,
    PositionwiseFeedForward,
    ReLU,
    SinusoidalPositionalEncoding,
    sinusoidal_table,
)
from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.nn.multihead import causal_mask
from bptt.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    generate_square_subsequent_mask,
)

TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _tdtype(torch, dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def _torch_activation(torch, act):
    return {"relu": "relu", "gelu": "gelu", "gelu_tanh": torch.nn.GELU(approximate="tanh")}[act]


def _parity(torch, tm, bm, inputs, kwargs, seed):
    """Load torch's weights into bptt, run forward + backward of L = Σ out ⊙ G in both; {name: rel error}."""
    assert sorted(bm.state_dict()) == sorted(tm.state_dict())
    bm.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(seed)
    tin = [torch.tensor(x, requires_grad=True) for x in inputs]
    tkw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with warnings.catch_warnings():  # torch warns when a bool and a float mask meet (still supported)
        warnings.simplefilter("ignore", UserWarning)
        tout = tm(*tin, **tkw)
    G = rng.standard_normal(tout.shape).astype(inputs[0].dtype)
    (tout * torch.tensor(G)).sum().backward()
    bm.zero_grad()
    out = bm(*inputs, **kwargs)
    dins = bm.backward(G)
    dins = dins if isinstance(dins, tuple) else (dins,)
    assert out.dtype == inputs[0].dtype and out.shape == tuple(tout.shape)
    errs = {"output": rel_error(out, tout.detach().numpy())}
    for i, (d, t) in enumerate(zip(dins, tin)):
        assert d.shape == t.shape
        errs[f"d_input{i}"] = rel_error(d, t.grad.numpy())
    # A parameter gradient that is zero in exact arithmetic (cross-attention over one memory position:
    # its weights are all 1, so nothing flows back into the query, nor into the norm before it) comes
    # out as torch's rounding residue (1e-17) against bptt's exact 0, a relative error of 1.  Such a
    # gradient is measured against the input gradients' scale instead of its own (float32's residue
    # there: 2e-8 of it).
    floor = max(np.max(np.abs(t.grad.numpy()), initial=0.0) for t in tin)
    for name, p in tm.named_parameters():
        a, b = bm.grads[name], p.grad.numpy()
        errs[name] = float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(a)), np.max(np.abs(b)), floor, 1e-300))
    return errs


def _seq(rng, T, N, E, batch_first, batched, dtype):
    shape = (T, E) if not batched else ((N, T, E) if batch_first else (T, N, E))
    return rng.standard_normal(shape).astype(dtype)


def _kpm(rng, N, T, batched):
    m = rng.random((N, T) if batched else (T,)) < 0.35
    m[..., 0] = False  # every sequence keeps its first position
    return m


def _configs(n, seed):
    """Seeded random layer configurations: (E, h, F, act, norm_first, batch_first, batched, masks)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h = int(rng.integers(1, 9))
        E = h * int(rng.integers(1, 4)) + (0 if h > 1 else int(rng.integers(2, 7)))
        out.append((E, h, int(rng.integers(3, 20)), ("relu", "gelu", "gelu_tanh")[i % 3], bool(i % 2),
                    bool((i // 2) % 2), i % 5 != 4, ("none", "causal", "bool", "float", "kpm", "causal+kpm")[i % 6]))
    return out


ENC_CONFIGS = _configs(12, 1)
DEC_CONFIGS = _configs(12, 2)


def _masks(rng, kind, T, N, h, batched, dtype, prefix):
    kw = {}
    if kind in ("causal", "causal+kpm"):
        kw[prefix + "mask"] = generate_square_subsequent_mask(T, dtype)
    if kind == "bool":
        m = rng.random((T, T)) < 0.3
        m[:, 0] = False
        kw[prefix + "mask"] = m
    if kind == "float":
        kw[prefix + "mask"] = rng.standard_normal((N * h, T, T) if batched else (h, T, T)).astype(dtype)
    if "kpm" in kind:
        kw[prefix.replace("mask", "") + "key_padding_mask"] = _kpm(rng, N, T, batched)
    return kw


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("i", range(len(ENC_CONFIGS)))
def test_encoder_layer_matches_torch(torch, i, dtype):
    E, h, F, act, nf, bf, batched, masks = ENC_CONFIGS[i]
    rng = np.random.default_rng(i)
    torch.manual_seed(i)
    S, N = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    tm = torch.nn.TransformerEncoderLayer(E, h, F, dropout=0.0, activation=_torch_activation(torch, act),
                                          batch_first=bf, norm_first=nf, dtype=_tdtype(torch, dtype))
    bm = TransformerEncoderLayer(E, h, F, dropout=0.0, activation=act, batch_first=bf, norm_first=nf, dtype=dtype)
    x = _seq(rng, S, N, E, bf, batched, dtype)
    kw = {("src_" + k if k == "mask" else k): v for k, v in _masks(rng, masks, S, N, h, batched, dtype, "").items()}
    kw = {("src_key_padding_mask" if k == "key_padding_mask" else k): v for k, v in kw.items()}
    errs = _parity(torch, tm, bm, [x], kw, seed=i)
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, (ENC_CONFIGS[i], bad)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("i", range(len(DEC_CONFIGS)))
def test_decoder_layer_matches_torch(torch, i, dtype):
    E, h, F, act, nf, bf, batched, masks = DEC_CONFIGS[i]
    rng = np.random.default_rng(50 + i)
    torch.manual_seed(50 + i)
    T, S, N = int(rng.integers(1, 6)), int(rng.integers(1, 7)), int(rng.integers(1, 4))
    tm = torch.nn.TransformerDecoderLayer(E, h, F, dropout=0.0, activation=_torch_activation(torch, act),
                                          batch_first=bf, norm_first=nf, dtype=_tdtype(torch, dtype))
    bm = TransformerDecoderLayer(E, h, F, dropout=0.0, activation=act, batch_first=bf, norm_first=nf, dtype=dtype)
    tgt, mem = _seq(rng, T, N, E, bf, batched, dtype), _seq(rng, S, N, E, bf, batched, dtype)
    kw = {}
    for k, v in _masks(rng, masks, T, N, h, batched, dtype, "").items():
        kw["tgt_mask" if k == "mask" else "tgt_key_padding_mask"] = v
    if i % 2:  # cross-attention masks too: a (T, S) memory mask and a memory key padding mask
        mm = rng.random((T, S)) < 0.3
        mm[:, 0] = False
        kw["memory_mask"], kw["memory_key_padding_mask"] = mm, _kpm(rng, N, S, batched)
    errs = _parity(torch, tm, bm, [tgt, mem], kw, seed=i)
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, (DEC_CONFIGS[i], bad)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch's note on its inference fast path
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_stacks_and_transformer_match_torch(torch, norm_first, batch_first):
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    E, h, F, S, T, N = 10, 2, 16, 5, 4, 3
    kw = dict(dim_feedforward=F, dropout=0.0, batch_first=batch_first, norm_first=norm_first, activation="gelu")
    tt = torch.nn.Transformer(E, h, 2, 3, dtype=torch.float64, **kw)
    bt = Transformer(E, h, 2, 3, dtype=np.float64, rng=0, **kw)
    src, tgt = _seq(rng, S, N, E, batch_first, True, np.float64), _seq(rng, T, N, E, batch_first, True, np.float64)
    masks = dict(tgt_mask=generate_square_subsequent_mask(T, np.float64), src_key_padding_mask=_kpm(rng, N, S, True),
                 memory_key_padding_mask=_kpm(rng, N, S, True), tgt_key_padding_mask=_kpm(rng, N, T, True))
    errs = _parity(torch, tt, bt, [src, tgt], masks, seed=1)
    assert len(errs) == 3 + len(list(tt.parameters())) and max(errs.values()) < 1e-10, errs
    # the stacks alone, without a final norm
    tl = torch.nn.TransformerEncoderLayer(E, h, dtype=torch.float64, **kw)
    te = torch.nn.TransformerEncoder(tl, 2, enable_nested_tensor=False)
    be = TransformerEncoder(TransformerEncoderLayer(E, h, dtype=np.float64, **kw), 2)
    errs = _parity(torch, te, be, [src], dict(mask=causal_mask(S), src_key_padding_mask=masks["src_key_padding_mask"]), 2)
    assert max(errs.values()) < 1e-10, errs
    td = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(E, h, dtype=torch.float64, **kw), 2,
                                     norm=torch.nn.LayerNorm(E, dtype=torch.float64))
    from bptt.nn.norm import LayerNorm

    bd = TransformerDecoder(TransformerDecoderLayer(E, h, dtype=np.float64, **kw), 2, norm=LayerNorm(E, dtype=np.float64))
    errs = _parity(torch, td, bd, [tgt, src], dict(tgt_mask=masks["tgt_mask"], tgt_is_causal=True), 3)
    assert max(errs.values()) < 1e-10, errs


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_state_dict_round_trip_and_keys(torch):
    tt = torch.nn.Transformer(8, 2, 1, 2, 12, dropout=0.0, bias=False, dtype=torch.float64)
    bt = Transformer(8, 2, 1, 2, 12, dropout=0.0, bias=False, dtype=np.float64, rng=3)
    assert {k: v.shape for k, v in bt.state_dict().items()} == {k: tuple(v.shape) for k, v in tt.state_dict().items()}
    assert "encoder.layers.0.self_attn.in_proj_weight" in bt.params and "decoder.norm.weight" in bt.params
    assert "encoder.layers.0.norm1.bias" not in bt.params  # bias=False reaches the LayerNorms
    tt.load_state_dict({k: torch.tensor(v) for k, v in bt.state_dict().items()})
    back = Transformer(8, 2, 1, 2, 12, dropout=0.0, bias=False, dtype=np.float64, rng=4)
    back.load_state_dict(tt.state_dict())
    rng = np.random.default_rng(0)
    src, tgt = rng.standard_normal((3, 2, 8)), rng.standard_normal((4, 2, 8))
    with torch.no_grad():
        ref = tt(torch.tensor(src), torch.tensor(tgt)).numpy()
    assert rel_error(back(src, tgt), ref) < 1e-12
    # init as torch: Xavier on every matrix, LayerNorm ones
    w = bt.params["decoder.layers.1.linear1.weight"]
    assert np.abs(w).max() <= math.sqrt(6 / (12 + 8)) and np.all(bt.params["encoder.norm.weight"] == 1)
    assert not np.array_equal(bt.params["encoder.layers.0.linear1.weight"], bt.params["decoder.layers.0.linear1.weight"])


def test_is_causal_without_mask_builds_the_causal_mask():
    rng = np.random.default_rng(2)
    layer = TransformerEncoderLayer(6, 2, 8, dropout=0.0, dtype=np.float64, rng=1)
    x = rng.standard_normal((5, 2, 6))
    a = layer(x, is_causal=True)
    b = layer(x, src_mask=causal_mask(5))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, layer(x))
    # causality: the first 3 positions do not depend on the last 2
    x2 = x.copy()
    x2[3:] += 1.0
    np.testing.assert_allclose(layer(x2, is_causal=True)[:3], a[:3], rtol=1e-13)


def _reset_rngs(module, seed):
    g = np.random.default_rng(seed)
    for m in module.modules():
        if hasattr(m, "rng"):
            m.rng = g


@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_gradcheck_with_dropout(norm_first):
    """float64 centred differences through encoder and decoder layers in training mode with dropout
    (the generator reset before each forward, so every evaluation draws the same masks)."""
    rng = np.random.default_rng(3)
    E, h, F, S, T, N = 4, 2, 5, 3, 3, 2
    enc = TransformerEncoderLayer(E, h, F, dropout=0.2, activation="gelu", norm_first=norm_first, dtype=np.float64, rng=1)
    dec = TransformerDecoderLayer(E, h, F, dropout=0.2, activation="gelu_tanh", norm_first=norm_first,
                                  dtype=np.float64, rng=2)
    for m in (enc, dec):
        for p in m.params.values():
            p += 0.1 * rng.standard_normal(p.shape)  # LayerNorm weights off 1, biases off 0
    src, tgt = rng.standard_normal((S, N, E)), rng.standard_normal((T, N, E))
    kpm = np.array([[False, False, True], [False, False, False]])
    R = rng.standard_normal((T, N, E))

    def f():
        _reset_rngs(enc, 5)
        _reset_rngs(dec, 6)
        mem = enc(src, src_key_padding_mask=kpm)
        return float(np.sum(dec(tgt, mem, tgt_is_causal=True, memory_key_padding_mask=kpm) * R))

    enc.zero_grad()
    dec.zero_grad()
    f()
    dtgt, dmem = dec.backward(R)
    dsrc = enc.backward(dmem)
    wrt = {"src": src, "tgt": tgt, **{"enc." + k: v for k, v in enc.params.items()},
           **{"dec." + k: v for k, v in dec.params.items()}}
    analytic = {"src": dsrc, "tgt": dtgt, **{"enc." + k: v for k, v in enc.grads.items()},
                **{"dec." + k: v for k, v in dec.grads.items()}}
    gradcheck(f, wrt, analytic, tol=1e-6)


def test_transformer_gradcheck():
    rng = np.random.default_rng(4)
    m = Transformer(4, 2, 1, 1, 6, dropout=0.0, batch_first=True, dtype=np.float64, rng=0)
    src, tgt = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 2, 4))
    R = rng.standard_normal((2, 2, 4))

    def f():
        return float(np.sum(m(src, tgt, tgt_is_causal=True) * R))

    m.zero_grad()
    f()
    dsrc, dtgt = m.backward(R)
    gradcheck(f, {"src": src, "tgt": tgt, **m.params}, {"src": dsrc, "tgt": dtgt, **m.grads}, tol=1e-6)


# ---------------------------------------------------------------------------- activations and positions


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(torch, dtype, approximate):
    x = np.concatenate([np.linspace(-8, 8, 401), np.random.default_rng(0).standard_normal(100)]).astype(dtype)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.gelu(tx, approximate=approximate)
    (ty * torch.tensor(g)).sum().backward()
    m = GELU(approximate)
    y = m(x)
    dx = m.backward(g)
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_error(y, ty.detach().numpy()) < TOL[dtype]
    assert rel_error(dx, tx.grad.numpy()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu_matches_torch_bit_for_bit(torch, dtype):
    """max(x, 0) and torch's threshold_backward: 0 where y ≤ 0 (x = ±0 included), dy elsewhere, NaN
    passing both ways, for any layout of dy (the kernel's rows, NumPy's fallback for a 1-d dy)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((37, 19)).astype(dtype)
    x[0, :4] = [np.nan, 0.0, -0.0, np.inf]
    g = rng.standard_normal(x.shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.relu(tx)
    ty.backward(torch.tensor(g))
    m = ReLU()
    y = m(x)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    for dy in (g, np.asfortranarray(g), g[:, ::-1][:, ::-1]):
        dx = m.backward(dy)
        assert dx.dtype == dtype
        np.testing.assert_array_equal(dx, tx.grad.numpy())
    v = ReLU()
    v(x[0])
    np.testing.assert_array_equal(v.backward(g[0]), tx.grad.numpy()[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_in_eval_mode_keeps_x_and_still_backpropagates(dtype):
    """In eval mode the compiled GELU computes y alone; a backward then (allowed) derives dy/dx from the
    kept input and gives the training mode's numbers."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((9, 17)) * 3).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    m = GELU()
    y_train, dx_train = m(x), m.backward(g)
    m.eval()
    y_eval = m(x)
    np.testing.assert_array_equal(y_eval, y_train)
    np.testing.assert_array_equal(m.backward(g), dx_train)
    np.testing.assert_array_equal(m.backward(g), dx_train)  # the derivative, once made, is kept
    layer = TransformerEncoderLayer(8, 2, 16, activation="gelu", dtype=dtype, rng=0).eval()
    assert layer.activation.training is False  # a child of the feed-forward block: eval() reaches it


def test_activations_gradcheck():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # keep ReLU away from its kink
    R = rng.standard_normal(x.shape)
    for act in (ReLU(), GELU("none"), GELU("tanh")):
        act(x)
        dx = act.backward(R)
        gradcheck(lambda: float(np.sum(act(x) * R)), {"x": x}, {"x": dx}, tol=1e-7)
    with pytest.raises(ValueError, match="approximate"):
        GELU("sigmoid")


def test_feedforward_gradcheck():
    rng = np.random.default_rng(3)
    ff = PositionwiseFeedForward(5, 7, dropout=0.3, activation="gelu", dtype=np.float64, rng=0)
    x, R = rng.standard_normal((3, 2, 5)), rng.standard_normal((3, 2, 5))

    def f():
        ff.dropout.rng = np.random.default_rng(8)
        return float(np.sum(ff(x) * R))

    ff.zero_grad()
    f()
    dx = ff.backward(R)
    gradcheck(f, {"x": x, **ff.params}, {"x": dx, **ff.grads}, tol=1e-7)
    assert set(ff.params) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}


def test_sinusoidal_encoding_is_d2ls():
    for E in (6, 7):
        P = sinusoidal_table(20, E)
        for i in (0, 1, 5, 19):
            for j in range(E):
                angle = i / 10000 ** ((j - j % 2) / E)
                assert P[i, j] == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-15)
    enc = SinusoidalPositionalEncoding(6, max_len=10, batch_first=True, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 4, 6))
    np.testing.assert_array_equal(enc(x, offset=3), x + sinusoidal_table(10, 6)[3:7][None])
    np.testing.assert_array_equal(enc.backward(np.ones_like(x)), np.ones_like(x))
    assert enc.params == {}
    with pytest.raises(ValueError, match="max_len"):
        enc(x, offset=7)


@pytest.mark.parametrize("batch_first", [False, True])
def test_learned_positions_gradcheck(batch_first):
    rng = np.random.default_rng(4)
    pe = LearnedPositionalEmbedding(6, 3, dtype=np.float64, batch_first=batch_first, rng=0)
    x = rng.standard_normal((2, 4, 3) if batch_first else (4, 2, 3))
    R = rng.standard_normal(x.shape)

    def f():
        return float(np.sum(pe(x, offset=1) * R))

    pe.zero_grad()
    f()
    dx = pe.backward(R)
    gradcheck(f, {"x": x, **pe.params}, {"x": dx, **pe.grads}, tol=1e-7)
    assert np.all(pe.grads["weight"][[0, 5]] == 0)  # rows outside offset..offset+T−1 get nothing


def test_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        TransformerEncoderLayer(10, 3)
    with pytest.raises(ValueError, match="activation"):
        TransformerDecoderLayer(8, 2, activation="tanh")
    with pytest.raises(ValueError, match="num_layers"):
        TransformerEncoder(TransformerEncoderLayer(8, 2), 0)
    t = Transformer(8, 2, 1, 1, 8, dtype=np.float64)
    with pytest.raises(ValueError, match="batch number"):
        t(np.zeros((3, 2, 8)), np.zeros((3, 4, 8)))
    with pytest.raises(ValueError, match="d_model"):
        t(np.zeros((3, 2, 6)), np.zeros((3, 2, 6)))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        t(np.zeros((3, 2, 8)), np.zeros((3, 2, 8)), src_key_padding_mask=np.zeros((2, 4), bool))
