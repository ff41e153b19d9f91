"""The wavefront schedule (bptt.runtime.wavefront) and what runs on it: the layers' chunked
forward and backward, and one-hot input given by index.

Pipelined results must equal the layer-by-layer ones: the same arithmetic, only
the order of independent chunks changes (products over chunks instead of the
whole sequence may round differently, so float64 and a 1e-12 tolerance).
"""

import threading

import numpy as np
import pytest

from conftest import require_numba

import bptt
from bptt.nn import batch_slices
from bptt.nn.ops import scatter_add_rows
from bptt.runtime import policy
from bptt.runtime import threads as blas
from bptt.runtime.wavefront import run_wavefront

require_numba()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


# ---------------------------------------------------------------------------- the scheduler
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_wavefront_respects_dependencies(threads):
    L, C = 4, 6
    log, lock = [], threading.Lock()

    def task(k, j):
        with lock:
            log.append(("task", k, j))

    def finish(k):
        with lock:
            log.append(("finish", k, None))

    run_wavefront(L, C, task, threads, finish)
    tasks = [(k, j) for kind, k, j in log if kind == "task"]
    assert sorted(tasks) == [(k, j) for k in range(L) for j in range(C)]
    pos = {e: i for i, e in enumerate(log)}
    for k in range(L):
        for j in range(C):
            if k:
                assert pos[("task", k - 1, j)] < pos[("task", k, j)]
            if j:
                assert pos[("task", k, j - 1)] < pos[("task", k, j)]
        assert pos[("task", k, C - 1)] < pos[("finish", k, None)]


@pytest.mark.parametrize("threads", [1, 2])
def test_tail_jobs_run_once_after_their_layer(threads):
    """finish(k) may return jobs: each runs exactly once, after layer k's last chunk,
    and the run ends only when all have (any thread may take them)."""
    L, C = 3, 4
    log, lock = [], threading.Lock()

    def task(k, j):
        with lock:
            log.append(("task", k, j))

    def finish(k):
        def job(n):
            with lock:
                log.append(("job", k, n))
        return [lambda n=n: job(n) for n in range(3)]

    run_wavefront(L, C, task, threads, finish)
    jobs = [e for e in log if e[0] == "job"]
    assert sorted(jobs) == [("job", k, n) for k in range(L) for n in range(3)]
    pos = {e: i for i, e in enumerate(log)}
    for k in range(L):
        assert all(pos[("task", k, C - 1)] < pos[("job", k, n)] for n in range(3))


def test_tail_job_errors_are_reraised():
    def finish(k):
        def boom():
            raise RuntimeError(f"job of layer {k}")
        return [boom] if k == 1 else []

    with pytest.raises(RuntimeError, match="job of layer 1"):
        run_wavefront(2, 3, lambda k, j: None, threads=2, finish=finish)


def test_wavefront_overlaps_layers():
    """With threads, layer 1 starts before layer 0 has finished (else there is no pipeline)."""
    started_1 = threading.Event()

    def task(k, j):
        if k == 1 and j == 0:
            started_1.set()
        if k == 0 and j == 2:  # layer 0 waits here until layer 1 has begun its first chunk
            assert started_1.wait(timeout=10)

    run_wavefront(2, 3, task, threads=2)
    assert started_1.is_set()


def test_wavefront_reraises_and_stops():
    ran = []

    def task(k, j):
        ran.append((k, j))
        if (k, j) == (1, 1):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_wavefront(3, 5, task, threads=2)
    assert (1, 2) not in ran and (2, 1) not in ran  # nothing that depends on the failed chunk


# ---------------------------------------------------------------------------- pipelined layers
def layer_run(layer, x, state, lengths, dout, dstate, threads, monkeypatch, one_hot=False):
    monkeypatch.setattr(blas, "blas_threads", lambda: threads)
    layer.rng = np.random.default_rng(11)  # the same dropout masks in both runs
    layer.zero_grad()
    out, st = layer.forward(x, state, lengths=lengths, one_hot=one_hot)
    chunks = len(layer._ctx.chunks)
    dx, dst = layer.backward(dout, dstate)
    return out, st, dx, dst, {k: v.copy() for k, v in layer.grads.items()}, chunks


