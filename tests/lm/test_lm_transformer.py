"""The decoder-only Transformer language model: gradients, PyTorch parity, the key/value cache, config."""

import numpy as np
import pytest

from bptt.lm.transformer import TransformerLM, TransformerLMConfig
from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.nn.optim import Adam


def _small(dtype="float64", **kw):
    cfg = dict(vocab_size=7, layers=2, d_model=8, heads=2, context=6, dropout=0.0, dtype=dtype) | kw
    return TransformerLM(TransformerLMConfig(**cfg), rng=0)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_transformer_lm_gradcheck(dropout):
    lm = _small(dropout=dropout)
    for p in lm.params.values():  # larger weights than the 0.02 init, so every path matters
        p[...] = 0.3 * np.random.default_rng(3).standard_normal(p.shape)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 7, (5, 3)), rng.integers(0, 7, (5, 3))
    seed_state = lm.rng.bit_generator.state

    def forward_loss():  # the same dropout masks on every call
        lm.rng.bit_generator.state = seed_state
        return lm.loss(x, y)

    def loss():
        return forward_loss()[0]

    _, dlogits, _ = forward_loss()
    lm.zero_grad()
    lm.backward(dlogits)
    errors = gradcheck(loss, lm.params, lm.grads, eps=1e-5, tol=1e-7)
    assert max(errors.values()) < 1e-7
    assert np.all(lm.grads["pos.weight"][5] == 0)  # position 5 is beyond the window of 5


def test_transformer_lm_matches_torch(torch):
    """The PyTorch model named in the module docstring loads unchanged and agrees: loss and every gradient."""
    nn = torch.nn
    V, E, h, L, C, T, N = 9, 12, 3, 2, 8, 7, 2

    class TorchLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, E)
            self.pos = nn.Embedding(C, E)
            layer = nn.TransformerEncoderLayer(E, h, 4 * E, 0.0, "gelu", norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, L, norm=nn.LayerNorm(E), enable_nested_tensor=False)
            self.decoder = nn.Linear(E, V)

        def forward(self, x):
            T = x.shape[0]
            e = self.embed(x) + self.pos(torch.arange(T))[:, None]
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
            return self.decoder(self.encoder(e, mask=mask, is_causal=True))

    torch.manual_seed(0)
    tm = TorchLM().double()
    lm = TransformerLM(TransformerLMConfig(V, layers=L, d_model=E, heads=h, context=C, dtype="float64"))
    assert sorted(lm.state_dict()) == sorted(tm.state_dict())
    lm.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, V, (T, N)), rng.integers(0, V, (T, N))
    tl = nn.functional.cross_entropy(tm(torch.tensor(x)).reshape(-1, V), torch.tensor(y).reshape(-1))
    tl.backward()
    loss, dlogits, state = lm.loss(x, y)
    assert state is None
    lm.zero_grad()
    lm.backward(dlogits)
    assert abs(loss - tl.item()) < 1e-12
    for name, p in tm.named_parameters():
        assert rel_error(lm.grads[name], p.grad.numpy()) < 1e-10, name


def _numpy_step(monkeypatch):
    """Make TransformerLM.step run its NumPy reference instead of the compiled step."""
    from bptt import kernels

    monkeypatch.setattr(kernels, "lm_step", lambda *args: None)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_step_with_cache_equals_forward(dtype, tol, compiled, monkeypatch):
    """step(), compiled (kernels.lm_step, when Numba is there) and in NumPy, gives forward()'s logits."""
    if compiled:
        from conftest import require_numba

        require_numba()
    else:
        _numpy_step(monkeypatch)
    lm = _small(dtype=dtype, context=9, layers=3)
    for p in lm.params.values():
        p[...] = 0.3 * np.random.default_rng(4).standard_normal(p.shape)
    lm.eval()
    ids = np.random.default_rng(2).integers(0, 7, (9, 4))
    logits, _ = lm.forward(ids)
    for _ in range(2):  # and again after a reset
        lm.reset_state()
        stepped = np.stack([lm.step(ids[t]) for t in range(9)])
        assert stepped.dtype == np.dtype(dtype)
        assert rel_error(stepped, logits) < tol
    with pytest.raises(ValueError, match="exceed the context of 9"):
        lm.step(ids[0])
    lm.reset_state()
    assert rel_error(lm.step(ids[0, :1]), logits[0, :1]) < tol  # a new batch size starts a new cache


