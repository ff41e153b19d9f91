"""The regularisers outside the time loop (input dropout, output dropout, weight drop) on the layer's own
compiled path, against bptt.nn.regularized_loop's NumPy loop, the reference: same masks from the same
generator, same outputs, final states and every gradient (float64, to rounding), for RNN / LSTM / GRU,
stacked, bidirectional, lengths, batch_first, `dropout` between layers, one-hot input, truncated-BPTT
windows, the threaded schedules; evaluation mode is the plain layer."""

import numpy as np
import pytest

import bptt
from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.runtime import policy
from bptt.runtime import threads as blas

LAYERS = {"rnn": bptt.RNN, "lstm": bptt.LSTM, "gru": bptt.GRU}
OUTSIDE = {
    "weight_drop": dict(weight_drop=0.4),
    "in+out": dict(input_dropout=0.3, output_dropout=0.25),
    "all three": dict(weight_drop=0.3, input_dropout=0.2, output_dropout=0.3),
}
SHAPES = {  # (layers, bidirectional, lengths, batch_first, dropout)
    "1 layer": (1, False, False, False, 0.0),
    "stacked + dropout": (2, False, False, False, 0.3),
    "bidirectional": (2, True, False, False, 0.0),
    "lengths": (2, False, True, False, 0.2),
    "bidirectional + lengths + batch_first": (2, True, True, True, 0.2),
}


def flat(state):
    return list(state) if isinstance(state, tuple) else [state]


class Problem:
    """Random inputs, initial states and output/state gradients for one layer configuration."""

    def __init__(self, kind, L, bi, lengths, batch_first, T=6, N=5, D=3, H=4, seed=1):
        rng = np.random.default_rng(seed)
        K = 2 if bi else 1
        self.kind, self.batch_first = kind, batch_first
        self.x = rng.standard_normal((N, T, D) if batch_first else (T, N, D))
        self.lengths = rng.integers(1, T + 1, N) if lengths else None
        h0, c0 = rng.standard_normal((L * K, N, H)), rng.standard_normal((L * K, N, H))
        self.state = (h0, c0) if kind == "lstm" else h0
        self.dout = rng.standard_normal((N, T, K * H) if batch_first else (T, N, K * H))
        dh, dc = rng.standard_normal((L * K, N, H)), rng.standard_normal((L * K, N, H))
        self.dstate = (dh, dc) if kind == "lstm" else dh


def run(layer, reference, x, state, dout, dstate, lengths=None, seed=7, fresh=True, **kw):
    """Forward and backward on one path: → (output, final state, dx, dstate_0, grads, masks, rng state)."""
    layer.regularizer.force_reference = reference
    if seed is not None:
        layer.rng = np.random.default_rng(seed)
    if fresh:
        layer.regularizer.reset_masks()
    layer.zero_grad()
    out, s = layer(x, state, lengths, **kw)
    ran_reference = layer.regularizer.ctx is not None  # the NumPy loop's cache, consumed by its backward
    dx, d0 = layer.backward(dout, dstate)
    return dict(ran_reference=ran_reference, out=out, state=flat(s), dx=dx, d0=flat(d0), grads={k: g.copy() for k, g in layer.grads.items()},
                masks={k: v.copy() for k, v in layer.regularizer.mask_state().items()},
                weight_masks=[[None if m is None else m.copy() for m in row] for row in layer.regularizer.weight_masks],
                rng=layer.rng.bit_generator.state)


