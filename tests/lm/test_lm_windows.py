"""Truncation strategies: coverage of the corpus, window-length distributions, ARTBP's unbiasedness."""

import itertools
import math

import numpy as np
import pytest

from bptt.lm.data import DataError, TBPTTBatches
from bptt.nn.rnn import GRU, LSTM, RNN
from bptt.lm.windows import FixedBatches, RandomizedBatches, VariableBatches, Window, make_batches


def _positions(b):
    """Every (stream, position) visited as input, with the ids equal to their corpus index."""
    seen = []
    for k in range(len(b)):
        x, y = b.batch(k)
        assert x.shape == y.shape == (b.lengths[k], b.batch_size) and x.dtype == np.int64
        np.testing.assert_array_equal(y, x + 1)  # the target is the next id of the same stream
        seen.append(x)
    return np.concatenate(seen)  # (sum T_k, N)


@pytest.mark.parametrize("strategy, options", [("variable", {}), ("variable", {"max_len": 9, "min_len": 3}),
                                               ("randomized", {}), ("randomized", {"min_len": 1, "max_len": 12})])
def test_windows_tile_every_stream_exactly(strategy, options):
    L, N, T = 1003, 4, 8
    b = make_batches(strategy, np.arange(L), N, T, seed=3, **options)
    S = (L - 1) // N
    assert b.stream_len == S and b.lengths.sum() == S and b.tokens_per_epoch == S * N
    xs = _positions(b)
    np.testing.assert_array_equal(xs, np.arange(S)[:, None] + S * np.arange(N)[None, :])  # in order, once each
    assert b.lengths[:-1].min() >= b.min_len
    if options.get("max_len"):
        assert b.lengths.max() <= options["max_len"]
    # consecutive windows continue each other: the carried state is right
    for k in range(1, len(b)):
        assert (b.batch(k)[0][0] == b.batch(k - 1)[0][-1] + 1).all()


def test_fixed_is_tbptt_with_the_common_interface():
    ids = np.arange(500) % 7
    f, t = make_batches("fixed", ids, 3, 10), TBPTTBatches(ids, 3, 10)
    assert isinstance(f, FixedBatches)
    f.set_epoch(4)  # nothing changes
    assert len(f) == len(t) and f.tokens_per_epoch == t.tokens_per_epoch
    for k in range(len(t)):
        w = f.window(k)
        np.testing.assert_array_equal(w.x, t.batch(k)[0])
        np.testing.assert_array_equal(w.y, t.batch(k)[1])
        assert w.lr_scale == 1.0 and w.recurrent_scale.tolist() == [1.0] * 10
    assert f.lengths.tolist() == [10] * len(t)


def test_variable_lengths_follow_awd_lstm():
    T, std = 70, 5.0
    b = VariableBatches(np.arange(400_001), 1, T, seed=0)
    n = b.lengths[:-1]  # the last one is cut by the end of the stream
    K = len(n)
    assert K > 5000
    short = n < 0.75 * T  # the T/2 branch: N(35, 5) and N(70, 5) do not overlap at 52
    p_half = short.mean()
    assert abs(p_half - 0.05) < 4 * math.sqrt(0.05 * 0.95 / K)
    # int() truncates toward zero: E[int(N(mu, 5))] ~= mu - 0.5 away from the clip
    se = std / math.sqrt((~short).sum())
    assert abs(n[~short].mean() - (T - 0.5)) < 4 * se
    assert abs(n[~short].std() - std) < 0.3
    assert abs(n[short].mean() - (T / 2 - 0.5)) < 4 * std / math.sqrt(short.sum())
    assert n.min() >= 5
    for k in (0, 1, K - 1):
        w = b.window(k)
        assert w.lr_scale == b.lengths[k] / T == b.lr_scale(k)
        assert w.recurrent_scale.tolist() == [1.0] * b.lengths[k]


def test_variable_clips_small_seq_len():
    b = VariableBatches(np.arange(2001), 2, 4, seed=1, std=5.0)  # N(4, 5) often < 1
    assert b.min_len == 4 and b.lengths[:-1].min() >= 4


def test_epochs_are_reproducible_and_differ():
    ids = np.arange(20_001)
    a = VariableBatches(ids, 2, 30, seed=5)
    b = VariableBatches(ids, 2, 30, seed=5, epoch=1)
    assert not np.array_equal(a.lengths, b.lengths)
    a.set_epoch(1)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert a.epoch == 1
    c = RandomizedBatches(ids, 2, 30, seed=5)
    d = RandomizedBatches(ids, 2, 30, seed=6)
    assert not np.array_equal(c.lengths, d.lengths)
    np.testing.assert_array_equal(c.lengths, RandomizedBatches(ids, 2, 30, seed=5).lengths)