def test_float32_stays_float32(monkeypatch):
    """No silent float64 in a float32 model: every cached activation of the training pass, every
    gradient, and the attention scores of step() (a NumPy float64 scalar such as 1/np.sqrt(d) would
    turn a float32 array into float64)."""
    import bptt.lm.transformer as lm_module

    lm = _small(dtype="float32")
    ids = np.random.default_rng(5).integers(0, 7, (6, 3))
    loss, dlogits, _ = lm.loss(ids, ids)
    assert dlogits.dtype == np.float32
    cached = []
    for m in lm.modules():
        ctx = getattr(m, "_ctx", None)
        stack = [ctx]
        while stack:
            c = stack.pop()
            if isinstance(c, np.ndarray):
                cached.append(c)
            elif isinstance(c, (tuple, list)):
                stack.extend(c)
    assert len(cached) > 20 and all(c.dtype in (np.float32, np.bool_) or c.dtype.kind in "iu" for c in cached), \
        sorted({str(c.dtype) for c in cached})
    lm.backward(dlogits)
    assert all(g.dtype == np.float32 for g in lm.grads.values())
    seen = []
    real_softmax = lm_module.softmax
    monkeypatch.setattr(lm_module, "softmax", lambda s, axis=-1: seen.append(s.dtype) or real_softmax(s, axis))
    lm.eval()
    _numpy_step(monkeypatch)
    assert lm.step(ids[0]).dtype == np.float32
    assert seen and all(d == np.float32 for d in seen)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-13), ("float32", 2e-6)])
def test_compiled_step_equals_numpy_step(dtype, tol, monkeypatch):
    """The compiled generation step against its NumPy reference, position by position, three streams, 4 heads
    of 6; and after the weights change, a reset_state() makes the compiled step read the new ones."""
    from conftest import require_numba

    require_numba()
    from bptt import kernels

    lm = _small(dtype=dtype, context=12, layers=2, d_model=24, heads=4, vocab_size=11)
    for p in lm.params.values():
        p[...] = 0.3 * np.random.default_rng(8).standard_normal(p.shape)
    lm.eval()
    ids = np.random.default_rng(3).integers(0, 11, (12, 3))
    compiled = [lm.step(ids[t]) for t in range(12)]
    lm.reset_state()
    real = kernels.lm_step
    monkeypatch.setattr(kernels, "lm_step", lambda *args: None)
    reference = [lm.step(ids[t]) for t in range(12)]
    assert max(rel_error(a, b) for a, b in zip(compiled, reference)) < tol
    lm.params["encoder.layers.0.linear1.weight"][...] *= 1.5  # a changed model: the next reset reads it
    lm.reset_state()
    changed = lm.step(ids[0])  # NumPy, the live weights
    monkeypatch.setattr(kernels, "lm_step", real)
    lm.reset_state()
    assert rel_error(lm.step(ids[0]), changed) < tol and rel_error(changed, reference[0]) > 1e-3


def test_causality_and_window_limit():
    lm = _small()
    ids = np.random.default_rng(5).integers(0, 7, (6, 2))
    a, _ = lm(ids)
    ids2 = ids.copy()
    ids2[4:] = (ids2[4:] + 1) % 7
    b, _ = lm(ids2)
    np.testing.assert_array_equal(a[:4], b[:4])  # the future does not leak into the past
    assert not np.allclose(a[4:], b[4:])
    with pytest.raises(ValueError, match="exceeds the model's context of 6"):
        lm(np.zeros((7, 2), int))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 7\)"):
        lm(np.full((2, 2), 7))
    with pytest.raises(ValueError, match="integer ids"):
        lm(np.zeros((2, 2)))


