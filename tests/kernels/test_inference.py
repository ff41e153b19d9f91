"""The inference path (bptt.kernels.loops: ForwardRun(keep=False), ``_infer_loop``) equals the training forward.

An eval-mode forward on the compiled kernels keeps nothing for a backward; it runs the
same products and the same step functions, so its outputs and final states must equal
those of a forward that keeps its caches bit for bit (np.array_equal, not a tolerance),
on every kernel path (the ``path`` fixture of test_loops: compiled loop, panels, BLAS,
the Python loop, batch slices in threads), for every mode, both directions, variable
lengths, a given initial state and the LSTM projection.  A backward after it raises.
"""

import numpy as np
import pytest

from conftest import require_numba
from test_loops import make, path  # noqa: F401  (path: the kernel-path fixture)

import bptt
from bptt import kernels
from bptt.nn import recurrence
from bptt.runtime import policy

require_numba()

MODES = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def flat(s):
    return list(s) if isinstance(s, tuple) else [s]


def case(mode, dtype, seed, T=6, N=5, D=3, H=4, L=2, bidir=False, proj=0, lengths=False, state=False):
    rng = np.random.default_rng(seed)
    layer = make(mode, D, H, L, bidir, proj, dtype, seed)
    K, P = 2 if bidir else 1, proj or H
    x = rng.standard_normal((T, N, D)).astype(dtype)
    lens = None
    if lengths:
        lens = rng.integers(1, T + 1, N)
        lens[0] = T
    st = None
    if state:
        h0 = rng.standard_normal((L * K, N, P)).astype(dtype)
        st = (h0, rng.standard_normal((L * K, N, H)).astype(dtype)) if mode == "lstm" else h0
    return layer, x, st, lens


def assert_identical(layer, x, st, lens):
    """Training forward (keeps caches), eval forward keeping them, eval forward keeping none: identical."""
    layer.train()
    ref, ref_state = layer.forward(x, st, lengths=lens)
    layer.eval()
    kept, kept_state = layer.forward(x, st, lengths=lens, need_backward=True)
    got, got_state = layer.forward(x, st, lengths=lens)
    assert np.array_equal(got, kept) and np.array_equal(got, ref)
    for a, b, c in zip(flat(got_state), flat(kept_state), flat(ref_state)):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    return got


@pytest.mark.parametrize("gx_bytes", [None, 1, 300])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", MODES)
def test_inference_forward_is_the_training_forward_bit_for_bit(mode, dtype, gx_bytes, path, monkeypatch):  # noqa: F811
    """gx_bytes: the input pre-activations made a chunk at a time (1 byte: one step a chunk;
    300: a few steps, chunks of unequal length) or, None, the default (the whole sequence here)."""
    if gx_bytes is not None:
        monkeypatch.setattr(policy, "INFER_WINDOW_BYTES", gx_bytes)
    for seed, kw in enumerate([
        {},
        dict(bidir=True),
        dict(lengths=True, state=True),
        dict(bidir=True, lengths=True, state=True, L=3),
        dict(T=1, N=1, L=1),
        dict(T=9, N=16, H=8, lengths=True),  # the batch-split path cuts N = 16 in two slices
    ]):
        layer, x, st, lens = case(mode, dtype, seed, **kw)
        assert_identical(layer, x, st, lens)


