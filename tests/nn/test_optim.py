"""Optimizers against torch.optim, state-dict resume, clipping, schedules, factories."""

import json
import math

import numpy as np
import pytest

from conftest import require_numba

from bptt.nn.gradcheck import rel_error
from bptt.nn.module import Module
from bptt.nn.optim import (
    SGD,
    Adagrad,
    Adam,
    AdamW,
    CharRNNDecay,
    ConstantLR,
    CosineLR,
    RMSprop,
    StepLR,
    clip_grad_norm,
    clip_grad_value,
    make_optimizer,
    make_schedule,
)

SHAPES = {"weight_ih_l0": (4, 3), "weight_hh_l0": (4, 4), "bias": (4,)}

# (name, bptt kwargs); torch gets the same kwargs (AdamW/Adam take betas as a tuple either way)
CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    ("adagrad", dict(lr=0.1)),
    ("adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.02, initial_accumulator_value=0.1, eps=1e-8)),
    ("rmsprop", dict(lr=0.01)),
    ("rmsprop", dict(lr=0.01, alpha=0.9, momentum=0.7, weight_decay=0.01)),
    ("rmsprop", dict(lr=0.01, centered=True)),
    ("rmsprop", dict(lr=0.002, alpha=0.95, eps=1e-6, momentum=0.5, centered=True, weight_decay=0.1)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    ("adam", dict(lr=0.01, amsgrad=True)),
    ("adamw", dict(lr=0.01)),
    ("adamw", dict(lr=0.01, betas=(0.85, 0.995), weight_decay=0.1, amsgrad=True)),
]
TORCH_NAMES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW"}


def _triples(rng, dtype):
    return [(n, rng.standard_normal(s).astype(dtype), np.zeros(s, dtype)) for n, s in SHAPES.items()]


def _grad_sequence(rng, steps, dtype):
    return [{n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()} for _ in range(steps)]


def _run_bptt(opt, triples, grads):
    for gs in grads:
        for name, _, g in triples:
            g[...] = gs[name]
        opt.step()


def _run_torch(torch, name, kw, triples, grads):
    tparams = [torch.tensor(p.copy(), requires_grad=True) for _, p, _ in triples]
    opt = getattr(torch.optim, TORCH_NAMES[name])(tparams, foreach=False, **kw)
    for gs in grads:
        for (n, _, _), tp in zip(triples, tparams, strict=True):
            tp.grad = torch.from_numpy(gs[n].copy())
        opt.step()
    return [tp.detach().numpy() for tp in tparams]


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_torch(torch, rng, name, kw, dtype, tol):
    triples = _triples(rng, dtype)
    grads = _grad_sequence(rng, 7, dtype)
    expected = _run_torch(torch, name, kw, triples, grads)
    opt = make_optimizer(name, triples, **kw)
    _run_bptt(opt, triples, grads)
    assert opt.step_count == 7
    for (n, p, _), e in zip(triples, expected, strict=True):
        assert p.dtype == dtype
        assert rel_error(p, e) < tol, (n, rel_error(p, e))


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-14), (np.float32, 1e-6)])
@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] in ("rmsprop", "adam", "adamw") and not c[1].get("centered")])
def test_compiled_step_equals_numpy_formulas(rng, monkeypatch, name, kw, dtype, tol):
    """RMSprop (not centered: that stays NumPy) and Adam/AdamW update in one compiled pass (bptt.kernels); with
    the kernels refusing, the same optimizer runs its NumPy formulas: the same parameters
    and buffers after 7 steps, up to rounding."""
    require_numba()
    from bptt import kernels

    grads = _grad_sequence(rng, 7, dtype)
    start = _triples(rng, dtype)
    runs, taken = [], []
    for compiled in (True, False):
        for fn in ("rmsprop_step", "adam_step"):
            real = getattr(kernels, fn)
            monkeypatch.setattr(kernels, fn, (lambda *a, real=real: taken.append(real(*a)) or taken[-1])
                                if compiled else (lambda *a: False))
        triples = [(n, p.copy(), g.copy()) for n, p, g in start]
        opt = make_optimizer(name, triples, **kw)
        _run_bptt(opt, triples, grads)
        runs.append(([p for _, p, _ in triples], opt.state))
    assert taken == [True] * 7 * len(SHAPES)  # every update of the first run was compiled
    (p1, s1), (p2, s2) = runs
    for a, b in zip(p1, p2, strict=True):
        assert a.dtype == dtype and rel_error(a, b) < tol
    for buf in s1:
        for n in s1[buf]:
            assert rel_error(s1[buf][n], s2[buf][n]) < tol, (buf, n)


def test_lr_change_between_steps_matches_torch(torch, rng):
    """A schedule sets opt.lr before each step; torch's equivalent is param_groups[0]['lr']."""
    triples = _triples(rng, np.float64)
    grads = _grad_sequence(rng, 6, np.float64)
    sched = CosineLR(0.01, total_steps=6, warmup_steps=2)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for _, p, _ in triples]
    topt = torch.optim.Adam(tparams, lr=0.01, foreach=False)
    opt = Adam(triples, lr=0.01)
    for t, gs in enumerate(grads):
        opt.lr = topt.param_groups[0]["lr"] = sched(t)
        for (n, _, g), tp in zip(triples, tparams, strict=True):
            g[...] = gs[n]
            tp.grad = torch.from_numpy(gs[n].copy())
        opt.step()
        topt.step()
    for (_, p, _), tp in zip(triples, tparams, strict=True):
        assert rel_error(p, tp.detach().numpy()) < 1e-12


