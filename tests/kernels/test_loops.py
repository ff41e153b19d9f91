"""The fused kernels' loops (bptt.kernels.loops) equal the reference loop (bptt.nn.recurrence).

Every case runs the same layer twice, ``backend = "reference"`` and ``"fused"``,
and compares outputs, final states, input and state gradients and every
parameter gradient.  Shapes are small so this stays fast; both kernel paths are
covered (the compiled loop for tiny products, the BLAS loop for larger ones)
by moving the size threshold.
"""

import zlib

import numpy as np
import pytest

from conftest import require_numba

import bptt
from bptt import kernels
from bptt.kernels import gemm, loops
from bptt.nn import recurrence
from bptt.runtime import policy
from bptt.runtime import threads as blas

require_numba()

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def make(mode, D, H, L, bidir, proj, dtype, seed):
    if mode == "lstm":
        return bptt.LSTM(D, H, L, bidirectional=bidir, proj_size=proj, dtype=dtype, rng=seed)
    if mode == "gru":
        return bptt.GRU(D, H, L, bidirectional=bidir, dtype=dtype, rng=seed)
    return bptt.RNN(D, H, L, nonlinearity=mode[4:], bidirectional=bidir, dtype=dtype, rng=seed)


def run(layer, backend, x, state, lengths, dout, dstate):
    layer.backend = backend
    layer.zero_grad()
    out, st = layer.forward(x, state, lengths=lengths)
    dx, dst = layer.backward(dout, dstate)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    return out, st, dx, dst, grads


def flat(s):
    return list(s) if isinstance(s, tuple) else [s]


def random_case(rng, mode, dtype, T, N, D, H, L, bidir, proj, with_lengths, with_state):
    layer = make(mode, D, H, L, bidir, proj, dtype, int(rng.integers(1 << 30)))
    K, P = 2 if bidir else 1, proj or H
    x = rng.standard_normal((T, N, D)).astype(dtype)
    lengths = rng.integers(1, T + 1, N) if with_lengths else None
    if with_lengths:
        lengths[0] = T  # at least one full-length sequence
    h0 = rng.standard_normal((L * K, N, P)).astype(dtype) if with_state else None
    c0 = rng.standard_normal((L * K, N, H)).astype(dtype) if with_state else None
    state = (h0, c0) if (mode == "lstm" and with_state) else h0
    dout = rng.standard_normal((T, N, K * P)).astype(dtype)
    dh = rng.standard_normal((L * K, N, P)).astype(dtype)
    dstate = (dh, rng.standard_normal((L * K, N, H)).astype(dtype)) if mode == "lstm" else dh
    return layer, x, state, lengths, dout, dstate


def assert_same(layer, x, state, lengths, dout, dstate, tol):
    ref = run(layer, "reference", x, state, lengths, dout, dstate)
    fus = run(layer, "fused", x, state, lengths, dout, dstate)
    assert rel(fus[0], ref[0]) < tol, "output"
    for a, b in zip(flat(fus[1]), flat(ref[1]), strict=True):
        assert rel(a, b) < tol, "final state"
    assert rel(fus[2], ref[2]) < tol, "dx"
    for a, b in zip(flat(fus[3]), flat(ref[3]), strict=True):
        assert rel(a, b) < tol, "d initial state"
    assert ref[4].keys() == fus[4].keys()
    for k in ref[4]:
        assert rel(fus[4][k], ref[4][k]) < tol, k


@pytest.fixture(params=["compiled", "panels", "blas", "python-loop", "batch-split"])
def path(request, monkeypatch):
    """Every kernel path: the compiled loop with hand-written products (as on a CPU without
    panels), the compiled loop with register-blocked products on packed weights (where the CPU has them), the
    compiled loop calling BLAS, the fallback loop in Python with np.matmul (no cblas
    symbol found), and the panel loop with the batch cut in slices run in two threads
    (any N ≥ 2 here)."""
    monkeypatch.setattr(policy, "SMALL_MACS", 1 << 40 if request.param == "compiled" else -1)
    if request.param in ("compiled", "blas", "python-loop"):
        monkeypatch.setattr(policy, "PANEL_PRODUCTS", False)
    if request.param == "python-loop":
        monkeypatch.setattr(loops, "gemm_function", lambda dtype: None)
    if request.param == "batch-split":
        monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 1)
        monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    return request.param


needs_panels = pytest.mark.skipif(not (gemm.HAS_PANELS and policy.PANEL_PRODUCTS),
                                  reason="no register-blocked products on this CPU (or BPTT_PANEL_PRODUCTS=0)")


