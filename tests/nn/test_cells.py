"""Cells against torch.nn.RNNCell/LSTMCell/GRUCell, and float64 gradient checks."""

import numpy as np
import pytest

import bptt
from bptt.nn.gradcheck import gradcheck, rel_error

CELLS = {"rnn": bptt.RNNCell, "lstm": bptt.LSTMCell, "gru": bptt.GRUCell}


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_parity_with_torch(torch, kind, batched, bias):
    rng = np.random.default_rng(0)
    base = kind.split("_")[0]
    kw = {"nonlinearity": kind[4:]} if base == "rnn" else {}
    tcell = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[base](4, 5, bias=bias, **kw).double()
    cell = CELLS[base](4, 5, bias=bias, dtype=np.float64, **kw)
    cell.load_state_dict(tcell.state_dict())
    shape = (3, 4) if batched else (4,)
    sshape = (3, 5) if batched else (5,)
    x, h, c = rng.standard_normal(shape), rng.standard_normal(sshape), rng.standard_normal(sshape)
    xt, ht, ct = (torch.tensor(a, requires_grad=True) for a in (x, h, c))
    dh, dc = rng.standard_normal(sshape), rng.standard_normal(sshape)
    if base == "lstm":
        th, tc = tcell(xt, (ht, ct))
        ((th * torch.tensor(dh)).sum() + (tc * torch.tensor(dc)).sum()).backward()
        h1, c1 = cell(x, (h, c))
        dx, (dh0, dc0) = cell.backward(dh, dc)
        assert rel_error(c1, tc.detach().numpy()) < 1e-12
        assert rel_error(dc0, ct.grad.numpy()) < 1e-12
    else:
        th = tcell(xt, ht)
        (th * torch.tensor(dh)).sum().backward()
        h1 = cell(x, h)
        dx, dh0 = cell.backward(dh)
    assert h1.shape == sshape and dx.shape == shape
    assert rel_error(h1, th.detach().numpy()) < 1e-12
    assert rel_error(dx, xt.grad.numpy()) < 1e-12
    assert rel_error(dh0, ht.grad.numpy()) < 1e-12
    for name, p in tcell.named_parameters():
        assert rel_error(cell.grads[name], p.grad.numpy()) < 1e-12, name


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_cell_gradcheck(kind):
    rng = np.random.default_rng(1)
    cell = CELLS[kind](3, 4, dtype=np.float64, rng=0)
    x, h, c = rng.standard_normal((2, 3)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    dh, dc = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))

    def loss():
        if kind == "lstm":
            h1, c1 = cell(x, (h, c))
            return float(np.sum(h1 * dh) + np.sum(c1 * dc))
        return float(np.sum(cell(x, h) * dh))

    loss()
    cell.zero_grad()
    if kind == "lstm":
        dx, (dh0, dc0) = cell.backward(dh, dc)
        analytic = dict(cell.grads, x=dx, h=dh0, c=dc0)
        wrt = dict(cell.params, x=x, h=h, c=c)
    else:
        dx, dh0 = cell.backward(dh)
        analytic = dict(cell.grads, x=dx, h=dh0)
        wrt = dict(cell.params, x=x, h=h)
    assert max(gradcheck(loss, wrt, analytic, tol=1e-8).values()) < 1e-8


def test_cell_step_keeps_state_until_reset():
    cell = bptt.GRUCell(2, 3, dtype=np.float64, rng=0)
    x = np.random.default_rng(2).standard_normal((4, 2))
    h = None
    for t in range(4):
        h = cell(x[t], h)
        assert np.allclose(cell.step(x[t]), h)
    cell.reset_state()
    assert np.allclose(cell.step(x[0]), cell(x[0]))


def test_linear_and_embedding_gradcheck():
    rng = np.random.default_rng(3)
    lin = bptt.Linear(3, 4, dtype=np.float64, rng=0)
    emb = bptt.Embedding(5, 3, dtype=np.float64, rng=0)
    ids = np.array([[0, 4, 4], [2, 0, 1]])  # repeated ids must accumulate
    dy = rng.standard_normal((2, 3, 4))

    def loss():
        return float(np.sum(lin(emb(ids)) * dy))

    loss()
    lin.zero_grad()
    emb.zero_grad()
    dx = lin.backward(dy)
    assert emb.backward(dx) is None
    wrt = {"lin." + k: v for k, v in lin.params.items()} | {"emb." + k: v for k, v in emb.params.items()}
    analytic = {"lin." + k: v for k, v in lin.grads.items()} | {"emb." + k: v for k, v in emb.grads.items()}
    assert max(gradcheck(loss, wrt, analytic, tol=1e-8).values()) < 1e-8


