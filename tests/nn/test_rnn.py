"""Recurrent layers against torch.nn.RNN/LSTM/GRU, gradient checks, and structural properties."""

import numpy as np
import pytest
from conftest import require_torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bptt
from bptt.nn.gradcheck import gradcheck, rel_error

LAYERS = {"rnn": bptt.RNN, "lstm": bptt.LSTM, "gru": bptt.GRU}


def make_pair(torch, kind, D, H, dtype, **kw):
    """The same layer in torch and bptt, bptt loaded from torch's state_dict."""
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    tcls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    tm = tcls(D, H, **kw).to(tdtype)
    bm = LAYERS[kind](D, H, dtype=dtype, **kw)
    bm.load_state_dict(tm.state_dict())
    return tm, bm


def compare_with_torch(torch, kind, T, N, D, H, L, bi, bias, batch_first, proj, nonlin, unbatched,
                       give_state, lengths, dtype, seed, scale_floor=0.0):
    """Run forward+backward in both; return {quantity: relative error}."""
    def rel_error(a, b):
        return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), scale_floor, 1e-300))

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    kw = dict(num_layers=L, bidirectional=bi, bias=bias, batch_first=batch_first)
    if kind == "lstm" and proj:
        kw["proj_size"] = proj
    if kind == "rnn":
        kw["nonlinearity"] = nonlin
    tm, bm = make_pair(torch, kind, D, H, dtype, **kw)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    K, P = (2 if bi else 1), (proj if kind == "lstm" and proj else H)
    xshape = (T, D) if unbatched else ((N, T, D) if batch_first else (T, N, D))
    sshape = (L * K, P) if unbatched else (L * K, N, P)
    cshape = (L * K, H) if unbatched else (L * K, N, H)
    x = rng.standard_normal(xshape).astype(dtype)
    h0 = rng.standard_normal(sshape).astype(dtype)
    c0 = rng.standard_normal(cshape).astype(dtype)

    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    c0t = torch.tensor(c0, requires_grad=True)
    tstate = ((h0t, c0t) if kind == "lstm" else h0t) if give_state else None
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        tout, thn = tm(packed, tstate)
        tout, _ = torch.nn.utils.rnn.pad_packed_sequence(tout, batch_first=batch_first, total_length=T)
    else:
        tout, thn = tm(xt, tstate)
    dout = rng.standard_normal(tuple(tout.shape)).astype(dtype)
    dhn = rng.standard_normal(sshape).astype(dtype)
    dcn = rng.standard_normal(cshape).astype(dtype)
    loss = (tout * torch.tensor(dout)).sum()
    if kind == "lstm":
        loss = loss + (thn[0] * torch.tensor(dhn)).sum() + (thn[1] * torch.tensor(dcn)).sum()
    else:
        loss = loss + (thn * torch.tensor(dhn)).sum()
    loss.backward()

    bstate = ((h0, c0) if kind == "lstm" else h0) if give_state else None
    out, hn = bm(x, bstate, lengths=lengths)
    dx, dstate0 = bm.backward(dout, (dhn, dcn) if kind == "lstm" else dhn)

    errs = {"output": rel_error(out, tout.detach().numpy()), "dx": rel_error(dx, xt.grad.numpy())}
    assert out.dtype == dtype and dx.shape == x.shape
    if kind == "lstm":
        errs["h_n"] = rel_error(hn[0], thn[0].detach().numpy())
        errs["c_n"] = rel_error(hn[1], thn[1].detach().numpy())
        if give_state:
            errs["dh0"] = rel_error(dstate0[0], h0t.grad.numpy())
            errs["dc0"] = rel_error(dstate0[1], c0t.grad.numpy())
    else:
        errs["h_n"] = rel_error(hn, thn.detach().numpy())
        if give_state:
            errs["dh0"] = rel_error(dstate0, h0t.grad.numpy())
    for name, p in tm.named_parameters():
        assert bm.grads[name].shape == tuple(p.shape)
        errs[name] = rel_error(bm.grads[name], p.grad.numpy())
    return errs


configs = st.fixed_dictionaries({
    "kind": st.sampled_from(["rnn", "lstm", "gru"]),
    "T": st.integers(1, 6), "N": st.integers(1, 4), "D": st.integers(1, 5), "H": st.integers(2, 6),
    "L": st.integers(1, 3), "bi": st.booleans(), "bias": st.booleans(), "batch_first": st.booleans(),
    "proj": st.integers(0, 1), "nonlin": st.sampled_from(["tanh", "relu"]), "unbatched": st.booleans(),
    "give_state": st.booleans(), "use_lengths": st.booleans(), "seed": st.integers(0, 2**16),
})


