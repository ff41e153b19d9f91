"""Regularised and normalised recurrent layers (bptt.nn.regularized, bptt.nn.regularized_loop):
float64 gradient checks of every option and of combinations, torch parity wherever an option is
neutral, evaluation-mode semantics, masks across truncated-BPTT windows, errors."""

import numpy as np
import pytest

import bptt
from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.nn.module import StateDictError

LAYERS = {"rnn": bptt.RNN, "lstm": bptt.LSTM, "gru": bptt.GRU}

OPTION_SETS = [
    dict(recurrent_dropout=0.3),
    dict(input_dropout=0.3, output_dropout=0.25),
    dict(weight_drop=0.4),
    dict(zoneout=0.3),
    dict(layer_norm=True),
    dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.2, weight_drop=0.3, input_dropout=0.1),
]


def run_gradcheck(kind, opts, T=4, N=3, D=3, H=4, L=1, bi=False, lengths=None, batch_first=False,
                  give_state=False, dstate=False, dropout=0.0, seed=0):
    """Analytic gradients of every parameter, the input and the initial state against centred differences.
    The layer's generator is re-seeded and its stream masks forgotten before each forward, so every
    forward draws the same masks."""
    layer = LAYERS[kind](D, H, num_layers=L, bidirectional=bi, batch_first=batch_first, dropout=dropout,
                         dtype=np.float64, rng=seed, **opts)
    assert layer.regularizer is not None
    rng = np.random.default_rng(seed + 1)
    K = 2 if bi else 1
    x = rng.standard_normal((N, T, D) if batch_first else (T, N, D))
    h0 = rng.standard_normal((L * K, N, H))
    c0 = rng.standard_normal((L * K, N, H))
    dout = rng.standard_normal((N, T, K * H) if batch_first else (T, N, K * H))
    dh_n = rng.standard_normal((L * K, N, H))
    dc_n = rng.standard_normal((L * K, N, H))

    def state():
        if not give_state:
            return None
        return (h0, c0) if kind == "lstm" else h0

    def loss():
        layer.rng = np.random.default_rng(99)
        layer.regularizer.reset_masks()
        out, s = layer(x, state(), lengths)
        total = float(np.sum(out * dout))
        if dstate:
            h, c = s if kind == "lstm" else (s, None)
            total += float(np.sum(h * dh_n)) + (float(np.sum(c * dc_n)) if c is not None else 0.0)
        return total

    loss()
    layer.zero_grad()
    ds = ((dh_n, dc_n) if kind == "lstm" else dh_n) if dstate else None
    dx, d0 = layer.backward(dout, ds)
    analytic = dict(layer.grads)
    analytic["x"] = dx
    wrt = dict(layer.params)
    wrt["x"] = x
    if give_state:
        dh0, dc0 = d0 if kind == "lstm" else (d0, None)
        analytic["h0"], wrt["h0"] = dh0, h0
        if kind == "lstm":
            analytic["c0"], wrt["c0"] = dc0, c0
    return gradcheck(loss, wrt, analytic, tol=1e-6)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "+".join(o))
def test_gradcheck_each_option(kind, opts):
    errors = run_gradcheck(kind, opts, give_state=True, dstate=True)
    assert max(errors.values()) < 1e-6


@pytest.mark.parametrize("opts", [dict(peephole=True), dict(peephole=True, layer_norm=True),
                                  dict(peephole=True, zoneout=0.3, zoneout_c=0.5),
                                  dict(zoneout=0.0, zoneout_c=0.4)], ids=lambda o: "+".join(o))
def test_gradcheck_lstm_peephole_and_cell_zoneout(opts):
    errors = run_gradcheck("lstm", opts, give_state=True, dstate=True)
    assert max(errors.values()) < 1e-6


ALL_LSTM = dict(recurrent_dropout=0.2, input_dropout=0.2, output_dropout=0.2, weight_drop=0.3, zoneout=0.2,
                zoneout_c=0.3, layer_norm=True, peephole=True)
ALL_GRU = {k: v for k, v in ALL_LSTM.items() if k not in ("peephole", "zoneout_c")}


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_gradcheck_all_options_stacked_bidirectional_with_lengths(kind):
    opts = ALL_LSTM if kind == "lstm" else ALL_GRU
    errors = run_gradcheck(kind, opts, T=4, N=3, L=2, bi=True, lengths=[4, 2, 3], dropout=0.3,
                           give_state=True, dstate=True)
    assert max(errors.values()) < 1e-6


