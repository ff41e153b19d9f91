"""Losses against torch (loss and autograd gradient) and against centred differences."""

import numpy as np
import pytest

from conftest import require_numba

from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.nn.losses import cross_entropy, log_softmax, mse, softmax


def _torch_ce(torch, logits, targets, ignore_index=-100, reduction="mean"):
    """torch's loss and dL/dlogits; class axis moved from last to 1 as torch wants."""
    z = torch.tensor(logits, requires_grad=True)
    zt = z if z.ndim <= 2 else z.movedim(-1, 1)
    loss = torch.nn.functional.cross_entropy(
        zt, torch.from_numpy(targets.astype(np.int64)), ignore_index=ignore_index, reduction=reduction
    )
    loss.backward()
    return loss.item(), z.grad.numpy()


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 7), (2, 3, 2, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_ignore", [False, True])
def test_cross_entropy_matches_torch(torch, rng, shape, reduction, with_ignore):
    V = shape[-1]
    logits = rng.standard_normal(shape) * 3
    targets = rng.integers(0, V, size=shape[:-1])
    if with_ignore:
        targets.reshape(-1)[::3] = -1
    ignore_index = -1 if with_ignore else -100
    loss, grad = cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    tloss, tgrad = _torch_ce(torch, logits, targets, ignore_index, reduction)
    assert isinstance(loss, float)
    assert abs(loss - tloss) <= 1e-12 * abs(tloss)
    assert grad.shape == logits.shape and grad.dtype == np.float64
    assert rel_error(grad, tgrad) < 1e-12
    if with_ignore:
        assert not grad.reshape(-1, V)[::3].any()


def test_cross_entropy_float32(torch, rng):
    logits = rng.standard_normal((4, 5, 9)).astype(np.float32)
    targets = rng.integers(0, 9, size=(4, 5))
    loss, grad = cross_entropy(logits, targets)
    assert grad.dtype == np.float32
    tloss, tgrad = _torch_ce(torch, logits, targets)
    assert loss == pytest.approx(tloss, rel=1e-6)
    assert rel_error(grad, tgrad) < 1e-5


def test_bool_mask_equals_ignore_index(rng):
    logits = rng.standard_normal((3, 4, 6))
    targets = rng.integers(0, 6, size=(3, 4))
    mask = rng.random((3, 4)) < 0.6
    padded = np.where(mask, targets, -100)
    for reduction in ("mean", "sum"):
        a = cross_entropy(logits, targets, mask=mask, reduction=reduction)
        b = cross_entropy(logits, padded, reduction=reduction)
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])
        # a float mask of 0/1 is the same thing
        c = cross_entropy(logits, targets, mask=mask.astype(np.float64), reduction=reduction)
        assert c[0] == pytest.approx(a[0], rel=1e-15)
        np.testing.assert_allclose(c[1], a[1], rtol=1e-15, atol=0)


def test_mask_weights_by_hand(rng):
    logits = rng.standard_normal((2, 3, 4))
    targets = np.array([[0, 3, 1], [2, 2, -100]])
    w = np.array([[1.0, 0.5, 0.0], [2.0, 0.25, 3.0]])  # [0,2] weight 0; [1,2] ignored
    logp = log_softmax(logits)
    counted = [(0, 0), (0, 1), (1, 0), (1, 1)]
    W = sum(w[i] for i in counted)
    expected = -sum(w[i] * logp[i][targets[i]] for i in counted) / W
    egrad = np.zeros_like(logits)
    for i in counted:
        egrad[i] = w[i] * (np.exp(logp[i]) - np.eye(4)[targets[i]]) / W
    loss, grad = cross_entropy(logits, targets, mask=w)
    assert loss == pytest.approx(expected, rel=1e-14)
    np.testing.assert_allclose(grad, egrad, rtol=1e-13, atol=1e-16)
    loss_sum, grad_sum = cross_entropy(logits, targets, mask=w, reduction="sum")
    assert loss_sum == pytest.approx(expected * W, rel=1e-14)
    np.testing.assert_allclose(grad_sum, egrad * W, rtol=1e-13, atol=1e-16)


def test_masked_positions_may_hold_any_target(rng):
    logits = rng.standard_normal((2, 5))
    loss, grad = cross_entropy(logits, np.array([1, 99]), mask=np.array([True, False]))
    assert loss == pytest.approx(-log_softmax(logits[0])[1], rel=1e-14)
    assert not grad[1].any()