def assert_same(a, b, tol=1e-12):
    """Both paths: equal masks and generator state, and every number equal to rounding (relative error)."""
    assert a["rng"] == b["rng"]  # as many draws, in the same order
    assert a["masks"].keys() == b["masks"].keys()
    for k in a["masks"]:
        np.testing.assert_array_equal(a["masks"][k], b["masks"][k])
    for ra, rb in zip(a["weight_masks"], b["weight_masks"], strict=True):
        for ma, mb in zip(ra, rb, strict=True):
            assert (ma is None) == (mb is None) and (ma is None or np.array_equal(ma, mb))
    assert rel_error(a["out"], b["out"]) < tol
    for sa, sb in zip(a["state"] + a["d0"], b["state"] + b["d0"], strict=True):
        assert rel_error(sa, sb) < tol
    assert (a["dx"] is None) == (b["dx"] is None)
    if a["dx"] is not None:
        assert rel_error(a["dx"], b["dx"]) < tol
    assert a["grads"].keys() == b["grads"].keys()
    for k in a["grads"]:
        assert rel_error(a["grads"][k], b["grads"][k]) < tol, k


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("opts", list(OUTSIDE), ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_plain_path_equals_the_reference_loop(kind, opts, shape):
    L, bi, lengths, batch_first, dropout = SHAPES[shape]
    layer = LAYERS[kind](3, 4, num_layers=L, bidirectional=bi, batch_first=batch_first, dropout=dropout,
                         dtype=np.float64, rng=0, **OUTSIDE[opts])
    assert layer.regularizer.plain_path
    p = Problem(kind, L, bi, lengths, batch_first)
    ref = run(layer, True, p.x, p.state, p.dout, p.dstate, p.lengths)
    fast = run(layer, False, p.x, p.state, p.dout, p.dstate, p.lengths)
    assert ref["ran_reference"] and not fast["ran_reference"]
    assert_same(ref, fast)
    assert any(g.any() for g in fast["grads"].values())


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_truncated_bptt_windows_carry_state_and_stream_masks(kind):
    """Three windows with the state carried: each path keeps the streams' masks from the first window,
    draws a new weight-drop mask per window, and the two paths agree window by window."""
    layer = LAYERS[kind](3, 4, num_layers=2, dropout=0.2, dtype=np.float64, rng=0, **OUTSIDE["all three"])
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((5, 4, 3)) for _ in range(3)]
    douts = [rng.standard_normal((5, 4, 4)) for _ in range(3)]
    results = {}
    for reference in (True, False):
        layer.rng = np.random.default_rng(11)
        layer.regularizer.reset_masks()
        state, seq = None, []
        for x, dout in zip(xs, douts):
            r = run(layer, reference, x, state, dout, None, seed=None, fresh=False)
            state = tuple(r["state"]) if kind == "lstm" else r["state"][0]
            seq.append(r)
        results[reference] = seq
    for a, b in zip(results[True], results[False]):
        assert_same(a, b)
    seq = results[False]
    for k in seq[0]["masks"]:  # the stream masks stay for the whole stream ...
        np.testing.assert_array_equal(seq[0]["masks"][k], seq[2]["masks"][k])
    assert not np.array_equal(seq[0]["weight_masks"][0][0], seq[1]["weight_masks"][0][0])  # ... W's mask is new


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_one_hot_input_with_input_dropout(kind):
    """Indices with input dropout: the one-hot vectors scaled by the stream mask, no input gradient."""
    layer = LAYERS[kind](5, 4, num_layers=2, dtype=np.float64, rng=0, **OUTSIDE["all three"])
    ids = np.random.default_rng(1).integers(0, 5, (6, 3))
    dout = np.random.default_rng(2).standard_normal((6, 3, 4))
    ref = run(layer, True, ids, None, dout, None, one_hot=True)
    fast = run(layer, False, ids, None, dout, None, one_hot=True)
    assert fast["dx"] is None
    assert_same(ref, fast)
    dense = run(layer, False, np.eye(5)[ids], None, dout, None)  # the same as passing the vectors
    assert rel_error(dense["out"], fast["out"]) < 1e-14
    assert rel_error(dense["grads"]["weight_ih_l0"], fast["grads"]["weight_ih_l0"]) < 1e-14


@pytest.mark.parametrize("schedule", ["wavefront", "batch-split"])
def test_threaded_schedules_equal_the_reference_loop(monkeypatch, schedule):
    """The layer's threaded schedules (a wavefront over the layers, slices of the batch) with W̃_hh and the masks."""
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    monkeypatch.setattr(policy, "SMALL_MACS", -1)
    if schedule == "wavefront":
        monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 1 << 62)
    else:
        monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 4)
    layer = bptt.LSTM(5, 6, num_layers=2, dropout=0.2, dtype=np.float64, rng=0, **OUTSIDE["all three"])
    p = Problem("lstm", 2, False, True, False, T=9, N=10, D=5, H=6)
    layer(p.x, p.state, p.lengths)  # which schedule the forward takes
    if schedule == "wavefront":
        assert len(layer._ctx.chunks) > 1 and layer._ctx.threads == 2
    else:
        assert len(layer._ctx.parts) == 2
    fast = run(layer, False, p.x, p.state, p.dout, p.dstate, p.lengths)
    ref = run(layer, True, p.x, p.state, p.dout, p.dstate, p.lengths)
    assert_same(ref, fast)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_eval_mode_is_the_plain_layer(kind):
    """In evaluation every option outside the loop is the identity: the same numbers as a layer without them,
    bit for bit, the stateful step too, and nothing is drawn."""
    layer = LAYERS[kind](3, 4, num_layers=2, dropout=0.3, rng=0, **OUTSIDE["all three"]).eval()
    plain = LAYERS[kind](3, 4, num_layers=2, dropout=0.3, rng=0).eval()
    plain.load_state_dict(layer.state_dict())
    x = np.random.default_rng(1).standard_normal((6, 2, 3)).astype(np.float32)
    before = layer.rng.bit_generator.state
    out, s = layer(x, need_backward=True)
    out_p, s_p = plain(x, need_backward=True)
    np.testing.assert_array_equal(out, out_p)
    for a, b in zip(flat(s), flat(s_p)):
        np.testing.assert_array_equal(a, b)
    dout = np.ones_like(out)
    dx, _ = layer.backward(dout)
    dx_p, _ = plain.backward(dout)
    np.testing.assert_array_equal(dx, dx_p)
    for k in plain.grads:
        np.testing.assert_array_equal(layer.grads[k], plain.grads[k])
    ys = [layer.step(x[t]) for t in range(3)]
    ys_p = [plain.step(x[t]) for t in range(3)]
    for a, b in zip(ys, ys_p):
        np.testing.assert_array_equal(a, b)
    assert layer.rng.bit_generator.state == before and layer.regularizer.locked is None