def test_learns_a_repeating_sequence():
    """Forward, backward and an optimizer together lower the loss on a pattern it can memorise."""
    lm = _small(dtype="float32", context=8, d_model=16, heads=4)
    text = np.array([0, 1, 2, 3, 4, 5, 6] * 4)
    x = np.stack([text[i : i + 8] for i in range(4)], axis=1)  # (8, 4)
    y = np.stack([text[i + 1 : i + 9] for i in range(4)], axis=1)
    opt = Adam(lm, lr=1e-2)
    first = lm.loss(x, y)[0]
    for _ in range(60):
        loss, dlogits, _ = lm.loss(x, y)
        lm.zero_grad()
        lm.backward(dlogits)
        opt.step()
    assert first > 1.8 and loss < 0.1


def test_config_round_trip_and_errors():
    cfg = TransformerLMConfig(vocab_size=5, layers=1, d_model=6, heads=3, context=4)
    assert TransformerLMConfig.from_dict(cfg.to_dict() | {"unknown": 1}) == cfg
    assert cfg.to_dict()["model"] == "transformer"
    with pytest.raises(ValueError, match="divisible"):
        TransformerLMConfig(vocab_size=5, d_model=10, heads=3).validate()
    with pytest.raises(ValueError, match="context must be a positive integer"):
        TransformerLMConfig(vocab_size=5, context=0).validate()
    with pytest.raises(ValueError, match="dropout"):
        TransformerLMConfig(vocab_size=5, dropout=1.0).validate()
    with pytest.raises(ValueError, match="dtype"):
        TransformerLMConfig(vocab_size=5, dtype="float16").validate()
    lm = TransformerLM(cfg, rng=1)
    assert lm.blas_scope(4, 2).__enter__() is None
    assert lm.vocab_size == 5 and lm.dtype == np.float32
    assert abs(np.std(lm.params["embed.weight"]) - 0.02) < 0.01
    assert np.all(lm.params["encoder.layers.0.linear1.bias"] == 0)


def test_tiles_and_row_slices_change_no_number(monkeypatch):
    """With the attention in tiles (forced at this size), the model holds BLAS to one thread for its forward
    and backward and its layers run in row slices on two threads: the loss and every gradient are those
    of the plain path, in float64."""
    from conftest import require_numba

    from bptt.nn import attention_tiles
    from bptt.runtime import policy, threads

    require_numba()
    lm = _small(context=40, d_model=16, heads=4, layers=2, dropout=0.0)
    ids = np.random.default_rng(6).integers(0, 7, (40, 5))

    def run():
        lm.zero_grad()
        loss, dlogits, _ = lm.loss(ids, np.roll(ids, 1, axis=0))
        lm.backward(dlogits)
        return loss, {k: v.copy() for k, v in lm.grads.items()}

    monkeypatch.setattr(policy, "ATTENTION_TILES_MIN_BYTES", 1 << 62)
    plain_loss, plain = run()
    assert not lm._one_blas_thread
    monkeypatch.setattr(policy, "ATTENTION_TILES_MIN_BYTES", 0)
    monkeypatch.setattr(policy, "MIN_MACS_PER_THREAD", 1)
    monkeypatch.setattr(policy, "MIN_ROWS_PER_THREAD", 8)
    monkeypatch.setattr(attention_tiles, "_MIN_BLOCK_ROWS", 10)
    monkeypatch.setattr(threads, "OUTER_THREADS", [2])
    tiled_loss, tiled = run()
    assert lm._one_blas_thread
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-13)
    for k in plain:
        assert rel_error(tiled[k], plain[k]) < 1e-12, k