def test_linear_matches_torch(torch):
    tl = torch.nn.Linear(3, 2).double()
    bl = bptt.Linear(3, 2, dtype=np.float64)
    bl.load_state_dict(tl.state_dict())
    x = np.random.default_rng(4).standard_normal((5, 3))
    assert rel_error(bl(x), tl(torch.tensor(x)).detach().numpy()) < 1e-13


def test_dropout_train_and_eval():
    d = bptt.Dropout(0.25, rng=0)
    x = np.ones((400, 50))
    y = d(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01 and np.allclose(y[kept], 1 / 0.75)
    np.testing.assert_array_equal(d.backward(np.ones_like(x)), y)
    d.eval()
    assert d(x) is x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compiled", [True, False])
def test_dropout_mask_values_rate_and_stream(dtype, compiled, monkeypatch):
    """Masks hold exactly 0 and 1/(1 − p) (rounded as the dtype), keep 1 − p of the entries, and are the
    generator's draws u ≥ p in order (float32 masks from float32 draws): the compiled pass and NumPy's agree."""
    from bptt import kernels
    from bptt.nn.ops import dropout_mask

    if not compiled:
        monkeypatch.setattr(kernels, "keep_scaled", lambda u, p, scale: False)
        monkeypatch.setattr(kernels, "keep_scaled_draws", lambda gen, p, scale, out: False)
    p, shape = 0.3, (300, 70)
    m = dropout_mask(shape, p, np.random.default_rng(11), dtype)
    u = np.random.default_rng(11).random(shape, dtype=dtype)
    scale = dtype(1.0) / dtype(1.0 - p)
    assert m.dtype == dtype and m.shape == shape
    np.testing.assert_array_equal(m, np.where(u >= p, scale, dtype(0)))
    assert set(np.unique(m)) == {dtype(0), scale}
    assert abs((m != 0).mean() - 0.7) < 0.01
    assert (dropout_mask((3, 4), 1.0, np.random.default_rng(0), dtype) == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_mask_from_raw_bits_is_numpys_stream(dtype):
    """kernels.keep_scaled_draws: the mask of gen.random() then keep_scaled, from PCG64's raw output, and the
    generator left as NumPy's own draws leave it: odd and even sizes, a float32 half-word waiting in the state
    at the start (and after), other draws in between."""
    from conftest import require_numba

    require_numba()  # the compiled path is the one under test; NumPy's draws are the reference
    from bptt import kernels

    ours, theirs = np.random.default_rng(3), np.random.default_rng(3)
    for g in (ours, theirs):
        g.random(3, dtype=np.float32)  # three halves drawn: one left waiting
    scale = dtype(1) / dtype(0.7)
    for n in (5, 6, 7, 1, 0, 3, 2, 1001, 1000):
        got, want = np.empty(n, dtype), np.empty(n, dtype)
        assert kernels.keep_scaled_draws(ours, 0.3, scale, got)
        theirs.random(out=want, dtype=dtype)
        want = np.where(want >= dtype(0.3), scale, dtype(0))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ours.random(1, dtype=np.float32), theirs.random(1, dtype=np.float32))
    np.testing.assert_array_equal(ours.random(4), theirs.random(4))
    assert not kernels.keep_scaled_draws(np.random.Generator(np.random.MT19937(0)), 0.3, scale, np.empty(4, dtype))


def test_dropout_mask_in_blocks_is_the_same_on_any_number_of_threads(monkeypatch):
    """A mask of more than DROPOUT_BLOCK numbers: each block from a generator seeded from rng, drawn side by
    side where bptt runs threads: the same numbers on one thread and on two, blocks that differ, the rate."""
    from bptt.nn import ops
    from bptt.runtime import policy, threads

    monkeypatch.setattr(ops, "DROPOUT_BLOCK", 1000)
    shape, p = (300, 70), 0.4  # 21 blocks, the last one full
    one = ops.dropout_mask(shape, p, np.random.default_rng(5), np.float32)
    monkeypatch.setattr(threads, "OUTER_THREADS", [2])  # as inside single_thread_blas on two cores
    monkeypatch.setattr(policy, "MIN_MACS_PER_THREAD", 1)  # a block of 2^20 is worth a thread; here of 1000
    assert len(policy.row_slices(21, 1000 * policy.ELEMENT_MACS)) == 2
    two = ops.dropout_mask(shape, p, np.random.default_rng(5), np.float32)
    np.testing.assert_array_equal(one, two)
    flat = one.reshape(-1)
    assert not (flat[:1000] == flat[1000:2000]).all()
    assert set(np.unique(one)) == {np.float32(0), np.float32(1) / np.float32(0.6)}
    assert abs((one != 0).mean() - 0.6) < 0.01
    assert not (ops.dropout_mask(shape, p, np.random.default_rng(6), np.float32) == one).all()


def test_embedding_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        bptt.Embedding(5, 2)(np.array([1, 5]))
