"""Scheduling policy (bptt.runtime.policy): the thresholds decide the schedule, and the
batch cut in slices run in threads gives the whole batch's numbers."""

import numpy as np
import pytest
from conftest import require_numba

import bptt
from bptt.runtime import policy
from bptt.runtime import threads as blas


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def flat(s):
    return list(s) if isinstance(s, tuple) else [s]


def test_batch_parts_follow_the_thresholds(monkeypatch):
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    big = policy.SMALL_MACS + 1
    assert policy.batch_parts(50, big, True, fused=True) == [slice(0, 25), slice(25, 50)]
    assert policy.batch_parts(50, big, True, fused=False) == [slice(0, 50)]  # the reference loop never splits
    assert policy.batch_parts(50, policy.SMALL_MACS, True, fused=True) == [slice(0, 50)]  # compiled-loop sizes
    few = 2 * policy.SPLIT_MIN_ROWS - 1
    assert policy.batch_parts(few, big, True, fused=True) == [slice(0, few)]
    assert policy.batch_parts(50, policy.SPLIT_MAX_MACS, True, fused=True) == [slice(0, 50)]  # training: wavefront
    assert len(policy.batch_parts(50, policy.SPLIT_MAX_MACS, False, fused=True)) == 2  # eval: split at any size
    monkeypatch.setattr(policy, "SPLIT_MAX_MACS", big + 1)  # a bound (BPTT_SPLIT_MAX_MACS): training below it splits
    assert len(policy.batch_parts(50, big, True, fused=True)) == 2
    assert policy.batch_parts(50, big + 1, True, fused=True) == [slice(0, 50)]
    monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 30)
    assert policy.batch_parts(50, big, True, fused=True) == [slice(0, 50)]
    monkeypatch.setattr(blas, "blas_threads", lambda: 1)
    monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 1)
    assert policy.batch_parts(50, big, True, fused=True) == [slice(0, 50)]  # one core


def test_time_chunks_follow_the_thresholds(monkeypatch):
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    big = policy.SMALL_MACS + 1
    chunks, n = policy.time_chunks(50, big, 2, False, fused=True)
    assert n == 2 and len(chunks) == policy.WAVEFRONT_CHUNKS and chunks[0][0] == 0 and chunks[-1][1] == 50
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert policy.time_chunks(5, big, 2, False, fused=True)[0] == [(i, i + 1) for i in range(5)]
    for args in ((50, big, 1, False, True), (50, big, 2, True, True), (1, big, 2, False, True),
                 (50, policy.SMALL_MACS, 2, False, True), (50, big, 2, False, False)):
        assert policy.time_chunks(*args) == ([(0, 50 if args[0] == 50 else args[0])], 1), args
    monkeypatch.setattr(blas, "blas_threads", lambda: 1)
    assert policy.time_chunks(50, big, 2, False, fused=True) == ([(0, 50)], 1)


def test_step_blas_limit(monkeypatch):
    """Below ONE_THREAD_MACS a step's BLAS runs on one thread (where BLAS has more); above, untouched,
    and untouched for steps that call no BLAS (the hand loops)."""
    import contextlib

    assert isinstance(policy.step_blas_limit(policy.ONE_THREAD_MACS), contextlib.nullcontext)
    assert isinstance(policy.step_blas_limit(1, blas=False), contextlib.nullcontext)
    assert isinstance(policy.sampling_blas_limit(policy.STEP_THREADS_BYTES, 1), contextlib.nullcontext)
    with policy.step_blas_limit(1):
        assert blas.blas_controllers() is None or all(
            c.num_threads == 1 for c in blas.blas_controllers().lib_controllers)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_batch_split_equals_whole_batch(mode, monkeypatch):
    """A batch cut in slices run in threads (policy.batch_parts) gives the whole batch's
    numbers: same dropout masks, outputs, states, input and parameter gradients."""
    require_numba()
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    monkeypatch.setattr(policy, "SMALL_MACS", -1)  # the BLAS loop, as at the sizes that split
    rng = np.random.default_rng(11)
    T, N, D, H = 7, 19, 5, 6  # an odd N: slices of 10 and 9 rows
    x = rng.standard_normal((T, N, D))
    lengths = rng.integers(1, T + 1, N)
    dout = rng.standard_normal((T, N, H))
    results = []
    for min_rows in (8, 1 << 62):  # split in two, then not at all
        monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", min_rows)
        cls = {"rnn_tanh": bptt.RNN, "lstm": bptt.LSTM, "gru": bptt.GRU}[mode]
        layer = cls(D, H, 2, dropout=0.4, dtype=np.float64, rng=3)
        layer.backend = "fused"
        out, state = layer(x, lengths=lengths)
        parts = [s for s, _ in layer._ctx.parts]
        dx, dstate = layer.backward(dout)
        arrays = [out, *flat(state), dx, *flat(dstate), *(layer.grads[k].copy() for k in sorted(layer.grads))]
        results.append((parts, arrays))
    (parts, split), (whole_parts, whole) = results
    assert parts == [slice(0, 10), slice(10, 19)] and whole_parts == []
    assert len(split) == len(whole)
    for a, b in zip(split, whole, strict=True):
        assert rel(a, b) < 1e-12