def flat(s):
    return list(s) if isinstance(s, tuple) else [s]


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("L", [2, 3])
def test_pipelined_equals_layer_by_layer(mode, L, monkeypatch):
    """Dropout between layers, variable lengths, initial states, gradients of states and input."""
    rng = np.random.default_rng(L)
    T, N, D = 13, 8, 5
    H = {"lstm": 48, "gru": 48, "rnn_tanh": 100}[mode]  # N·G·P above the compiled-loop threshold: the BLAS path
    if mode == "lstm":
        layer = bptt.LSTM(D, H, L, dropout=0.3, proj_size=40, dtype=np.float64, rng=1)
    elif mode == "gru":
        layer = bptt.GRU(D, H, L, dropout=0.3, dtype=np.float64, rng=1)
    else:
        layer = bptt.RNN(D, H, L, dropout=0.3, dtype=np.float64, rng=1)
    P = layer.out_size
    x = rng.standard_normal((T, N, D))
    lengths = np.array([13, 4, 9, 13, 1, 7, 13, 2])
    h0 = rng.standard_normal((L, N, P))
    state = (h0, rng.standard_normal((L, N, H))) if mode == "lstm" else h0
    dout = rng.standard_normal((T, N, P))
    dh = rng.standard_normal((L, N, P))
    dstate = (dh, rng.standard_normal((L, N, H))) if mode == "lstm" else dh
    ref = layer_run(layer, x, state, lengths, dout, dstate, 1, monkeypatch)
    got = layer_run(layer, x, state, lengths, dout, dstate, 2, monkeypatch)
    assert ref[5] == 1 and got[5] == 8, "the second run must actually be pipelined"
    assert rel(got[0], ref[0]) < 1e-12
    for a, b in zip(flat(got[1]) + flat(got[3]), flat(ref[1]) + flat(ref[3]), strict=True):
        assert rel(a, b) < 1e-12
    assert rel(got[2], ref[2]) < 1e-12
    for k in ref[4]:
        assert rel(got[4][k], ref[4][k]) < 1e-12, k


def test_bidirectional_and_small_stay_layer_by_layer(monkeypatch):
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    bi = bptt.LSTM(3, 24, 2, bidirectional=True, rng=0)
    bi(np.zeros((5, 6, 3), np.float32))
    assert len(bi._ctx.chunks) == 1
    tiny = bptt.LSTM(3, 4, 2, rng=0)  # compiled-loop size: a chunk handover would cost more than a step
    tiny(np.zeros((5, 2, 3), np.float32))
    assert len(tiny._ctx.chunks) == 1


@pytest.mark.parametrize("schedule", ["wavefront", "batch-split"])
def test_pipelined_matches_torch(torch, monkeypatch, schedule):
    """The pipelined path, and the batch cut in slices run in threads, against PyTorch
    directly (float32 at training-like sizes)."""
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    if schedule == "wavefront":
        monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 1 << 62)
    ours = bptt.LSTM(20, 48, 2, rng=0)
    theirs = torch.nn.LSTM(20, 48, 2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(ours.params[name]))
    x = np.random.default_rng(0).standard_normal((30, 16, 20)).astype(np.float32)
    out, _ = ours(x)
    if schedule == "wavefront":
        assert len(ours._ctx.chunks) == 8
    else:
        assert [s for s, _ in ours._ctx.parts] == [slice(0, 8), slice(8, 16)]
    xt = torch.from_numpy(x).requires_grad_()
    out_t, _ = theirs(xt)
    assert rel(out, out_t.detach().numpy()) < 1e-5
    dout = np.ones_like(out)
    ours.zero_grad()
    dx, _ = ours.backward(dout)
    out_t.backward(torch.from_numpy(dout))
    assert rel(dx, xt.grad.numpy()) < 1e-5
    for name, p in theirs.named_parameters():
        assert rel(ours.grads[name], p.grad.numpy()) < 1e-4, name


@pytest.mark.parametrize("cls, bidirectional", [(bptt.LSTM, True), (bptt.GRU, False), (bptt.RNN, False)])
def test_batch_slices_read_x_and_write_dx_in_place(monkeypatch, cls, bidirectional):
    """A batch slice reads x[:, s] and writes dx[:, s] as views of the whole batch's arrays, a few
    steps at a time (batch_slices.PIECE_ROWS, here 3 steps of 8 rows): the same outputs, input
    gradient and weight gradients as the layer run whole (float64)."""
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    monkeypatch.setattr(batch_slices, "PIECE_ROWS", 24)
    layer = cls(20, 64, 2, bidirectional=bidirectional, dtype=np.float64, rng=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((31, 16, 20))
    dout = rng.standard_normal((31, 16, 64 * (1 + bidirectional)))
    runs = []
    for split in (True, False):
        if not split:
            monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 1 << 62)
        out, _ = layer(x)
        assert len(layer._ctx.parts) == (2 if split else 0)
        layer.zero_grad()
        dx, _ = layer.backward(dout)
        runs.append((out, dx, {k: g.copy() for k, g in layer.grads.items()}))
    (out_a, dx_a, g_a), (out_b, dx_b, g_b) = runs
    assert dx_a.flags.c_contiguous and dx_a.shape == x.shape
    assert rel(out_a, out_b) < 1e-13 and rel(dx_a, dx_b) < 1e-13
    for k in g_b:
        assert rel(g_a[k], g_b[k]) < 1e-12, k