@pytest.mark.parametrize("gx_bytes", [None, 1, 300])
@pytest.mark.parametrize("mode", MODES)
def test_training_mode_forward_without_backward_applies_the_same_dropout(mode, gx_bytes, path, monkeypatch):  # noqa: F811
    """In training mode with dropout between layers, ``need_backward=False`` (the inference path,
    its input windows multiplied by the masks) gives the forward that keeps its caches, bit for
    bit, for the same draws, on every kernel path (N = 16: two batch slices on "batch-split")."""
    if gx_bytes is not None:
        monkeypatch.setattr(policy, "INFER_WINDOW_BYTES", gx_bytes)
    cls = {"lstm": bptt.LSTM, "gru": bptt.GRU}.get(mode, bptt.RNN)
    kw = {"nonlinearity": mode[4:]} if cls is bptt.RNN else {}
    layer = cls(3, 8, 3, dropout=0.5, rng=1, dtype=np.float64, **kw)
    for N in (2, 16):  # (N = 1 in one-step windows: a one-row product, which NumPy runs as a
        # vector-matrix product, rounds differently from the whole sequence's)
        x = np.random.default_rng(N).standard_normal((7, N, 3))
        outs = []
        for need_backward in (True, False):
            layer.rng = np.random.default_rng(5)
            outs.append(layer.forward(x, need_backward=need_backward))
        (want, want_h), (got, got_h) = outs
        assert np.array_equal(got, want) and np.array_equal(got_h, want_h)
        layer.rng = np.random.default_rng(6)
        assert not np.array_equal(layer.forward(x, need_backward=False)[0], want)  # the masks do matter


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inference_with_projection(dtype, path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(policy, "INFER_WINDOW_BYTES", 200)
    for seed, kw in enumerate([dict(proj=2), dict(proj=3, bidir=True, lengths=True, state=True)]):
        layer, x, st, lens = case("lstm", dtype, 10 + seed, **kw)
        assert_identical(layer, x, st, lens)


@pytest.mark.parametrize("mode", MODES)
def test_forward_run_without_cache_in_chunks(mode):
    """ForwardRun(keep=False) run in uneven chunks (as the wavefront runs it) equals the whole
    sequence with caches, in both directions, with a mask; it returns no cache."""
    rng = np.random.default_rng(3)
    T, N, H = 7, 3, 5
    g = {"lstm": 4, "gru": 3}.get(mode, 1)
    W = recurrence.Weights(rng.standard_normal((g * H, H)), rng.standard_normal(g * H) if mode == "gru" else None,
                           None)
    gx = rng.standard_normal((T, N, g * H))
    h0 = rng.standard_normal((N, H))
    c0 = rng.standard_normal((N, H)) if mode == "lstm" else None
    mask = np.arange(T)[:, None] < np.array([T, 2, 5])[None, :]
    for reverse in (False, True):
        want = kernels.sequence_forward(mode, gx, h0, c0, W, mask, reverse)
        run = kernels.ForwardRun(mode, h0, c0, W, gx, mask, reverse=reverse, keep=False)
        chunks = [(0, 2), (2, 3), (3, 7)]
        for t0, t1 in chunks[::-1] if reverse else chunks:  # the reverse direction starts at the end
            run.steps(t0, t1)
        y, h_n, c_n, cache = run.result()
        assert cache is None
        assert np.array_equal(y, want[0]) and np.array_equal(h_n, want[1])
        if mode == "lstm":
            assert np.array_equal(c_n, want[2])


def test_backward_after_inference_forward_raises():
    layer = bptt.LSTM(3, 4, 2, rng=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    layer.eval()
    out, _ = layer.forward(x)
    with pytest.raises(RuntimeError, match="kept nothing for a backward"):
        layer.backward(np.ones_like(out))
    with pytest.raises(ValueError, match="no cache"):
        layer.last_forward_caches()
    # need_backward=True in eval mode, and training mode, keep what the backward needs
    out, _ = layer.forward(x, need_backward=True)
    dx, _ = layer.backward(np.ones_like(out))
    assert dx.shape == x.shape and np.abs(dx).sum() > 0
    layer.train()
    out, _ = layer.forward(x, need_backward=False)
    with pytest.raises(RuntimeError, match="kept nothing"):
        layer.backward(np.ones_like(out))


def test_reference_backend_keeps_its_caches_in_eval():
    """The analyses read the reference loop's per-step caches after an eval-mode forward."""
    layer = bptt.GRU(3, 4, rng=0, dtype=np.float64)
    layer.backend = "reference"
    layer.eval()
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    out, _ = layer.forward(x)
    (_, directions), = layer.last_forward_caches()
    assert len(directions[0].steps) == 5
    dx, _ = layer.backward(np.ones_like(out))
    assert dx.shape == x.shape


def test_window_of_gx_rows():
    """ForwardRun(keep=False, length=T) over a window of gx rows, filled chunk by chunk through
    gx_rows, equals the whole sequence, each chunk's output read from y's window after its steps;
    chunks out of turn or too long, and a y of the wrong shape, are refused."""
    rng = np.random.default_rng(4)
    T, N, H = 7, 2, 3
    W = recurrence.Weights(rng.standard_normal((4 * H, H)), None, None)
    gx = rng.standard_normal((T, N, 4 * H))
    h0, c0 = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    want = kernels.sequence_forward("lstm", gx, h0, c0, W)
    y_window = np.full((3, N, H), np.nan)
    run = kernels.ForwardRun("lstm", h0, c0, W, np.empty((3, N, 4 * H)), keep=False, length=T, y=y_window)
    y = np.full((T, N, H), np.nan)
    for t0, t1 in ((0, 3), (3, 5), (5, 7)):
        run.gx_rows(t0, t1)[...] = gx[t0:t1]
        run.steps(t0, t1)
        y[t0:t1] = y_window[: t1 - t0]
    y_last, h_n, c_n, cache = run.result()
    assert cache is None and y_last is y_window
    assert np.array_equal(y, want[0]) and np.array_equal(h_n, want[1]) and np.array_equal(c_n, want[2])
    with pytest.raises(ValueError, match="y must be"):
        kernels.ForwardRun("lstm", h0, c0, W, np.empty((3, N, 4 * H)), keep=False, length=T, y=np.empty((T, N, H)))
    with pytest.raises(ValueError, match="does not fit"):
        run.gx_rows(0, 4)
    with pytest.raises(RuntimeError, match="window holds"):
        run.steps(3, 5)
    with pytest.raises(ValueError, match="keep=False"):
        kernels.ForwardRun("lstm", h0, c0, W, np.empty((3, N, 4 * H)), length=T)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_weights_reuse_prepared_weights_and_forget_them_on_exit(mode, path):  # noqa: F811
    """Inside ``frozen_weights()`` each layer's prepared (packed) weights are made by the first
    call and reused by the next, with outputs bit for bit those of calls outside the block; on
    exit they are dropped, so a weight changed afterwards is used, and an inner block leaves the
    outer block's cache alone."""
    layer, x, st, lens = case(mode, np.float32, 7, T=5, N=16, H=8, lengths=True, state=True)
    layer.eval()
    want = layer.forward(x, st, lengths=lens)
    with layer.frozen_weights():
        first = layer.forward(x, st, lengths=lens)
        cached = dict(layer.frozen_cache)
        assert len(cached) == layer.num_layers  # one prepared set per layer and direction
        with layer.frozen_weights():  # nested: the same cache
            second = layer.forward(x, st, lengths=lens)
        assert layer.frozen_cache is not None
        assert all(layer.frozen_cache[key] is value for key, value in cached.items())  # reused, not remade
    assert layer.frozen_cache is None
    for got in (first, second):
        assert np.array_equal(got[0], want[0])
        for a, b in zip(flat(got[1]), flat(want[1])):
            assert np.array_equal(a, b)
    # a weight changed after the block: the next block packs it afresh
    for name, p, _ in layer.named_parameters():
        if name.startswith("weight_hh") or name.startswith("weight_ih"):
            p *= 0.5
    changed = layer.forward(x, st, lengths=lens)[0]
    assert not np.array_equal(changed, want[0])
    with layer.frozen_weights():
        assert np.array_equal(layer.forward(x, st, lengths=lens)[0], changed)


def test_weight_drop_is_not_frozen():
    """Under weight drop each training forward draws a new W̃_hh: nothing of it is kept, even
    inside a frozen_weights() block."""
    layer = bptt.LSTM(3, 8, 1, rng=0, weight_drop=0.5)
    x = np.random.default_rng(1).standard_normal((4, 6, 3)).astype(np.float32)
    with layer.frozen_weights():
        a, _ = layer.forward(x)
        b, _ = layer.forward(x)
        assert not np.array_equal(a, b)  # two masks, two W̃_hh
        assert layer.frozen_cache == {}