def test_gradcheck_batch_first_stacked_unidirectional():
    errors = run_gradcheck("lstm", ALL_LSTM, L=2, batch_first=True, lengths=[3, 4, 1])
    assert max(errors.values()) < 1e-6


# ---------------------------------------------------------------------------- torch parity


def _torch_pair(torch, kind, D, H, L, bi, **opts):
    tcls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    torch.manual_seed(0)
    tm = tcls(D, H, num_layers=L, bidirectional=bi).double()
    bm = LAYERS[kind](D, H, num_layers=L, bidirectional=bi, dtype=np.float64, **opts)
    state = {k: v for k, v in bm.state_dict().items()}
    state.update({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    bm.load_state_dict(state)
    return tm, bm


def _compare(torch, tm, bm, kind, T, N, D, H, L, bi, lengths, seed=0):
    rng = np.random.default_rng(seed)
    K = 2 if bi else 1
    x = rng.standard_normal((T, N, D))
    h0 = rng.standard_normal((L * K, N, H))
    c0 = rng.standard_normal((L * K, N, H))
    dout = rng.standard_normal((T, N, K * H))
    dh = rng.standard_normal((L * K, N, H))
    xt, h0t, c0t = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    tstate = (h0t, c0t) if kind == "lstm" else h0t
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths), enforce_sorted=False)
        tout, ts = tm(packed, tstate)
        tout, _ = torch.nn.utils.rnn.pad_packed_sequence(tout, total_length=T)
    else:
        tout, ts = tm(xt, tstate)
    th = ts[0] if kind == "lstm" else ts
    (torch.sum(tout * torch.tensor(dout)) + torch.sum(th * torch.tensor(dh))).backward()
    out, s = bm(x, (h0, c0) if kind == "lstm" else h0, lengths)
    bm.zero_grad()
    dx, d0 = bm.backward(dout, (dh, None) if kind == "lstm" else dh)
    errs = {"out": rel_error(out, tout.detach().numpy()), "h_n": rel_error(s[0] if kind == "lstm" else s, th.detach().numpy()),
            "dx": rel_error(dx, xt.grad.numpy()), "dh0": rel_error(d0[0] if kind == "lstm" else d0, h0t.grad.numpy())}
    if kind == "lstm":
        errs["dc0"] = rel_error(d0[1], c0t.grad.numpy())
    for name, p in tm.named_parameters():
        errs[name] = rel_error(bm.grads[name], p.grad.numpy())
    return errs


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("L,bi,lengths", [(1, False, None), (2, True, None), (2, False, [5, 3, 1]), (2, True, [2, 5, 4])])
def test_regularized_loop_in_eval_mode_equals_torch(torch, kind, L, bi, lengths):
    """Dropout of every kind and weight drop are the identity in evaluation: the NumPy loop then
    computes torch's function, outputs and gradients, to float64 rounding."""
    tm, bm = _torch_pair(torch, kind, 3, 4, L, bi, recurrent_dropout=0.5, weight_drop=0.5, input_dropout=0.3,
                         output_dropout=0.3)
    bm.eval()
    errs = _compare(torch, tm, bm, kind, 5, 3, 3, 4, L, bi, lengths)
    assert max(errs.values()) < 1e-10, errs


def test_zero_peepholes_equal_torch_in_training(torch):
    tm, bm = _torch_pair(torch, "lstm", 3, 4, 2, True, peephole=True)
    for name, p in bm.params.items():
        if name.startswith(("weight_ci", "weight_cf", "weight_co")):
            p[...] = 0.0
    errs = _compare(torch, tm, bm, "lstm", 5, 3, 3, 4, 2, True, [5, 2, 4])
    peep = {n: g for n, g in bm.grads.items() if n.startswith("weight_c")}
    assert max(errs.values()) < 1e-10, errs
    assert all(np.abs(g).max() > 0 for g in peep.values())  # the peepholes still learn from 0


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_every_option_off_is_the_torch_path(torch, kind):
    off = dict(recurrent_dropout=0.0, input_dropout=0.0, output_dropout=0.0, weight_drop=0.0, zoneout=0.0,
               layer_norm=False)
    if kind == "lstm":
        off.update(peephole=False, zoneout_c=0.0)
    tm, bm = _torch_pair(torch, kind, 3, 4, 2, True, **off)
    assert bm.regularizer is None and set(bm.params) == {n for n, _ in tm.named_parameters()}
    errs = _compare(torch, tm, bm, kind, 5, 3, 3, 4, 2, True, [5, 2, 4])
    assert max(errs.values()) < 1e-10, errs