@pytest.mark.parametrize("T, m", [(70, None), (20, 1), (9, 8)])
def test_randomized_lengths_are_min_plus_geometric_with_mean_T(T, m):
    b = RandomizedBatches(np.arange(300_001), 1, T, seed=2, min_len=m)
    if m is None:
        assert b.min_len == 35  # ceil(T / 2)
    m = b.min_len
    n = b.lengths[:-1]
    K = len(n)
    c = 1.0 / (T - m + 1)
    assert b.c == c and n.min() >= m
    assert abs(n.mean() - T) < 4 * math.sqrt((1 - c) / c**2 / K)  # Var of a geometric: (1 - c) / c^2
    assert abs((n == m).mean() - c) < 4 * math.sqrt(c * (1 - c) / K)
    assert [b.cut_probability(j) for j in range(1, m)] == [0.0] * (m - 1)
    assert b.cut_probability(m) == b.cut_probability(m + 50) == c


def test_randomized_compensation_has_expectation_one():
    """E[(1 - eps_j) / (1 - c_j) | the window reached j steps] = 1 at every j, from the drawn windows."""
    b = RandomizedBatches(np.arange(400_001), 1, 12, seed=4, min_len=4)
    n = b.lengths[:-1]
    r = b.compensation(int(n.max()) + 1)
    assert r[0] == 1.0 and (r[1:4] == 1.0).all() and np.allclose(r[4:], 1 / (1 - 1 / 9))
    for j in range(1, 25):
        reached = n >= j  # windows that ran j steps (and then were cut or went on)
        went_on = n > j
        estimate = (went_on * r[j])[reached].mean()
        assert abs(estimate - 1.0) < 4 * math.sqrt(r[j] - 1.0) / math.sqrt(reached.sum()) + 1e-12, j
        if j < 4:
            assert estimate == 1.0  # c_j = 0: nothing is ever cut, nothing to compensate
    w = b.window(0)
    np.testing.assert_array_equal(w.recurrent_scale, b.compensation(b.lengths[0]))
    assert w.lr_scale == 1.0


# ---------------------------------------------------------------------------- ARTBP is unbiased (exactly)
def _tanh_rnn(S, rng, D=2, H=3):
    p = {"W": rng.standard_normal((H, H)) * 0.9, "U": rng.standard_normal((H, D)), "V": rng.standard_normal((1, H))}
    xs, ys = rng.standard_normal((S, D)), rng.standard_normal((S, 1))
    hs = [np.zeros(H)]
    for t in range(S):
        hs.append(np.tanh(p["W"] @ hs[-1] + p["U"] @ xs[t]))
    return p, xs, ys, hs


def _gradient(p, xs, ys, hs, windows, scale):
    """dL/dW for L = sum_t (V h_t - y_t)^2 / 2 with the gradient cut between windows and the carried
    gradient multiplied by scale(len)[j] from step j to j - 1 of a window (j counted within it)."""
    gW = np.zeros_like(p["W"])
    start = 0
    for n in windows:
        r = scale(n)
        dh_next = np.zeros(p["W"].shape[0])
        for j in reversed(range(n)):
            t = start + j
            h_prev, h = hs[t], hs[t + 1]
            dh = p["V"].T @ (p["V"] @ h - ys[t]) + dh_next
            da = dh * (1 - h**2)
            gW += np.outer(da, h_prev)
            dh_next = r[j] * (p["W"].T @ da) if j > 0 else 0  # to step j - 1 of the same window
        start += n
    return gW


def _compositions(S):
    for cuts in itertools.product((0, 1), repeat=S - 1):
        parts, n = [], 1
        for c in cuts:
            if c:
                parts.append(n)
                n = 1
            else:
                n += 1
        yield parts + [n]


@pytest.mark.parametrize("T, m", [(3, 2), (4, 1), (5, 3)])
def test_artbp_expected_gradient_is_the_full_gradient(rng, T, m):
    S = 9
    p, xs, ys, hs = _tanh_rnn(S, rng)
    b = RandomizedBatches(np.arange(2 * S + 1), 2, T, min_len=m)  # only its schedule and factors are used
    c = b.cut_probability

    def prob(parts):  # P(this tiling of the stream) under the cut probabilities c_j
        pr = 1.0
        for i, n in enumerate(parts):
            pr *= math.prod(1 - c(j) for j in range(1, n))
            if i < len(parts) - 1:
                pr *= c(n)  # cut after exactly n steps; the last window is ended by the stream
        return pr

    full = _gradient(p, xs, ys, hs, [S], lambda n: np.ones(n))
    total_p, artbp, tbptt = 0.0, np.zeros_like(full), np.zeros_like(full)
    for parts in _compositions(S):
        pr = prob(parts)
        if pr == 0.0:
            continue
        total_p += pr
        artbp += pr * _gradient(p, xs, ys, hs, parts, b.compensation)
        tbptt += pr * _gradient(p, xs, ys, hs, parts, lambda n: np.ones(n))
    assert total_p == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_allclose(artbp, full, rtol=1e-12, atol=1e-12)
    assert np.abs(tbptt - full).max() > 1e-3 * np.abs(full).max()  # without the factors: biased


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls, kwargs, match", [
    (RandomizedBatches, {"min_len": 8}, "min_len"),
    (RandomizedBatches, {"max_len": 7}, "max_len"),
    (VariableBatches, {"p_full": 1.5}, "p_full"),
    (VariableBatches, {"std": -1.0}, "std"),
    (VariableBatches, {"min_len": 6, "max_len": 5}, "max_len"),
    (VariableBatches, {"seed": -1}, "seed"),
    (VariableBatches, {"epoch": 1.5}, "epoch"),
])
def test_invalid_options(cls, kwargs, match):
    with pytest.raises(DataError, match=match):
        cls(np.arange(1000), 2, 8, **kwargs)


