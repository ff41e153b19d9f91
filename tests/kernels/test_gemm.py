"""The step products (bptt.kernels.gemm): BLAS callable from compiled code, and the
register-blocked panel products against a float64 product."""

import zlib

import numpy as np
import pytest

from conftest import require_numba

require_numba()

from bptt.kernels import gemm  # noqa: E402
from bptt.runtime import policy  # noqa: E402


def test_blas_is_callable_from_compiled_code():
    """NumPy's BLAS was found for both dtypes (else every large layer takes the slower Python loop)."""
    assert gemm.gemm_function(np.float32) is not None
    assert gemm.gemm_function(np.float64) is not None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("way", ["hand loops", "blas"])
def test_times_equals_matmul(dtype, way):
    """``times``, the one product the loops call, by hand loops (no gemm) and by BLAS."""
    rng = np.random.default_rng(zlib.crc32(f"{way} {np.dtype(dtype).name}".encode()))
    fn = gemm.gemm_function(dtype) if way == "blas" else None
    for M, K, n in ((1, 1, 1), (3, 7, 5), (25, 40, 96)):
        A, B = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, n)).astype(dtype)
        out = np.full((M, n), np.nan, dtype)
        none = np.empty((0, 0, 0), dtype)
        gemm.times(fn, dtype(1), dtype(0), A, B, none, none.reshape(0, 0), out)
        want = A.astype(np.float64) @ B.astype(np.float64)
        scale = np.abs(A).astype(np.float64) @ np.abs(B).astype(np.float64)
        assert np.all(np.abs(out - want) <= 4 * K * np.finfo(dtype).eps * scale), (M, K, n)


needs_panels = pytest.mark.skipif(not gemm.HAS_PANELS, reason="no register-blocked products on this CPU")


@needs_panels
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_panel_products_equal_matmul(dtype):
    """``panel_times`` against a float64 product: whole and partial panels (n not a
    multiple of the panel width), 1 to 13 rows (every block height), rows of A and of
    the output farther apart than their length, and the per-step shapes it is for."""
    rng = np.random.default_rng(zlib.crc32(np.dtype(dtype).name.encode()))
    PW = gemm.panel_width(dtype)
    shapes = [(25, 128, 512), (50, 512, 128), (1, 1, 1), (6, 3, PW), (7, 5, PW + 1), (13, 64, 2 * PW - 3)]
    shapes += [(int(rng.integers(1, 14)), int(rng.integers(1, 200)), int(rng.integers(1, 300))) for _ in range(20)]
    for M, K, n in shapes:
        A = rng.standard_normal((M, K + 3)).astype(dtype)[:, :K]  # rows K + 3 apart
        B = rng.standard_normal((K, n)).astype(dtype)
        out = np.full((M, n + 5), np.nan, dtype)
        gemm.panel_times(A, gemm.pack_panels(B), out[:, :n], np.empty((6, PW), dtype))
        want = A.astype(np.float64) @ B.astype(np.float64)
        scale = np.abs(A).astype(np.float64) @ np.abs(B).astype(np.float64)  # the size of the rounding
        assert np.all(np.abs(out[:, :n] - want) <= 4 * K * np.finfo(dtype).eps * scale), (M, K, n)
        assert np.isnan(out[:, n:]).all(), "wrote past the output's columns"


@needs_panels
def test_panels_follow_the_policy(monkeypatch):
    """A run packs its weights for the panels only where policy allows: not for hand-loop
    sizes, not with PANEL_PRODUCTS off, not for long products on several BLAS threads."""
    from bptt.runtime import threads

    W = np.ones((8, 32), np.float32)
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    assert gemm.Panels().get(True, 10, (W, None)) is None  # hand loops
    assert gemm.Panels().get(False, policy.ONE_THREAD_MACS, (W, None)) is None  # BLAS's threads
    packed, proj, tmp = gemm.Panels().get(False, policy.ONE_THREAD_MACS - 1, (W, None))
    assert packed.shape == (-(-32 // gemm.panel_width(np.float32)), 8, gemm.panel_width(np.float32))
    assert proj.size == 0 and tmp.shape == (6, gemm.panel_width(np.float32))
    monkeypatch.setattr(policy, "PANEL_PRODUCTS", False)
    assert gemm.Panels().get(False, 10, (W, None)) is None