# ---------------------------------------------------------------------------- semantics


def test_zoneout_in_eval_is_its_expectation():
    z, H = 0.3, 4
    rnn = bptt.RNN(3, H, zoneout=z, dtype=np.float64, rng=0).eval()
    x = np.random.default_rng(1).standard_normal((6, 2, 3))
    out, h_n = rnn(x)
    p = rnn.params
    h = np.zeros((2, H))
    for t in range(6):
        h_tilde = np.tanh(x[t] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h @ p["weight_hh_l0"].T + p["bias_hh_l0"])
        h = z * h + (1 - z) * h_tilde
        np.testing.assert_allclose(out[t], h, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(h_n[0], h, rtol=1e-13)


def test_zoneout_in_training_keeps_the_previous_value_or_takes_the_new():
    rnn = bptt.RNN(3, 5, zoneout=0.5, dtype=np.float64, rng=0)
    x = np.random.default_rng(1).standard_normal((8, 4, 3))
    out, _ = rnn(x)
    h_tilde = [s.h_tilde for s in rnn.regularizer.ctx.layers[0].directions[0].steps]
    prev = np.concatenate([np.zeros((1, 4, 5)), out[:-1]])
    kept = np.isclose(out, prev, rtol=0, atol=1e-15)  # new + 1·(old − new): old up to rounding
    took = np.isclose(out, np.stack(h_tilde), rtol=0, atol=0)
    assert np.all(kept | took) and 0.3 < kept[1:].mean() < 0.7  # each unit one or the other, about half kept


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_evaluation_is_deterministic(kind):
    opts = ALL_LSTM if kind == "lstm" else ALL_GRU
    layer = LAYERS[kind](3, 4, num_layers=2, dropout=0.5, dtype=np.float64, rng=0, **opts)
    x = np.random.default_rng(1).standard_normal((5, 2, 3))
    a, _ = layer(x)
    b, _ = layer(x)
    assert np.abs(a - b).max() > 1e-3  # training draws masks
    layer.eval()
    a, _ = layer(x)
    b, _ = layer(x)
    np.testing.assert_array_equal(a, b)


def test_locked_masks_are_carried_across_windows_until_the_state_is_reset():
    """With only the per-sequence masks (input, recurrent, output), two windows with the state carried
    compute exactly the one long sequence: the streams keep their masks."""
    opts = dict(recurrent_dropout=0.4, input_dropout=0.3, output_dropout=0.3)
    a = bptt.LSTM(3, 4, num_layers=2, dtype=np.float64, rng=0, **opts)
    b = bptt.LSTM(3, 4, num_layers=2, dtype=np.float64, rng=0, **opts)
    x = np.random.default_rng(1).standard_normal((10, 2, 3))
    whole, s_whole = a(x)
    first, s = b(x[:6])
    second, s_b = b(x[6:], s)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(s_b[1], s_whole[1], rtol=1e-13)
    masks = b.regularizer.locked[1]["h"][0][0].copy()
    b(x[:6])  # a reset state: new masks for the streams
    assert not np.array_equal(b.regularizer.locked[1]["h"][0][0], masks)


@pytest.mark.parametrize("reference", [True, False], ids=["reference-loop", "plain-path"])
def test_weight_drop_mask_per_forward_and_gradient_through_it(reference):
    layer = bptt.LSTM(3, 4, weight_drop=0.5, dtype=np.float64, rng=0)
    layer.regularizer.force_reference = reference
    W = layer.params["weight_hh_l0"].copy()
    x = np.random.default_rng(1).standard_normal((5, 2, 3))
    out, s = layer(x)
    m1 = layer.regularizer.weight_masks[0][0]
    assert set(np.unique(m1)) == {0.0, 2.0}
    if reference:
        np.testing.assert_allclose(layer.regularizer.ctx.layers[0].directions[0].p.W_hh, W * m1)
    layer.zero_grad()
    layer.backward(np.ones_like(out))
    g = layer.grads["weight_hh_l0"]
    assert np.all(g[m1 == 0] == 0) and np.all(g[m1 != 0] != 0)  # dropped weights get no gradient
    np.testing.assert_array_equal(layer.params["weight_hh_l0"], W)  # the dense weight is what is stored
    layer(x, s)
    m2 = layer.regularizer.weight_masks[0][0]
    assert not np.array_equal(m1, m2)  # a new mask for the next window


def test_recurrent_dropout_masks_the_recurrent_product_only():
    """Keras' meaning: h_{t−1} ⊙ m_h enters W_hh; the GRU's z ⊙ h_{t−1} and zoneout read h_{t−1} itself."""
    gru = bptt.GRU(3, 4, recurrent_dropout=0.5, dtype=np.float64, rng=0)
    x = np.random.default_rng(1).standard_normal((3, 2, 3))
    out, _ = gru(x)
    d = gru.regularizer.ctx.layers[0].directions[0]
    step = d.steps[2]
    np.testing.assert_array_equal(step.h_prev, out[1])
    np.testing.assert_allclose(step.h_bar, out[1] * d.p.m_h)
    assert set(np.unique(d.p.m_h)) == {0.0, 2.0}


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_step_equals_forward_in_eval(kind):
    opts = ALL_LSTM if kind == "lstm" else ALL_GRU
    layer = LAYERS[kind](3, 4, num_layers=2, dtype=np.float64, rng=0, **opts).eval()
    x = np.random.default_rng(1).standard_normal((5, 2, 3))
    out, _ = layer(x)
    layer.reset_state()
    steps = np.stack([layer.step(x[t]) for t in range(5)])
    np.testing.assert_allclose(steps, out, rtol=1e-12)


def test_lengths_padded_steps_keep_the_state():
    layer = bptt.LSTM(3, 4, num_layers=2, dtype=np.float64, rng=0, layer_norm=True, peephole=True, zoneout=0.3).eval()
    x = np.random.default_rng(1).standard_normal((6, 3, 3))
    lengths = [6, 2, 4]
    out, (h, c) = layer(x, lengths=lengths)
    for n, ln in enumerate(lengths):
        o1, (h1, c1) = layer(x[:ln, n : n + 1])
        np.testing.assert_allclose(out[:ln, n], o1[:, 0], rtol=1e-12)
        assert np.all(out[ln:, n] == 0)
        np.testing.assert_allclose(h[:, n], h1[:, 0], rtol=1e-12)
        np.testing.assert_allclose(c[:, n], c1[:, 0], rtol=1e-12)


def test_float32_runs_and_stays_float32():
    layer = bptt.GRU(3, 4, num_layers=2, rng=0, **ALL_GRU)
    out, h = layer(np.ones((5, 2, 3), np.float32))
    dx, dh = layer.backward(np.ones_like(out))
    assert out.dtype == h.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())