def test_too_short_and_unknown_strategy():
    with pytest.raises(DataError, match="too short") as exc:
        make_batches("randomized", np.arange(16), 2, 8)
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="unknown truncation strategy"):
        make_batches("bogus", np.arange(100), 2, 8)
    with pytest.raises(DataError, match="no options"):
        make_batches("fixed", np.arange(100), 2, 8, min_len=3)
    with pytest.raises(DataError, match="seq_len >= 2"):
        RandomizedBatches(np.arange(100), 2, 1)
    b = make_batches("variable", np.arange(100), 2, 8)
    with pytest.raises(IndexError):
        b.batch(len(b))
    assert isinstance(b.window(-1), Window)


# ---------------------------------------------------------------------------- ... through the real layers
def _layer_gradient(layer, x, a, windows, scale):
    """Σ over windows of the gradients of L = Σ_t <a_t, y_t> through ``layer`` (bptt.nn.rnn), the state
    carried from window to window without gradient, each window's backward given ``scale(T_k)``."""
    layer.zero_grad()
    state, start = None, 0
    for n in windows:
        y, state = layer(x[start : start + n], state)
        r = scale(n)
        layer.backward(a[start : start + n], recurrent_scale=None if r is None else r)
        start += n
    return {k: g.copy() for k, g in layer.grads.items()}


@pytest.mark.parametrize("cls", [RNN, LSTM, GRU])
def test_artbp_through_the_rnn_layers_backward_is_unbiased(rng, cls):
    """The same exact expectation as above, through RNNBase.backward(recurrent_scale=...) of a stacked
    float64 layer (two layers: every path crosses each time boundary once, in one of them)."""
    S, T, m = 7, 3, 2
    layer = cls(2, 3, num_layers=2, dtype=np.float64, rng=1)
    layer.backend = "reference"
    x, a = rng.standard_normal((S, 2, 2)), rng.standard_normal((S, 2, 3))
    b = RandomizedBatches(np.arange(2 * S + 1), 2, T, min_len=m)
    c = b.cut_probability

    def prob(parts):
        pr = 1.0
        for i, n in enumerate(parts):
            pr *= math.prod(1 - c(j) for j in range(1, n))
            if i < len(parts) - 1:
                pr *= c(n)
        return pr

    full = _layer_gradient(layer, x, a, [S], lambda n: None)
    artbp = {k: np.zeros_like(g) for k, g in full.items()}
    tbptt = {k: np.zeros_like(g) for k, g in full.items()}
    for parts in _compositions(S):
        pr = prob(parts)
        if pr == 0.0:
            continue
        for acc, scale in ((artbp, b.compensation), (tbptt, lambda n: None)):
            for k, g in _layer_gradient(layer, x, a, parts, scale).items():
                acc[k] += pr * g
    for k in full:
        np.testing.assert_allclose(artbp[k], full[k], rtol=1e-10, atol=1e-12, err_msg=k)
    hh = "weight_hh_l0"
    assert np.abs(tbptt[hh] - full[hh]).max() > 1e-3 * np.abs(full[hh]).max()  # without the factors: biased


def test_recurrent_scale_of_ones_changes_nothing_and_needs_the_reference_forward(rng):
    layer = LSTM(3, 4, num_layers=2, dtype=np.float64, rng=0)
    layer.backend = "reference"
    x, dy = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 2, 4))
    grads = []
    for r in (None, np.ones(5)):
        layer.zero_grad()
        layer(x)
        dx, _ = layer.backward(dy, recurrent_scale=r)
        grads.append((dx, {k: g.copy() for k, g in layer.grads.items()}))
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    for k in grads[0][1]:
        np.testing.assert_array_equal(grads[0][1][k], grads[1][1][k])
    layer(x)
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        layer.backward(dy, recurrent_scale=np.ones(4))
    layer.backend = "fused"  # compiled kernels keep no per-step caches for the reference loop
    layer(x)
    with pytest.raises(ValueError, match="reference backend"):
        layer.backward(dy, recurrent_scale=np.ones(5))