# ---------------------------------------------------------------------------- one-hot input by index
@pytest.mark.parametrize("batch_first", [False, True])
def test_one_hot_indices_equal_one_hot_vectors(batch_first):
    rng = np.random.default_rng(0)
    V, T, N = 7, 6, 3
    layer = bptt.GRU(V, 5, 2, batch_first=batch_first, dtype=np.float64, rng=2)
    ids = rng.integers(0, V, (N, T) if batch_first else (T, N))
    onehot = np.eye(V)[ids]
    out_a, h_a = layer(onehot)
    dout = rng.standard_normal(out_a.shape)
    layer.zero_grad()
    layer.backward(dout)
    grads_a = {k: v.copy() for k, v in layer.grads.items()}
    out_b, h_b = layer(ids, one_hot=True)
    layer.zero_grad()
    dx, _ = layer.backward(dout)
    assert dx is None  # indices have no gradient
    assert rel(out_b, out_a) < 1e-13 and rel(h_b, h_a) < 1e-13
    for k in grads_a:
        assert rel(layer.grads[k], grads_a[k]) < 1e-13, k


def test_one_hot_unbatched_and_repeated_ids():
    layer = bptt.LSTM(4, 3, dtype=np.float64, rng=0)
    ids = np.array([2, 2, 0, 3, 2])
    out_a, _ = layer(np.eye(4)[ids])
    out_b, _ = layer(ids, one_hot=True)
    assert out_b.shape == (5, 3) and rel(out_b, out_a) < 1e-13


@pytest.mark.parametrize("bad, message", [
    (np.array([[0.5, 1.0]]), "integer indices"),
    (np.array([[0, 4]]), r"in \[0, 4\)"),
    (np.array([[-1, 0]]), r"in \[0, 4\)"),
    (np.zeros((2, 2, 2), int), "shape"),
])
def test_one_hot_bad_indices(bad, message):
    with pytest.raises(ValueError, match=message):
        bptt.RNN(4, 3)(bad, one_hot=True)


def test_scatter_add_rows_equals_add_at():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, 200)  # many repeats
    rows = rng.standard_normal((200, 7)).astype(np.float32)
    want = np.zeros((5, 7), np.float32)
    np.add.at(want, ids, rows)
    got = np.zeros((5, 7), np.float32)
    scatter_add_rows(got, ids, rows)
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize("L", [2, 3])
def test_pipelined_one_hot_equals_layer_by_layer(L, monkeypatch):
    """With one-hot input the lower layer's thread makes the products that connect it to the
    layer above (forward and backward); the numbers must not change."""
    rng = np.random.default_rng(L)
    V, T, N = 11, 17, 8
    layer = bptt.LSTM(V, 40, L, dropout=0.25, dtype=np.float64, rng=3)
    ids = rng.integers(0, V, (T, N))
    dout = rng.standard_normal((T, N, 40))
    ref = layer_run(layer, ids, None, None, dout, None, 1, monkeypatch, one_hot=True)
    got = layer_run(layer, ids, None, None, dout, None, 2, monkeypatch, one_hot=True)
    assert ref[5] == 1 and got[5] == 8
    assert ref[2] is None and got[2] is None
    assert rel(got[0], ref[0]) < 1e-12
    for a, b in zip(flat(got[1]) + flat(got[3]), flat(ref[1]) + flat(ref[3]), strict=True):
        assert rel(a, b) < 1e-12
    for k in ref[4]:
        assert rel(got[4][k], ref[4][k]) < 1e-12, k


def test_backward_consumes_the_forward():
    """The backward frees the forward's buffers (dgx is written over the gates), so a second
    backward without a new forward is an error, as in PyTorch."""
    layer = bptt.LSTM(3, 4, 2, rng=0)
    out, _ = layer(np.ones((5, 2, 3), np.float32))
    layer.backward(np.ones_like(out))
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        layer.backward(np.ones_like(out))