def test_eval_mode_splits_above_the_training_bound(monkeypatch):
    """Products above policy.SPLIT_MAX_MACS split the batch in eval mode only (no second
    set of weight gradients to pay for), with the whole batch's numbers; a backward after
    an eval-mode split (with need_backward=True) still gives the whole batch's gradients."""
    require_numba()
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    monkeypatch.setattr(policy, "SMALL_MACS", -1)
    monkeypatch.setattr(policy, "SPLIT_MAX_MACS", 1)  # every product counts as large
    rng = np.random.default_rng(5)
    T, N, D, H = 6, 16, 4, 5
    x, dout = rng.standard_normal((T, N, D)), rng.standard_normal((T, N, H))
    results = {}
    for training in (True, False):
        layer = bptt.LSTM(D, H, 2, dtype=np.float64, rng=2).train(training)
        layer.backend = "fused"
        out, state = layer(x, need_backward=True)  # eval mode keeps nothing for a backward unless asked
        parts = [s for s, _ in layer._ctx.parts]
        dx, dstate = layer.backward(dout)
        results[training] = parts, [out, *flat(state), dx, *flat(dstate), *(layer.grads[k] for k in sorted(layer.grads))]
    assert results[True][0] == [] and results[False][0] == [slice(0, 8), slice(8, 16)]
    for a, b in zip(results[False][1], results[True][1], strict=True):
        assert rel(a, b) < 1e-12


def test_every_cell_trains_in_slices_at_every_size_unless_bounded(monkeypatch):
    """In training, the LSTM, the GRU and the RNN run a batch in slices however large a step's product
    (RNN 1×1024 at N = 64: 67 M multiply-adds); a bound (BPTT_SPLIT_MAX_MACS) restores the wavefront above it."""
    monkeypatch.setattr(blas, "blas_threads", lambda: 2)
    N, H = 64, 1024
    layers = {cls.__name__: cls(8, H, 1) for cls in (bptt.LSTM, bptt.GRU, bptt.RNN)}
    for layer in layers.values():
        assert layer._batch_parts(N, fused=True) == [slice(0, 32), slice(32, 64)]
    monkeypatch.setattr(policy, "SPLIT_MAX_MACS", 12_000_000)
    for layer in layers.values():
        assert layer._batch_parts(N, fused=True) == [slice(0, N)]
    for layer in layers.values():  # eval mode splits every one of them
        assert len(layer.eval()._batch_parts(N, fused=True)) == 2


def test_inference_chunks(monkeypatch):
    """Windows of at most INFER_WINDOW_BYTES, cut evenly, covering [0, T) in order; a sequence that fits
    in two windows is not cut."""
    monkeypatch.setattr(policy, "INFER_WINDOW_BYTES", 1000)
    assert policy.inference_chunks(20, 100) == [(0, 20)]  # 2,000 bytes: two windows' worth, one chunk
    for T, step in ((21, 100), (50, 300), (7, 5000)):
        chunks = policy.inference_chunks(T, step)
        assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == T
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(chunks, chunks[1:]))
        assert all(max(1, 1000 // step) >= t1 - t0 >= 1 for t0, t1 in chunks), (T, step, chunks)
        lengths = [t1 - t0 for t0, t1 in chunks]
        assert max(lengths) - min(lengths) <= 1