# ---------------------------------------------------------------------------- errors and parameters


@pytest.mark.parametrize("name", ["recurrent_dropout", "input_dropout", "output_dropout", "weight_drop", "zoneout"])
@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_rates_outside_the_unit_interval_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a number in \[0, 1\), got {value}$"):
        bptt.LSTM(3, 4, **{name: value})


def test_cell_state_options_need_an_lstm():
    with pytest.raises(ValueError, match="^peepholes apply to the LSTM's cell state; a GRU has none$"):
        bptt.GRU(3, 4, peephole=True)
    with pytest.raises(ValueError, match="^peepholes apply to the LSTM's cell state; an RNN has none$"):
        bptt.RNN(3, 4, peephole=True)
    with pytest.raises(ValueError, match="^zoneout_c applies to the LSTM's cell state; a GRU has none$"):
        bptt.GRU(3, 4, zoneout_c=0.2)
    with pytest.raises(ValueError, match="proj_size cannot be combined"):
        bptt.LSTM(3, 4, proj_size=2, layer_norm=True)
    with pytest.raises(TypeError, match="layernorm"):
        bptt.LSTM(3, 4, layernorm=True)


def test_parameter_names_and_checkpoint_mismatch():
    layer = bptt.LSTM(3, 4, bidirectional=True, layer_norm=True, peephole=True, rng=0)
    extra = sorted(set(layer.params) - set(bptt.LSTM(3, 4, bidirectional=True).params))
    assert extra == sorted(f"{base}_l0{sfx}" for sfx in ("", "_reverse") for base in
                           ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias",
                            "weight_ci", "weight_cf", "weight_co"))
    assert layer.params["ln_ih_weight_l0"].shape == (16,) and layer.params["ln_c_bias_l0"].shape == (4,)
    plain = bptt.LSTM(3, 4, bidirectional=True)
    with pytest.raises(StateDictError) as e:
        plain.load_state_dict(layer.state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "unexpected keys: " in msg and "ln_c_weight_l0" in msg
    assert msg.endswith("(these belong to a layer built with layer_norm=True and peephole=True)")
    with pytest.raises(StateDictError, match=r"missing keys: .*weight_ci_l0.*peephole=True\)$"):
        bptt.LSTM(3, 4, bidirectional=True, peephole=True).load_state_dict(plain.state_dict())
    again = bptt.LSTM(3, 4, bidirectional=True, layer_norm=True, peephole=True, rng=1)
    again.load_state_dict(layer.state_dict())
    assert all(np.array_equal(again.params[k], v) for k, v in layer.params.items())


def test_hidden_state_stats_and_blas_scope_on_the_regularized_path():
    layer = bptt.LSTM(3, 4, num_layers=2, zoneout=0.2, rng=0)
    x = np.random.default_rng(1).standard_normal((5, 2, 3)).astype(np.float32)
    with layer.blas_scope(5, 2):
        out, _ = layer(x)
    stats = layer.hidden_state_stats()
    assert set(stats) == {"h_mean_l0", "h_var_l0", "h_mean_l1", "h_var_l1"} and stats["h_var_l1"] > 0


def test_float32_eval_mode_equals_torch(torch):
    tm, bm = _torch_pair(torch, "lstm", 3, 4, 2, True, recurrent_dropout=0.5, weight_drop=0.5)
    tm = tm.float()
    b32 = bptt.LSTM(3, 4, num_layers=2, bidirectional=True, recurrent_dropout=0.5, weight_drop=0.5).eval()
    b32.load_state_dict(bm.state_dict())
    x = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float32)
    out, _ = b32(x)
    xt = torch.tensor(x, requires_grad=True)
    tout, _ = tm(xt)
    tout.sum().backward()
    dx, _ = b32.backward(np.ones_like(out))
    assert rel_error(out, tout.detach().numpy()) < 1e-5
    assert rel_error(dx, xt.grad.numpy()) < 1e-5
    for name, p in tm.named_parameters():
        assert rel_error(b32.grads[name], p.grad.numpy()) < 1e-5, name