def _run_config(torch, c, dtype, scale_floor=0.0):
    lengths = None
    if c["use_lengths"] and not c["unbatched"]:
        lengths = list(np.random.default_rng(c["seed"]).integers(1, c["T"] + 1, size=c["N"]))
    proj = c["proj"] * max(1, c["H"] // 2) if c["kind"] == "lstm" else 0
    return compare_with_torch(torch, c["kind"], c["T"], c["N"], c["D"], c["H"], c["L"], c["bi"], c["bias"],
                              c["batch_first"], proj, c["nonlin"], c["unbatched"], c["give_state"], lengths,
                              dtype, c["seed"], scale_floor)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=configs)
def test_parity_float64_random_configs(torch, c):
    errs = _run_config(torch, c, np.float64)
    bad = {k: v for k, v in errs.items() if not v < 1e-10}
    assert not bad, (c, bad)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=configs)
def test_parity_float32_random_configs(torch, c):
    # In float32 a gradient that is a near-cancelling sum (e.g. dx with D = 1 summed over two
    # directions) has a relative error far above 1e-5 in torch as well; so the scale of
    # the error is floored at 1e-2, making it an absolute 1e-7 for such near-zero results.
    errs = _run_config(torch, c, np.float32, scale_floor=1e-2)
    bad = {k: v for k, v in errs.items() if not v < 1e-5}
    assert not bad, (c, bad)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_parity_every_feature_at_once(kind):
    torch = require_torch()
    errs = compare_with_torch(torch, kind, T=7, N=4, D=5, H=6, L=3, bi=True, bias=True, batch_first=True,
                              proj=3, nonlin="relu", unbatched=False, give_state=True, lengths=[7, 2, 5, 1],
                              dtype=np.float64, seed=3)
    assert max(errs.values()) < 1e-10, errs


def test_dropout_between_layers_is_identity_in_eval():
    torch = require_torch()
    tm, bm = make_pair(torch, "lstm", 3, 4, np.float64, num_layers=3, dropout=0.5)
    tm.eval()
    bm.eval()
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    out, _ = bm(x)
    assert rel_error(out, tm(torch.tensor(x))[0].detach().numpy()) < 1e-12


# ---------------------------------------------------------------------------- gradient checks