def test_nothing_counted_gives_zero(rng):
    logits = rng.standard_normal((3, 4))
    loss, grad = cross_entropy(logits, np.full(3, -100))
    assert loss == 0.0 and grad.shape == (3, 4) and not grad.any()
    loss, grad = cross_entropy(logits, np.zeros(3, int), mask=np.zeros(3))
    assert loss == 0.0 and not grad.any()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradcheck(rng, reduction):
    logits = rng.standard_normal((3, 4, 5))
    targets = rng.integers(0, 5, size=(3, 4))
    targets[1, 2] = -100
    w = rng.random((3, 4)) + 0.1
    w[0, 0] = 0.0
    _, grad = cross_entropy(logits, targets, mask=w, reduction=reduction)
    gradcheck(
        lambda: cross_entropy(logits, targets, mask=w, reduction=reduction)[0],
        {"logits": logits},
        {"logits": grad},
        tol=1e-7,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_gradcheck_and_torch(torch, rng, reduction):
    pred = rng.standard_normal((3, 4, 2))
    target = rng.standard_normal((3, 4, 2))
    loss, grad = mse(pred, target, reduction=reduction)
    gradcheck(lambda: mse(pred, target, reduction=reduction)[0], {"pred": pred}, {"pred": grad}, tol=1e-7)
    tp = torch.tensor(pred, requires_grad=True)
    tl = torch.nn.functional.mse_loss(tp, torch.from_numpy(target), reduction=reduction)
    tl.backward()
    assert abs(loss - tl.item()) <= 1e-12 * tl.item()
    assert rel_error(grad, tp.grad.numpy()) < 1e-12


def test_mse_by_hand_and_float32():
    loss, grad = mse(np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.0, 1.0]))
    assert loss == pytest.approx((0 + 4 + 9) / 3)
    np.testing.assert_allclose(grad, [0.0, 4.0 / 3, 2.0])
    loss32, grad32 = mse(np.ones((2, 2), np.float32), np.zeros((2, 2)))
    assert loss32 == 1.0 and grad32.dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        mse(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        mse(np.zeros(3), np.zeros(3), reduction="none")


def test_softmax_stable():
    z = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    p = softmax(z)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0)
    np.testing.assert_allclose(p[1], 1 / 3)
    np.testing.assert_allclose(log_softmax(z), np.log(p), rtol=1e-12)
    np.testing.assert_allclose(softmax(z.T, axis=0), p.T)
    assert softmax(z.astype(np.float32)).dtype == np.float32


def test_cross_entropy_errors(rng):
    logits = rng.standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match=r"target 4 at position \(1, 2\) is out of range \[0, 4\)"):
        cross_entropy(logits, np.array([[0, 1, 2], [3, 0, 4]]))
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy(logits, np.array([[0, -1, 2], [3, 0, 1]]))
    with pytest.raises(ValueError, match="targets shape"):
        cross_entropy(logits, np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(logits, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        cross_entropy(logits, np.zeros((2, 3), int), mask=np.ones(6, bool))
    with pytest.raises(ValueError, match="non-negative"):
        cross_entropy(logits, np.zeros((2, 3), int), mask=-np.ones((2, 3)))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, np.zeros((2, 3), int), reduction="none")
    with pytest.raises(ValueError, match="float32 or float64"):
        cross_entropy(logits.astype(int), np.zeros((2, 3), int))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compiled_cross_entropy_equals_numpy_path(rng, dtype, reduction):
    """Without a mask the loss comes from the compiled pass (bptt.kernels); weights of 1
    take the NumPy formulas.  Same loss and gradient up to rounding; need_grad=False
    gives the same loss and no gradient."""
    require_numba()
    logits = (4 * rng.standard_normal((7, 11, 65))).astype(dtype)
    logits[0, 0, 3] = 60.0  # a dominant logit: the max shift must keep exp() finite
    targets = rng.integers(0, 65, size=(7, 11))
    loss, grad = cross_entropy(logits, targets, reduction=reduction)
    ref_loss, ref_grad = cross_entropy(logits, targets, mask=np.ones((7, 11)), reduction=reduction)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert grad.dtype == dtype and rel_error(grad, ref_grad) < 10 * tol
    only, none = cross_entropy(logits, targets, reduction=reduction, need_grad=False)
    assert none is None and only == loss


def test_compiled_cross_entropy_nan_logit_gives_nan(rng):
    """A NaN anywhere in a row (first or later, where the max might skip it) makes the loss NaN,
    so training's NaN check still fires."""
    for j in (0, 5):
        logits = rng.standard_normal((3, 9)).astype(np.float32)
        logits[1, j] = np.nan
        assert np.isnan(cross_entropy(logits, rng.integers(0, 9, size=3))[0])