def test_one_hot_input_and_unbatched_input():
    """Indices with one_hot=True are the one-hot vectors; an unbatched (T, D) input is the batch of one."""
    layer = bptt.GRU(5, 4, num_layers=2, dtype=np.float64, rng=0, layer_norm=True, zoneout=0.3, input_dropout=0.2)
    ids = np.random.default_rng(1).integers(0, 5, (6, 3))
    dense = np.eye(5)[ids]
    dout = np.random.default_rng(2).standard_normal((6, 3, 4))

    def run(inp, **kw):
        layer.rng = np.random.default_rng(5)
        layer.regularizer.reset_masks()
        layer.zero_grad()
        out, h = layer(inp, **kw)
        dx, dh0 = layer.backward(dout[:, : out.shape[1]] if out.ndim == 3 else dout[:, 0])
        return out, h, dx, dh0, {k: g.copy() for k, g in layer.grads.items()}

    a, b = run(dense), run(ids, one_hot=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert b[2] is None  # no input gradient for indices
    for k in a[4]:
        np.testing.assert_allclose(a[4][k], b[4][k], rtol=1e-13, atol=1e-15)
    layer.eval()
    single, h1, *_ = run(dense[:, 0])
    batch, hb, *_ = run(dense[:, :1])
    np.testing.assert_allclose(single, batch[:, 0], rtol=1e-13)
    np.testing.assert_allclose(h1, hb[:, 0], rtol=1e-13)