@pytest.mark.parametrize("kind,kw", [
    ("rnn", dict(nonlinearity="tanh", num_layers=2, bidirectional=True)),
    ("rnn", dict(nonlinearity="relu")),
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("gru", dict(num_layers=2, bidirectional=True)),
])
def test_gradcheck_layer_with_lengths_and_state(kind, kw):
    rng = np.random.default_rng(1)
    layer = LAYERS[kind](3, 4, dtype=np.float64, rng=1, **kw)
    K = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    P = kw.get("proj_size") or 4
    x = rng.standard_normal((4, 3, 3))
    h0 = rng.standard_normal((L * K, 3, P))
    c0 = rng.standard_normal((L * K, 3, 4))
    lengths = [4, 1, 3]
    state = (h0, c0) if kind == "lstm" else h0
    out, hn = layer(x, state, lengths=lengths)
    dout = rng.standard_normal(out.shape)
    dhn = rng.standard_normal(h0.shape)

    def loss():
        o, h = layer(x, state, lengths=lengths)
        h = h[0] if kind == "lstm" else h
        return float(np.sum(o * dout) + np.sum(h * dhn))

    layer(x, state, lengths=lengths)
    layer.zero_grad()
    dx, dstate = layer.backward(dout, (dhn, None) if kind == "lstm" else dhn)
    wrt = dict(layer.params, x=x, h0=h0)
    analytic = dict(layer.grads, x=dx, h0=dstate[0] if kind == "lstm" else dstate)
    if kind == "lstm":
        wrt["c0"], analytic["c0"] = c0, dstate[1]
    errors = gradcheck(loss, wrt, analytic, tol=1e-7)
    assert max(errors.values()) < 1e-7


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_layer_equals_loop_over_cell(kind):
    rng = np.random.default_rng(2)
    layer = LAYERS[kind](3, 5, dtype=np.float64, rng=0)
    cell = {"rnn": bptt.RNNCell, "lstm": bptt.LSTMCell, "gru": bptt.GRUCell}[kind](3, 5, dtype=np.float64)
    cell.load_state_dict({k[: -len("_l0")]: v for k, v in layer.state_dict().items()})
    x = rng.standard_normal((6, 2, 3))
    out, hn = layer(x)
    state = None
    for t in range(6):
        state = cell(x[t], state)
        h = state[0] if kind == "lstm" else state
        np.testing.assert_allclose(out[t], h, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(hn[0] if kind == "lstm" else hn, (h[None]), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_bidirectional_equals_manually_reversed_run(kind):
    rng = np.random.default_rng(3)
    bi = LAYERS[kind](3, 4, bidirectional=True, dtype=np.float64, rng=0)
    fwd = LAYERS[kind](3, 4, dtype=np.float64)
    rev = LAYERS[kind](3, 4, dtype=np.float64)
    sd = bi.state_dict()
    fwd.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_reverse")})
    rev.load_state_dict({k[: -len("_reverse")]: v for k, v in sd.items() if k.endswith("_reverse")})
    x = rng.standard_normal((5, 2, 3))
    out, _ = bi(x)
    out_f, _ = fwd(x)
    out_r, _ = rev(x[::-1])
    np.testing.assert_allclose(out[:, :, :4], out_f, rtol=1e-13)
    np.testing.assert_allclose(out[:, :, 4:], out_r[::-1], rtol=1e-13)
    # and the gradients: the reverse direction's input gradient is the flipped one
    dout = rng.standard_normal(out.shape)
    dx, _ = bi.backward(dout)
    dx_f, _ = fwd.backward(dout[:, :, :4])
    dx_r, _ = rev.backward(np.ascontiguousarray(dout[::-1, :, 4:]))
    np.testing.assert_allclose(dx, dx_f + dx_r[::-1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_padding_changes_nothing(kind):
    """Garbage in padded positions changes no output, state or gradient, and gets zero gradient."""
    rng = np.random.default_rng(4)
    layer = LAYERS[kind](3, 4, num_layers=2, bidirectional=True, dtype=np.float64, rng=0)
    lengths = np.array([5, 2, 3])
    x = rng.standard_normal((5, 3, 3))
    dout = rng.standard_normal((5, 3, 8))
    results = []
    for trial in range(2):
        xp = x.copy()
        for n, ln in enumerate(lengths):
            xp[ln:, n] = rng.standard_normal((5 - ln, 3)) * 100 if trial else 0.0
        layer.zero_grad()
        out, hn = layer(xp, lengths=lengths)
        dx, _ = layer.backward(dout)
        results.append((out, hn[0] if kind == "lstm" else hn, dx, layer.grads))
    (o0, h0, dx0, g0), (o1, h1, dx1, g1) = results
    np.testing.assert_array_equal(o0, o1)
    np.testing.assert_array_equal(h0, h1)
    np.testing.assert_array_equal(dx0, dx1)
    for k in g0:
        np.testing.assert_array_equal(g0[k], g1[k])
    for n, ln in enumerate(lengths):
        assert np.all(o0[ln:, n] == 0.0) and np.all(dx0[ln:, n] == 0.0)
    # each sequence alone (no padding) gives the same outputs
    for n, ln in enumerate(lengths):
        alone, _ = layer(x[:ln, n : n + 1])
        np.testing.assert_allclose(o0[:ln, n : n + 1], alone, rtol=1e-12, atol=1e-15)


def test_step_api_equals_full_sequence():
    rng = np.random.default_rng(5)
    layer = bptt.LSTM(3, 4, num_layers=2, dtype=np.float64, rng=0)
    x = rng.standard_normal((6, 2, 3))
    out, _ = layer(x)
    layer.reset_state()
    steps = [layer.step(x[t]) for t in range(6)]
    np.testing.assert_allclose(np.stack(steps), out, rtol=1e-12)
    layer.reset_state()
    np.testing.assert_allclose(layer.step(x[0, 0]), out[0, 0], rtol=1e-12)


def test_truncated_bptt_windows_chain():
    """Backward of two windows, chained through the final state's gradient, equals one long run."""
    rng = np.random.default_rng(6)
    layer = bptt.GRU(2, 3, dtype=np.float64, rng=0)
    x = rng.standard_normal((8, 2, 2))
    dout = rng.standard_normal((8, 2, 3))
    layer(x)
    layer.zero_grad()
    dx_full, dh0_full = layer.backward(dout)
    g_full = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    _, h_mid = layer(x[:4])
    layer(x[4:], h_mid)
    dx2, dh_mid = layer.backward(dout[4:])
    layer(x[:4])
    dx1, dh0 = layer.backward(dout[:4], dh_mid)
    np.testing.assert_allclose(np.concatenate([dx1, dx2]), dx_full, rtol=1e-12)
    np.testing.assert_allclose(dh0, dh0_full, rtol=1e-12)
    for k in g_full:
        np.testing.assert_allclose(layer.grads[k], g_full[k], rtol=1e-12)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,match", [
    (lambda m: m(np.zeros((2, 3, 4, 5))), "expects input of shape"),
    (lambda m: m(np.zeros((2, 3, 7))), "expects 3 input features"),
    (lambda m: m(np.zeros((2, 3, 3)), (np.zeros((1, 3, 4)), np.zeros((2, 3, 4)))), "h_0 must have shape"),
    (lambda m: m(np.zeros((2, 3, 3)), np.zeros((2, 3, 4))), "tuple"),
    (lambda m: m(np.zeros((2, 3, 3)), lengths=[1, 2, 3]), r"lengths must be in \[1, 2\]"),
    (lambda m: m(np.zeros((2, 3, 3)), lengths=[1, 2]), "lengths must have shape"),
    (lambda m: m(np.array([["a", "b", "c"]] * 2)), "numeric"),
    (lambda m: m.backward(np.zeros((2, 3, 4))), "without a preceding forward"),
])
def test_bad_input_raises_clear_error(call, match):
    m = bptt.LSTM(3, 4, num_layers=2)
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(m)


def test_load_state_dict_names_bad_keys_and_shapes():
    m = bptt.GRU(3, 4)
    sd = m.state_dict()
    sd["weight_hh_l0"] = np.zeros((5, 5))
    del sd["bias_ih_l0"]
    sd["bogus"] = np.zeros(1)
    with pytest.raises(bptt.StateDictError) as e:
        m.load_state_dict(sd)
    msg = str(e.value)
    assert "bias_ih_l0" in msg and "bogus" in msg and "weight_hh_l0: expected shape (12, 4), got (5, 5)" in msg


def test_safetensors_round_trip_with_torch_names(tmp_path):
    torch = require_torch()
    from safetensors.torch import save_file

    tm = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    save_file(tm.state_dict(), str(tmp_path / "m.safetensors"))
    bm = bptt.LSTM(3, 4, num_layers=2, bidirectional=True)
    bm.load(tmp_path / "m.safetensors")
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    assert rel_error(bm(x)[0], tm(torch.tensor(x))[0].detach().numpy()) < 1e-5
    bm.save(tmp_path / "b.safetensors")
    bm2 = bptt.LSTM(3, 4, num_layers=2, bidirectional=True)
    bm2.load(tmp_path / "b.safetensors")
    for k, v in bm.state_dict().items():
        np.testing.assert_array_equal(bm2.state_dict()[k], v)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_linear_by_row_slices_equals_whole(dtype, monkeypatch):
    """Inside a step whose BLAS is held to one thread (a recurrent layer running in
    threads), Linear runs by slices of rows in two threads: same output and input
    gradient, and the weight and bias gradients summed over the slices."""
    from bptt.runtime import policy
    from bptt.runtime import threads as blas

    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 50, 16)).astype(dtype)  # 2,000 rows: two slices of 1,000
    dy = rng.standard_normal((40, 50, 9)).astype(dtype)
    lin = bptt.Linear(16, 9, dtype=dtype, rng=1)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(blas, "OUTER_THREADS", [threads] if threads > 1 else [])
        monkeypatch.setattr(blas, "blas_threads", lambda t=threads: t)
        assert len(policy.row_slices(2000, 16 * 9)) == threads
        lin.zero_grad()
        y = lin.forward(x)
        dx = lin.backward(dy)
        results.append((y, dx, lin.grads["weight"].copy(), lin.grads["bias"].copy()))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for whole, sliced in zip(*results, strict=True):
        assert rel_error(sliced, whole) < tol
    assert rel_error(results[0][2], dy.reshape(-1, 9).T.astype(np.float64) @ x.reshape(-1, 16)) < tol
