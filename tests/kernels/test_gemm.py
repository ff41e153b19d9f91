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
@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_panel_products_equal_matmul(dtype, tall):
    """``panel_times`` against a float64 product, in wide and in tall blocks: whole and partial
    panels (n not a multiple of the panel width), 1 to 40 rows (every block height, and blocks
    of uneven heights), rows of A and of the output farther apart than their length, and the
    per-step shapes it is for."""
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype).name} {tall}".encode()))
    PW = gemm.panel_width(dtype, tall)
    shapes = [(25, 128, 512), (50, 512, 128), (1, 1, 1), (6, 3, PW), (7, 5, PW + 1), (13, 64, 2 * PW - 3)]
    shapes += [(r, 17, 2 * PW + 5) for r in range(1, 28)]
    shapes += [(int(rng.integers(1, 41)), int(rng.integers(1, 200)), int(rng.integers(1, 300))) for _ in range(20)]
    for M, K, n in shapes:
        A = rng.standard_normal((M, K + 3)).astype(dtype)[:, :K]  # rows K + 3 apart
        B = rng.standard_normal((K, n)).astype(dtype)
        out = np.full((M, n + 5), np.nan, dtype)
        tmp = np.empty((gemm.block_rows(tall), PW), dtype)
        gemm.panel_times(A, gemm.pack_panels(B, tall), out[:, :n], tmp)
        want = A.astype(np.float64) @ B.astype(np.float64)
        scale = np.abs(A).astype(np.float64) @ np.abs(B).astype(np.float64)  # the size of the rounding
        assert np.all(np.abs(out[:, :n] - want) <= 4 * K * np.finfo(dtype).eps * scale), (M, K, n)
        assert np.isnan(out[:, n:]).all(), "wrote past the output's columns"