@needs_panels
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_fused_equals_reference_whole_panels(mode, dtype, monkeypatch):
    """Layers wide enough that the step products fill whole panels (the random cases
    above are narrower than one), with lengths, both directions and a projection."""
    monkeypatch.setattr(policy, "SMALL_MACS", -1)
    rng = np.random.default_rng(zlib.crc32(f"panels {mode} {np.dtype(dtype).name}".encode()))
    H = gemm.panel_width(dtype) // 2 + 3
    case = random_case(rng, mode, dtype, 5, 9, 4, H, 2, True, H - 5 if mode == "lstm" else 0, True, True)
    assert_same(*case, TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_fused_equals_reference_random(mode, dtype, path):
    # zlib.crc32, not hash(): str hashes change from process to process, and so did these cases
    rng = np.random.default_rng(zlib.crc32(f"{mode} {np.dtype(dtype).name} {path}".encode()))
    for _ in range(4):
        T, N = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        D, H = int(rng.integers(1, 6)), int(rng.integers(2, 7))
        L, bidir = int(rng.integers(1, 3)), bool(rng.integers(2))
        proj = int(rng.integers(0, H)) if mode == "lstm" else 0
        case = random_case(rng, mode, dtype, T, N, D, H, L, bidir, proj,
                           with_lengths=bool(rng.integers(2)) and N > 1, with_state=bool(rng.integers(2)))
        assert_same(*case, TOL[dtype])


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_fused_equals_reference_all_features(mode, path):
    """Bidirectional, 2 layers, variable lengths, initial state, projection: all at once."""
    rng = np.random.default_rng(7)
    case = random_case(rng, mode, np.float64, 6, 4, 3, 5, 2, True, 3 if mode == "lstm" else 0, True, True)
    assert_same(*case, 1e-12)


def test_large_values_saturate_like_reference():
    """Pre-activations of ±50 (tanh/σ saturated) and exact zeros match too."""
    layer = bptt.LSTM(3, 4, dtype=np.float64, rng=0)
    x = np.array([[[50.0, -50.0, 0.0]], [[0.0, 0.0, 0.0]], [[-80.0, 80.0, 1e-8]]])
    dout = np.ones((3, 1, 4))
    assert_same(layer, x, None, None, dout, None, 1e-12)


def test_sequence_level_contract():
    """kernels.sequence_forward/backward against recurrence's, including b_hh passed separately."""
    rng = np.random.default_rng(3)
    for mode, g in (("rnn_tanh", 1), ("lstm", 4), ("gru", 3)):
        T, N, H = 5, 3, 4
        W = recurrence.Weights(rng.standard_normal((g * H, H)), rng.standard_normal(g * H))
        gx = rng.standard_normal((T, N, g * H))
        h0 = rng.standard_normal((N, H))
        c0 = rng.standard_normal((N, H)) if mode == "lstm" else None
        mask = np.arange(T)[:, None] < np.array([5, 2, 4])[None]
        for reverse in (False, True):
            r = recurrence.sequence_forward(mode, gx, h0, c0, W, mask, reverse)
            k = kernels.sequence_forward(mode, gx, h0, c0, W, mask, reverse)
            for a, b in zip(k[:3], r[:3], strict=True):
                if b is None:
                    assert a is None
                else:
                    assert rel(a, b) < 1e-12
            assert k[3].h_prev.shape == (T, N, H) and rel(k[3].h_prev, r[3].h_prev) < 1e-12
            dy = rng.standard_normal((T, N, H))
            rb = recurrence.sequence_backward(dy, None, None, r[3], W)
            kb = kernels.sequence_backward(dy, None, None, k[3], W)
            for a, b in zip(kb, rb, strict=True):
                if b is None:
                    assert a is None
                else:
                    assert rel(a, b) < 1e-12


def test_sequence_impl_contract():
    fw, bw = kernels.sequence_impl("lstm", np.float32)
    assert fw is kernels.sequence_forward and bw is kernels.sequence_backward
    assert kernels.sequence_impl("nope", np.float32) is None
    with pytest.raises(RuntimeError):
        kernels.sequence_impl("nope", np.float32, required=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_every_kernel_compiles(mode, dtype):
    """Where a kernel fails to compile a layer falls back to the reference loop, quietly (as without Numba), and
    every comparison with the reference would still pass: so compiling is checked on its own (required=True
    raises with Numba's error)."""
    assert kernels.sequence_impl(mode, dtype, required=True) is not None


def test_step_matches_forward():
    """RNNBase.step (the fast path) equals running forward one step at a time."""
    rng = np.random.default_rng(5)
    for cls, kw in ((bptt.LSTM, {}), (bptt.LSTM, {"proj_size": 2}), (bptt.GRU, {}), (bptt.RNN, {"nonlinearity": "relu"})):
        layer = cls(3, 4, 2, rng=1, dtype=np.float64, **kw)
        layer.eval()
        xs = rng.standard_normal((5, 2, 3))
        ref, _ = layer.forward(xs)
        layer.reset_state()
        got = np.stack([layer.step(x) for x in xs])
        assert rel(got, ref) < 1e-12
        layer.reset_state()
        got1 = np.stack([layer.step(x) for x in xs[:, 0]])  # unbatched (D,) input
        assert rel(got1, ref[:, 0]) < 1e-12


@pytest.mark.parametrize("H", [5, 6])
@pytest.mark.parametrize("schedule", ["wavefront", "batch-split", "one thread"])
def test_gru_weight_gradients_from_the_n_part_of_dgh(H, schedule, monkeypatch):
    """The fused GRU's backward keeps of dgh only its n-part (T, N, H); ∂L/∂W_hh and ∂L/∂b_hh take
    the r- and z-rows from dgx.  Under the wavefront the weight gradients come in two halves of
    gate rows, which cut through z (H = 5: rows 0-6 and 7-14, z is 5-9; H = 6: 0-8 and 9-17,
    z is 6-11): every schedule equals the reference loop, with lengths and an initial state."""
    monkeypatch.setattr(policy, "SMALL_MACS", -1)
    if schedule != "one thread":
        monkeypatch.setattr(blas, "blas_threads", lambda: 2)
        monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 1 << 62 if schedule == "wavefront" else 2)
        monkeypatch.setattr(policy, "SPLIT_MAX_MACS", 1 << 62)
    rng = np.random.default_rng(zlib.crc32(f"gru dgh {H} {schedule}".encode()))
    case = random_case(rng, "gru", np.float64, 7, 6, 3, H, 2, False, 0, True, True)
    layer, x, state, lengths = case[:4]
    layer(x, state, lengths=lengths)  # which schedule the forward takes
    ctx = layer._ctx
    assert (len(ctx.chunks) > 1 and ctx.threads == 2) if schedule == "wavefront" else \
        len(ctx.parts) == (2 if schedule == "batch-split" else 0)
    assert_same(*case, TOL[np.float64])


def test_fused_sequence_backward_returns_the_whole_gru_dgh():
    """kernels.sequence_backward gives the reference's (T, N, G) dgh, though its run keeps the n-part."""
    rng = np.random.default_rng(4)
    T, N, H = 5, 3, 4
    W = recurrence.Weights(rng.standard_normal((3 * H, H)), rng.standard_normal(3 * H), None)
    gx, h0, dy = rng.standard_normal((T, N, 3 * H)), rng.standard_normal((N, H)), rng.standard_normal((T, N, H))
    ref = recurrence.sequence_backward(dy, None, None, recurrence.sequence_forward("gru", gx, h0, None, W)[3], W)
    fus = kernels.sequence_backward(dy, None, None, kernels.sequence_forward("gru", gx, h0, None, W)[3], W)
    assert fus[1].shape == (T, N, 3 * H)
    for a, b in zip(fus[:3], ref[:3]):
        assert rel(a, b) < 1e-12


@needs_panels
def test_batch_slices_share_one_packing_of_the_backward_weights():
    """Two slices' forward runs sharing a Panels (as a layer's batch slices do) give caches whose
    backward runs pack W_hh once between them; a slice's gradients equal those on its own packing."""
    rng = np.random.default_rng(7)
    H, T, N = 24, 5, 3
    W = recurrence.Weights((rng.standard_normal((4 * H, H)) * 0.3).astype(np.float32), None, None)
    gxs = [rng.standard_normal((T, N, 4 * H)).astype(np.float32) for _ in range(2)]
    dy = rng.standard_normal((T, N, H)).astype(np.float32)

    def slice_backward(gx, panels):
        fw = loops.ForwardRun("lstm", np.zeros((N, H), np.float32), np.zeros((N, H), np.float32), W, gx.copy(),
                              panels=panels)
        fw.steps(0, T)
        bw = loops.BackwardRun(dy, None, None, fw.result()[3], W)
        bw.steps(0, T)
        return bw.panels, bw.result()[0]

    shared = gemm.Panels()
    (p1, dgx1), (p2, _) = slice_backward(gxs[0], shared), slice_backward(gxs[1], shared)
    own, dgx_own = slice_backward(gxs[0], None)
    assert p1 is p2 and p1.packed is not None and p1.packed[0] is p2.packed[0]  # packed once, for both
    assert own is not p1 and own.packed[0] is not p1.packed[0]
    assert np.array_equal(dgx1, dgx_own)