def test_training_step_draws_as_the_reference_loop():
    """step() in training mode: the stream masks drawn at the first step and kept, a weight-drop mask per step."""
    layer = bptt.GRU(3, 4, num_layers=2, dtype=np.float64, rng=0, **OUTSIDE["all three"])
    xs = np.random.default_rng(1).standard_normal((4, 2, 3))
    outs = {}
    for reference in (True, False):
        layer.regularizer.force_reference = reference
        layer.rng = np.random.default_rng(5)
        layer.reset_state()
        outs[reference] = [layer.step(x) for x in xs]
    for a, b in zip(outs[True], outs[False]):
        assert rel_error(a, b) < 1e-12


def test_gradcheck_on_the_plain_path():
    layer = bptt.LSTM(3, 4, num_layers=2, bidirectional=True, dropout=0.2, dtype=np.float64, rng=0,
                      **OUTSIDE["all three"])
    p = Problem("lstm", 2, True, True, False, T=4, N=3)

    def loss():
        layer.rng = np.random.default_rng(9)
        layer.regularizer.reset_masks()
        out, (h, c) = layer(p.x, p.state, p.lengths)
        return float(np.sum(out * p.dout) + np.sum(h * p.dstate[0]) + np.sum(c * p.dstate[1]))

    loss()
    layer.zero_grad()
    dx, (dh0, dc0) = layer.backward(p.dout, p.dstate)
    wrt = dict(layer.params) | {"x": p.x, "h0": p.state[0], "c0": p.state[1]}
    analytic = dict(layer.grads) | {"x": dx, "h0": dh0, "c0": dc0}
    assert max(gradcheck(loss, wrt, analytic, tol=1e-6).values()) < 1e-6


def test_which_options_take_the_plain_path():
    outside = [dict(weight_drop=0.2), dict(input_dropout=0.1), dict(output_dropout=0.1), OUTSIDE["all three"]]
    inside = [dict(recurrent_dropout=0.1), dict(zoneout=0.1), dict(layer_norm=True), dict(peephole=True),
              dict(zoneout_c=0.1), dict(weight_drop=0.2, zoneout=0.1)]
    for opts in outside:
        assert bptt.LSTM(3, 4, **opts).regularizer.plain_path, opts
    for opts in inside:
        assert not bptt.LSTM(3, 4, **opts).regularizer.plain_path, opts
    layer = bptt.LSTM(3, 4, weight_drop=0.2)
    layer.regularizer.force_reference = True
    assert not layer.regularizer.plain_path


def test_float32_plain_path_stays_float32_and_near_the_reference():
    layer = bptt.LSTM(3, 8, num_layers=2, rng=0, **OUTSIDE["all three"])
    p = Problem("lstm", 2, False, False, False, H=8)
    x = p.x.astype(np.float32)
    dout = p.dout.astype(np.float32)
    fast = run(layer, False, x, None, dout, None)
    ref = run(layer, True, x, None, dout, None)
    assert fast["out"].dtype == np.float32 and fast["dx"].dtype == np.float32
    assert all(g.dtype == np.float32 for g in fast["grads"].values())
    assert rel_error(fast["out"], ref["out"]) < 1e-5
    for k in ref["grads"]:
        assert rel_error(fast["grads"][k], ref["grads"][k]) < 1e-4, k