@needs_panels
def test_panels_follow_the_policy(monkeypatch):
    """A run packs its weights for the panels only where policy allows: not with PANEL_PRODUCTS
    off, not for long products on several BLAS threads; products of hand-loop size do use them."""
    from bptt.runtime import threads

    W = np.ones((8, 32), np.float32)
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    assert gemm.Panels().get(policy.ONE_THREAD_MACS, (W, None)) is None  # BLAS's threads
    assert gemm.Panels().get(policy.SMALL_MACS, (W, None)) is not None  # no BLAS call per step either way
    packed, proj, tmp = gemm.Panels().get(policy.ONE_THREAD_MACS - 1, (W, None))
    PW = gemm.panel_width(np.float32, tall=True)  # step products: tall blocks
    assert packed.shape == (-(-32 // PW), 8, PW)
    assert proj.size == 0 and tmp.shape == (gemm.block_rows(True), PW)
    monkeypatch.setattr(policy, "PANEL_PRODUCTS", False)
    assert gemm.Panels().get(10, (W, None)) is None


def reference_panels(B, PW):
    """The packing of ``pack_panels`` written out: column panels of B (K, n), zero-padded."""
    K, n = B.shape
    padded = np.zeros((K, -(-n // PW) * PW), B.dtype)
    padded[:, :n] = B
    return padded.reshape(K, -1, PW).transpose(1, 0, 2)


@needs_panels
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_packing_and_transposing_copy_exactly(dtype):
    """``pack_panels`` of a row-major B and of a transposed view Wᵀ (packed in register tiles,
    no transposed copy), and ``transposed``, are exact copies: every element once, the padding
    zero, for sizes that are and are not multiples of the vector width and the panel width."""
    rng = np.random.default_rng(zlib.crc32(f"pack {np.dtype(dtype).name}".encode()))
    PW = gemm.panel_width(dtype)
    w = gemm.VECTOR_BYTES // np.dtype(dtype).itemsize
    sizes = [(1, 1), (w, w), (w + 1, w - 1), (PW, 3 * w), (2 * PW + 5, 37), (3 * PW, 2 * w + 3), (512, 128), (300, 200)]
    for n, K in sizes:
        W = rng.standard_normal((n, K)).astype(dtype)
        assert np.array_equal(gemm.pack_panels(W.T), reference_panels(W.T, PW)), (n, K)
        assert np.array_equal(gemm.pack_panels(np.ascontiguousarray(W.T)), reference_panels(W.T, PW)), (n, K)
        narrow = gemm.panel_width(dtype, tall=True)  # the tall blocks' panels
        assert np.array_equal(gemm.pack_panels(W.T, tall=True), reference_panels(W.T, narrow)), (n, K)
        assert np.array_equal(gemm.transposed(W), W.T), (n, K)


@needs_panels
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_panel_affine_adds_the_bias_as_the_sums_start(dtype):
    """``panel_affine`` = A B + bias (float64 reference, rounding bound) for partial panels and
    every block height; without a bias it is ``panel_times`` bit for bit; ``PackedAffine``
    is x Wᵀ + b with W packed from its transposed view, the same numbers whichever rows a call
    gets (a row's sum does not depend on the rows around it)."""
    rng = np.random.default_rng(zlib.crc32(f"affine {np.dtype(dtype).name}".encode()))
    PW = gemm.panel_width(dtype)
    for M, K, n in [(1, 1, 1), (7, 5, PW + 1), (13, 64, 2 * PW - 3), (25, 128, 512), (30, 65, 3 * PW)]:
        A = rng.standard_normal((M, K)).astype(dtype)
        W = rng.standard_normal((n, K)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        out = np.full((M, n), np.nan, dtype)
        tmp = np.empty((6, PW), dtype)
        gemm.panel_affine(A, gemm.pack_panels(W.T), gemm.pack_bias(b), out, tmp)
        want = A.astype(np.float64) @ W.T.astype(np.float64) + b
        scale = np.abs(A).astype(np.float64) @ np.abs(W.T).astype(np.float64) + np.abs(b)
        assert np.all(np.abs(out - want) <= 4 * (K + 1) * np.finfo(dtype).eps * scale), (M, K, n)
        plain, none = np.empty_like(out), np.empty_like(out)
        gemm.panel_times(A, gemm.pack_panels(W.T), plain, tmp)
        gemm.panel_affine(A, gemm.pack_panels(W.T), np.empty(0, dtype), none, tmp)
        assert np.array_equal(plain, none)
        affine = gemm.PackedAffine(W, b)
        whole, parts = np.empty_like(out), np.empty_like(out)
        affine(A, whole)
        for rows in (slice(0, M // 2), slice(M // 2, M)):
            affine(np.ascontiguousarray(A[rows]), parts[rows])
        assert np.array_equal(whole, out) and np.array_equal(parts, out)


@needs_panels
def test_panels_are_packed_once_for_the_runs_sharing_them(monkeypatch):
    """Two threads asking one Panels object get one packing (the same arrays), each its own scratch."""
    import threading

    from bptt.runtime import threads

    monkeypatch.setattr(threads, "blas_threads", lambda: 1)
    W = np.random.default_rng(0).standard_normal((96, 40)).astype(np.float32)
    shared, got = gemm.Panels(), []
    workers = [threading.Thread(target=lambda: got.append(shared.get(10, (W.T, None)))) for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert got[0][0] is got[1][0] and got[0][2] is not got[1][2]
    assert np.array_equal(got[0][0], reference_panels(W.T, gemm.panel_width(np.float32, tall=True)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_panels_start_on_a_cache_line(dtype):
    """The panels the step products read start on a 64-byte boundary (``runtime.memory.aligned_empty``,
    tested in tests/runtime/test_memory.py), whatever the size of the matrix."""
    for shape in [(7, 40), (1, 16), (128, 512)]:
        assert gemm.pack_panels(np.ones(shape, dtype), tall=True).ctypes.data % 64 == 0
