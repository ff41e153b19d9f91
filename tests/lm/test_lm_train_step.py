"""CharLM.train_step: the whole model step in batch slices, one thread each (bptt.lm.model), and the
pieces it stands on: Module.replica (bptt.nn.module) and threads.cores_each (bptt.runtime.threads)."""

import numpy as np
import pytest

from conftest import require_numba

import bptt
from bptt.lm.model import CharLM, CharLMConfig
from bptt.runtime import policy
from bptt.runtime import threads as blas

require_numba()


def flat(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.fixture
def two_cores(monkeypatch):
    """Two cores for bptt's schedulers and slices from 4 rows, whatever this machine has."""
    monkeypatch.setattr(blas, "blas_threads", lambda: blas.OUTER_THREADS[-1] if blas.OUTER_THREADS else 2)
    monkeypatch.setattr(policy, "SPLIT_MIN_ROWS", 4)
    monkeypatch.setattr(policy, "SMALL_MACS", -1)
    monkeypatch.setattr(policy, "MODEL_SPLIT_MIN_MACS", 0)


@pytest.mark.parametrize("kw", [dict(model="lstm"), dict(model="gru"), dict(model="rnn", embedding=6),
                                dict(model="lstm", embedding=12, tie_weights=True)])
def test_train_step_in_slices_equals_the_whole_batch(kw, two_cores):
    """Loss, every gradient and the carried state of two steps in slices (the second from the first's
    state) equal loss() + backward() on the whole batch, up to the order of the sums."""
    cfg = CharLMConfig(vocab_size=9, hidden=12, layers=2, dtype="float64", **kw)
    sliced, whole = CharLM(cfg, rng=0), CharLM(cfg, rng=0)
    rng = np.random.default_rng(1)
    state = None
    for _ in range(2):
        x, y = rng.integers(0, 9, (5, 10)), rng.integers(0, 9, (5, 10))
        assert len(sliced._model_slices(x, y)) == 2
        loss, got_state = sliced.train_step(x, y, state)
        want, dlogits, want_state = whole.loss(x, y, state)
        whole.backward(dlogits)
        assert loss == pytest.approx(want, rel=1e-13)
        for a, b in zip(flat(got_state), flat(want_state), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        state = want_state
    for name, g in whole.grads.items():
        assert np.abs(g).max() > 0, name
        np.testing.assert_allclose(sliced.grads[name], g, rtol=1e-11, atol=1e-14, err_msg=name)
    rep = sliced._step_replicas[0]
    assert any(g.any() for g in rep.grads.values())  # the last step's slice, already added to the model's
    rep.grads["rnn.weight_hh_l0"][...] = 1e9  # what a step that raised half-way would leave behind
    sliced.zero_grad()
    whole.zero_grad()
    loss, _ = sliced.train_step(x, y, state)
    _, dlogits, _ = whole.loss(x, y, state)
    whole.backward(dlogits)
    np.testing.assert_allclose(sliced.grads["rnn.weight_hh_l0"], whole.grads["rnn.weight_hh_l0"], rtol=1e-11,
                               atol=1e-14)  # replicas start every step from zero


def test_train_step_with_dropout_runs_the_whole_batch(two_cores):
    """Dropout masks are drawn for the whole batch in one order: such a step is not sliced, and it
    equals loss() + backward() with the same draws."""
    cfg = CharLMConfig(vocab_size=9, hidden=12, layers=2, dropout=0.3, dtype="float64")
    a, b = CharLM(cfg, rng=0), CharLM(cfg, rng=0)
    x, y = np.random.default_rng(2).integers(0, 9, (5, 10)), np.random.default_rng(3).integers(0, 9, (5, 10))
    assert a._model_slices(x, y) == [slice(0, 10)]
    loss, _ = a.train_step(x, y)
    want, dlogits, _ = b.loss(x, y)
    b.backward(dlogits)
    assert loss == want
    for name, g in b.grads.items():
        np.testing.assert_array_equal(a.grads[name], g)


def test_replica_shares_weights_and_keeps_its_own_gradients():
    cfg = CharLMConfig(vocab_size=7, hidden=8, layers=1, embedding=8, tie_weights=True)
    lm = CharLM(cfg, rng=0)
    rep = lm.replica()
    for (name, p, g), (_, p_rep, g_rep) in zip(lm.named_parameters(), rep.named_parameters(), strict=True):
        assert p_rep is p and g_rep is not g, name
    assert rep.decoder.embed is rep.embed and rep.embed is not lm.embed  # the tied decoder follows the copy
    x = np.random.default_rng(0).integers(0, 7, (4, 3))
    _, d, _ = rep.loss(x, x)
    rep.backward(d)
    assert rep.grads["embed.weight"].any() and not lm.grads["embed.weight"].any()
    lm.params["decoder.bias"][...] += 1.0  # a weight changed in place is the replica's too
    assert np.array_equal(rep.params["decoder.bias"], lm.params["decoder.bias"])


def test_cores_each_keeps_a_layer_from_slicing_again(monkeypatch):
    monkeypatch.setattr(blas, "blas_threads", lambda: blas.OUTER_THREADS[-1] if blas.OUTER_THREADS else 2)
    layer = bptt.LSTM(4, 64, 2)
    assert len(layer.batch_slices(50)) == 2
    with blas.cores_each(1):
        assert blas.blas_threads() == 1 and blas.inside_single_thread_blas()
        assert layer.batch_slices(50) == [slice(0, 50)]
        assert policy.time_chunks(50, 10**9, 2, False, True)[1] == 1  # nor a wavefront
    assert len(layer.batch_slices(50)) == 2


@pytest.mark.parametrize("kw", [dict(model="lstm"), dict(model="gru", embedding=12, tie_weights=True)])
def test_nll_in_slices_equals_the_whole_batch_and_forgets_frozen_weights(kw, two_cores):
    """In eval mode nll runs the model in slices too: the same sum and state as one thread, with a
    mask; a replica made inside a frozen_weights() block drops that block's packed weights with it."""
    cfg = CharLMConfig(vocab_size=9, hidden=12, layers=2, dtype="float64", **kw)
    lm = CharLM(cfg, rng=0).eval()
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 9, (5, 10)), rng.integers(0, 9, (5, 10))
    mask = rng.random((5, 10)) < 0.8
    assert len(lm._model_slices(x, y)) == 2
    with lm.frozen_weights():
        got, got_state = lm.nll(x, y, mask=mask)
        rep = lm._step_replicas[0]
        assert rep.rnn.frozen_cache is lm.rnn.frozen_cache and rep.rnn.frozen_cache  # packed once, shared
    assert rep.rnn.frozen_cache is not None  # until the replicas are next used
    want, want_state = lm._nll(x, y, None, mask)
    assert got == pytest.approx(want, rel=1e-13)
    for a, b in zip(flat(got_state), flat(want_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    for name, p, _ in lm.named_parameters():  # new weights after the block: the replica must not use old ones
        p *= 0.5
    again, _ = lm.nll(x, y, mask=mask)
    assert rep.rnn.frozen_cache is None
    assert again == pytest.approx(lm._nll(x, y, None, mask)[0], rel=1e-13)


def test_short_windows_keep_the_layers_own_slices(monkeypatch):
    """Below policy.MODEL_SPLIT_MIN_MACS of one layer's step products over the window the model step
    runs whole (the layer may still slice the batch itself)."""
    monkeypatch.setattr(blas, "blas_threads", lambda: blas.OUTER_THREADS[-1] if blas.OUTER_THREADS else 2)
    lm = CharLM(CharLMConfig(vocab_size=65, hidden=128, layers=2), rng=0)
    per_step = 50 * 4 * 128 * 128
    long, short = (np.zeros((policy.MODEL_SPLIT_MIN_MACS // per_step + d, 50), np.int64) for d in (1, -1))
    assert lm._model_slices(long, long) == [slice(0, 25), slice(25, 50)]
    assert lm._model_slices(short, short) == [slice(0, 50)]
    assert len(lm.rnn.batch_slices(50)) == 2


def test_bad_shapes_get_the_whole_batchs_errors(two_cores):
    """train_step and nll check their input as loss() does: one-dimensional ids, and targets or a mask
    wider than the ids (which slices of the ids' columns would silently cut), are clear errors."""
    lm = CharLM(CharLMConfig(vocab_size=9, hidden=12, layers=2), rng=0)
    x = np.zeros((5, 10), np.int64)
    assert len(lm._model_slices(x, x)) == 2
    with pytest.raises(ValueError, match=r"targets shape \(5, 11\) does not match"):
        lm.train_step(x, np.zeros((5, 11), np.int64))
    with pytest.raises(ValueError, match="CharLM expects integer ids of shape"):
        lm.train_step(x[:, 0], x[:, 0])
    lm.eval()
    with pytest.raises(ValueError, match="targets must be integer ids of shape"):
        lm.nll(x, np.zeros((5, 11), np.int64))
    with pytest.raises(ValueError, match="mask must have the targets' shape"):
        lm.nll(x, x, mask=np.ones((5, 11), bool))