def test_grad_not_modified_and_in_place(rng):
    triples = _triples(rng, np.float64)
    ids = [id(p) for _, p, _ in triples]
    grads = _grad_sequence(rng, 1, np.float64)[0]
    for n, _, g in triples:
        g[...] = grads[n]
    opt = SGD(triples, lr=0.1, momentum=0.9, weight_decay=0.5)
    opt.step()
    for n, p, g in triples:
        np.testing.assert_array_equal(g, grads[n])
    assert [id(p) for _, p, _ in triples] == ids
    opt.zero_grad()
    assert all(not g.any() for _, _, g in triples)


class _Tiny(Module):
    def __init__(self, rng):
        super().__init__()
        self.add_param("weight", rng.standard_normal((3, 2)))
        child = Module()
        child.add_param("bias", rng.standard_normal(3))
        self.add_module("head", child)


def test_accepts_module(rng):
    m = _Tiny(rng)
    opt = SGD(m, lr=0.5)
    assert opt.param_names == ["weight", "head.bias"]
    before = m.state_dict()  # copies (m.params holds the live arrays)
    for g in m.grads.values():
        g.fill(1.0)
    opt.step()
    for n, p in m.params.items():
        np.testing.assert_allclose(p, before[n] - 0.5)


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_state_dict_resume_is_exact(rng, name, kw):
    grads = _grad_sequence(rng, 6, np.float64)
    start = _triples(rng, np.float64)

    full = [(n, p.copy(), g.copy()) for n, p, g in start]
    opt = make_optimizer(name, full, **kw)
    _run_bptt(opt, full, grads)

    first = [(n, p.copy(), g.copy()) for n, p, g in start]
    opt1 = make_optimizer(name, first, **kw)
    _run_bptt(opt1, first, grads[:3])
    arrays, meta = opt1.state_dict()
    meta = json.loads(json.dumps(meta))  # must survive JSON
    if name != "sgd" or kw.get("momentum"):
        assert any(k.endswith(".weight_ih_l0") for k in arrays)

    # a fresh optimizer with a different lr: load_state_dict restores lr as well
    second = [(n, p.copy(), g.copy()) for n, p, g in first]
    opt2 = make_optimizer(name, second, **{**kw, "lr": 123.0})
    opt2.load_state_dict(arrays, meta)
    assert opt2.step_count == 3 and opt2.lr == kw["lr"]
    _run_bptt(opt2, second, grads[3:])
    for (_, a, _), (_, b, _) in zip(full, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_state_dict_keys_and_copies(rng):
    triples = _triples(rng, np.float32)
    opt = Adam(triples, lr=0.1, amsgrad=True)
    arrays, meta = opt.state_dict()
    assert set(arrays) == {f"{b}.{n}" for b in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") for n in SHAPES}
    assert meta == {
        "type": "Adam",
        "step": 0,
        "hyperparameters": {"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": True},
    }
    arrays["exp_avg.bias"][...] = 7.0  # copies, not live state
    assert not opt.state["exp_avg"]["bias"].any()


def test_load_state_dict_errors(rng):
    triples = _triples(rng, np.float64)
    opt = Adam(triples, lr=0.1)
    arrays, meta = opt.state_dict()

    bad = dict(arrays)
    del bad["exp_avg.bias"]
    bad["exp_avg.nonexistent"] = np.zeros(2)
    bad["exp_avg_sq.weight_ih_l0"] = np.zeros((3, 4))
    with pytest.raises(ValueError) as exc:
        opt.load_state_dict(bad, meta)
    msg = str(exc.value)
    assert "exp_avg.bias" in msg and "exp_avg.nonexistent" in msg and "exp_avg_sq.weight_ih_l0" in msg

    with pytest.raises(ValueError, match="float32"):
        opt.load_state_dict({**arrays, "exp_avg.bias": np.zeros(4, np.float32)}, meta)
    with pytest.raises(ValueError, match="AdamW"):
        opt.load_state_dict(arrays, {**meta, "type": "AdamW"})
    with pytest.raises(ValueError, match="missing hyperparameters: .*betas"):
        opt.load_state_dict(arrays, {**meta, "hyperparameters": {"lr": 0.1}})


def test_invalid_hyperparameters(rng):
    triples = _triples(rng, np.float64)
    with pytest.raises(ValueError):
        SGD(triples, lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(triples, lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        Adam(triples, lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="duplicate"):
        SGD(triples + triples[:1], lr=0.1)
    with pytest.raises(ValueError, match="does not match"):
        SGD([("w", np.zeros(3), np.zeros(4))], lr=0.1)
    with pytest.raises(TypeError):
        SGD({"w": np.zeros(3)}, lr=0.1)


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(torch, rng, max_norm):
    grads = [rng.standard_normal(s) for s in SHAPES.values()]
    tgrads = [torch.tensor(g.copy(), requires_grad=True) for g in grads]
    for t in tgrads:
        t.grad = t.detach().clone()
    tnorm = torch.nn.utils.clip_grad_norm_(tgrads, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    assert abs(norm - tnorm.item()) <= 1e-12 * norm
    for g, t in zip(grads, tgrads, strict=True):
        assert rel_error(g, t.grad.numpy()) < 1e-12
    if max_norm < norm:
        total = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        assert total == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_module_and_nonfinite(rng):
    m = _Tiny(rng)
    for g in m.grads.values():
        g.fill(3.0)
    norm = clip_grad_norm(m, 1.0)
    assert norm == pytest.approx(math.sqrt(9 * 9))
    np.testing.assert_allclose(m.grads["weight"], 3.0 / (9.0 + 1e-6))
    g = np.array([1.0, np.inf])
    assert clip_grad_norm([g], 1.0) == math.inf
    np.testing.assert_array_equal(g, [1.0, np.inf])


def test_clip_grad_norm_float32_and_longer_than_a_chunk(rng):
    # the squares are summed in float64 in chunks of 2^20 elements: an array of 2.5 chunks, float32,
    # gives the norm computed in float64 over the whole array at once
    g = (rng.standard_normal(2_621_440) * 1e-3).astype(np.float32)
    expected = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    before = g.copy()
    norm = clip_grad_norm([g], 1e-3)
    assert norm == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(g, before * np.float32(1e-3 / (expected + 1e-6)), rtol=1e-6)
    assert g.dtype == np.float32


def test_clip_grad_value(rng):
    m = _Tiny(rng)
    m.grads["weight"][...] = [[-3.0, 0.5], [2.0, -0.1], [0.0, 1.5]]
    m.grads["head.bias"][...] = [5.0, -5.0, 0.2]
    clip_grad_value(m, 1.0)
    np.testing.assert_array_equal(m.grads["weight"], [[-1.0, 0.5], [1.0, -0.1], [0.0, 1.0]])
    np.testing.assert_array_equal(m.grads["head.bias"], [1.0, -1.0, 0.2])
    g = np.array([0.3, -0.7], np.float32)
    clip_grad_value([g], 0.5)
    assert g.dtype == np.float32 and g.tolist() == [np.float32(0.3), -0.5]
    with pytest.raises(ValueError):
        clip_grad_value([g], -1.0)


# ------------------------------------------------------------------ schedules
def test_constant_and_step():
    c = ConstantLR(0.1)
    assert c(0) == c(10_000) == 0.1
    s = StepLR(1.0, step_size=3, gamma=0.5)
    assert [s(t) for t in range(8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_charrnn_decay():
    s = CharRNNDecay(2e-3, steps_per_epoch=100, decay_after_epochs=10, decay_rate=0.97)
    assert s(0) == s(999) == 2e-3  # epochs 1..10 run at the base rate
    assert s(1000) == s(1099) == pytest.approx(2e-3 * 0.97)  # decayed at the end of epoch 10
    assert s(1100) == pytest.approx(2e-3 * 0.97**2)
    assert s(2550) == pytest.approx(2e-3 * 0.97**16)
    s0 = CharRNNDecay(1.0, steps_per_epoch=10, decay_after_epochs=0, decay_rate=0.5)
    assert [s0(t) for t in (0, 9, 10, 19, 20)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_cosine():
    s = CosineLR(1.0, total_steps=12, warmup_steps=4, min_lr=0.1)
    assert [s(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0
    assert s(8) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 8 cosine steps
    assert s(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(12) == s(100) == pytest.approx(0.1)
    plain = CosineLR(2.0, total_steps=10)
    assert plain(0) == 2.0 and plain(5) == pytest.approx(1.0) and plain(10) == 0.0


def test_schedule_config_roundtrip():
    for s in (ConstantLR(0.3), StepLR(0.1, 5, 0.5), CharRNNDecay(2e-3, 50), CosineLR(1e-3, 100, 10, 1e-5)):
        cfg = json.loads(json.dumps(s.config()))
        again = make_schedule(**cfg)
        assert type(again) is type(s)
        assert [again(t) for t in (0, 7, 60, 700)] == [s(t) for t in (0, 7, 60, 700)]


def test_factories_reject_bad_names(rng):
    with pytest.raises(ValueError, match="adam, adamw"):
        make_optimizer("lbfgs", _triples(rng, np.float64), lr=0.1)
    with pytest.raises(ValueError, match="constant, step, charrnn, cosine"):
        make_schedule("exponential", lr=0.1)
    assert isinstance(make_optimizer("AdamW", _triples(rng, np.float64), lr=0.1), AdamW)
    assert isinstance(make_optimizer("rmsprop", _triples(rng, np.float64), lr=0.1), RMSprop)
    assert isinstance(make_optimizer("adagrad", _triples(rng, np.float64), lr=0.1), Adagrad)
