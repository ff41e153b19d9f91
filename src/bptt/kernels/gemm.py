"""Matrix products for the compiled time loops: register-blocked panels, hand loops, and BLAS called from compiled code.

Shape legend: A (M, K) times B (K, n) into out (M, n); a step product is
h_{t−1} (N, P) times W_hhᵀ (P, G), so M = N, K = P, n = G (G = g·H stacked gates);
PW the columns of one packed panel, Bp (⌈n / PW⌉, K, PW) a packed B.

``times(gemm, one, zero, A, B, Bp, tmp, out)`` is the one product the loops of
:mod:`bptt.kernels.loops` call; it picks one of three ways (the choice of way is
:mod:`bptt.runtime.policy`'s, made per run):

* register-blocked products (``panel_times``) on weights packed once per sequence
  into column panels (``pack_panels``): the weights are the same for all T steps, so
  packing them per call, as BLAS must, is wasted; a block of the product stays in
  vector registers for the whole sum over k.  x86 with FMA only (``panel_vectors``);
* hand loops (``mm_acc``) shaped as ``axpy`` over contiguous rows
  (``out[n, :] += A[n, p] · B[p, :]``), which vectorise without reordering sums: for
  small products (e.g. N = 1, H = 100) where a BLAS call would cost more than the
  product and the CPU has no panels (each step reads and writes ``out`` once per p:
  1×100 by 100×400 in 2.9 µs against the panels' 1.5, 2×100 by 100×400 4.5 against 1.75);
* NumPy's own BLAS ``cblas_?gemm``, found through threadpoolctl and called through
  ctypes from inside the compiled loop (``gemm_function``), so no Python runs per
  step and the GIL is not taken.  ``gemm_function`` returns None where no such
  symbol is found (other NumPy builds); the loops then run in Python with np.matmul.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from bptt.kernels.mathfn import HAVE_NUMBA
from bptt.runtime import policy, threads
from bptt.runtime.memory import aligned_empty

__all__ = ["times", "mm_acc", "panel_times", "panel_affine", "pack_panels", "pack_bias", "transposed", "PackedAffine",
           "panel_width", "block_rows", "panel_vectors", "Panels", "panels_enabled", "gemm_function", "VECTOR_BYTES",
           "PANEL_VECTORS", "TALL_ROWS", "TALL_VECTORS", "HAS_PANELS", "PREFETCH_ROWS"]

if HAVE_NUMBA:
    from llvmlite import ir as _ir
    from numba import njit, types
    from numba.extending import intrinsic

    from bptt.kernels.mathfn import JIT, wide_vectors


def panel_vectors():
    """(bytes per vector register, vectors per panel row) for the register-blocked step products
    (``panel_times``), or (0, 0) where this CPU cannot run them (no Numba, no FMA, not x86;
    whether they are used is :data:`bptt.runtime.policy.PANEL_PRODUCTS`).  A block of 6 rows
    × PANEL_VECTORS vectors of accumulators must fit the register file: 24 of AVX-512's 32
    registers, 12 of AVX2's 16."""
    if not HAVE_NUMBA:
        return 0, 0
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except Exception:  # pragma: no cover - no feature list (not x86): BLAS for every product
        return 0, 0
    if features.get("avx512f") and features.get("fma"):
        return 64, 4
    if features.get("avx2") and features.get("fma"):
        return 32, 2
    return 0, 0


VECTOR_BYTES, PANEL_VECTORS = panel_vectors()
HAS_PANELS = VECTOR_BYTES > 0  # this CPU can run panel_times (policy.PANEL_PRODUCTS says whether to)

# Two block shapes.  Wide blocks (at most 6 rows × PANEL_VECTORS vectors) for products over many
# rows, the input projection x W_ihᵀ over T·N rows: each block reads its rows of A once per panel.
# Tall blocks (at most TALL_ROWS rows × TALL_VECTORS vectors) for the per-step products over a
# batch of 25–64 rows, whose weights (P × G, 1–16 MB from H = 256) do not stay in the L1 cache:
# every block streams its whole panel from L2, so the fewer blocks the better — 25 rows are two
# tall blocks (13 + 12) against five wide ones.  Same run, one core (Intel Xeon, AVX-512): 25×512
# by 512×2048 at 144–154 GFLOP/s against 120–124, 25×256 by 256×1024 at 165–171 against 138–139,
# 50 rows and H = 128 alike; over 1,250 rows the tall blocks were slower (239 against 287 GFLOP/s
# on two cores), so the input projection keeps the wide ones.  With AVX2's 16 registers the two
# shapes are the same.  13 rows × 2 vectors: 26 accumulators + 2 panel vectors + 1 broadcast ≤ 32.
TALL_ROWS, TALL_VECTORS = (13, 2) if PANEL_VECTORS == 4 else (6, PANEL_VECTORS)

# A block kernel asks for the panel row this many k ahead of the one it multiplies (software prefetch).
# A step product's weights outgrow the L2 cache from H = 512 (4 MB), so each step streams them from L3,
# which the hardware prefetcher alone did not keep up with.  One core, 13 + 12 rows, same run (Intel
# Xeon, AVX-512): 25×256 by 256×1024 158 → 165–169 GFLOP/s, 25×512 by 512×2048 142 → 155–160, at 8,
# 16 or 32 rows ahead alike; into L2 only (locality 2) gained less (146).  A constant, not an environment
# variable: it is compiled into the kernels, which Numba caches on disk without it in the key.
PREFETCH_ROWS = 16

if HAVE_NUMBA:
    # ======================================================================== small products
    @njit(**JIT)
    def mm_acc(A, Bt, out, zero):
        """out (N, K) (=|+=) A (N, M) · Bt (M, K): rows of Bt added as axpys (vectorised)."""
        wide_vectors()
        N, M = A.shape
        K = Bt.shape[1]
        for n in range(N):
            if zero:
                for k in range(K):
                    out[n, k] = 0.0
            for j in range(M):
                a = A[n, j]
                if a != 0.0:
                    for k in range(K):
                        out[n, k] += a * Bt[j, k]

    # ======================================================================== register-blocked products
    # A per-step product h_{t−1} W_hhᵀ is small (25×128 by 128×512 per batch slice) and
    # its weights stay the same for all T steps.  BLAS packs both operands on every call
    # and ran such products at 54–90 GFLOP/s on one core (AMD EPYC, Zen 4), below its
    # 92–96 on a large product.  These kernels take the weights packed once per sequence
    # (``pack_panels``) and keep a block of C in vector registers for the whole sum
    # over k: 102–110 GFLOP/s on the same products (1.14–1.9× OpenBLAS, same run;
    # BENCHMARKS.md has the table).
    def _panel_block_kernel(R, V):
        """An intrinsic ``block(zero, a, lda, b, c, ldc, K, init)``:
        C[0:R, 0:PW] = init[0:PW] + A[0:R, 0:K] · B_panel  (init added to every row).

        a, c: addresses of A and C (rows lda, ldc elements apart); b: a packed panel,
        K rows of PW = V·w contiguous elements (w = lanes of a vector of the dtype of
        ``zero``); init: the address of PW values the sums start from (a bias, or
        zeros).  The R·V accumulators are SSA values, so LLVM keeps them in registers:
        per k, V vector loads of B and R broadcasts of A feed R·V fused multiply-adds, and
        the cache lines of B's row k + PREFETCH_ROWS are asked for.  K ≥ 1.
        """

        @intrinsic
        def block(typingctx, zero, a, lda, b, c, ldc, K, init):
            if zero not in (types.float32, types.float64):
                return None
            sig = types.void(zero, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)
            item = 4 if zero == types.float32 else 8
            fp = _ir.FloatType() if item == 4 else _ir.DoubleType()
            lanes = VECTOR_BYTES // item

            def codegen(context, builder, signature, args):
                _, a_i, lda_i, b_i, c_i, ldc_i, K_i, init_i = args
                i64, vec = _ir.IntType(64), _ir.VectorType(fp, lanes)
                A, B, C, I = (builder.inttoptr(p, fp.as_pointer()) for p in (a_i, b_i, c_i, init_i))

                def const(v):
                    return _ir.Constant(i64, v)

                def vector_at(base, offset):
                    return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())

                name = f"llvm.fma.v{lanes}f{8 * item}"
                fma = builder.module.globals.get(name) or _ir.Function(
                    builder.module, _ir.FunctionType(vec, [vec, vec, vec]), name)
                i8p, i32 = _ir.IntType(8).as_pointer(), _ir.IntType(32)
                prefetch = builder.module.globals.get("llvm.prefetch.p0i8") or _ir.Function(
                    builder.module, _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
                line = 64 // item  # elements of a cache line
                start = [builder.load(vector_at(I, const(v * lanes)), align=item) for v in range(V)]  # init's vectors
                entry = builder.block
                loop, done = builder.append_basic_block("panel.k"), builder.append_basic_block("panel.done")
                builder.branch(loop)
                builder.position_at_end(loop)
                k = builder.phi(i64)
                acc = [[builder.phi(vec) for _ in range(V)] for _ in range(R)]
                b_row = builder.mul(k, const(V * lanes))  # B_panel[k, :]
                for e in range(0, V * lanes, line) if PREFETCH_ROWS else ():  # read, keep in every cache level, data
                    ahead = builder.gep(B, [builder.add(b_row, const(PREFETCH_ROWS * V * lanes + e))])
                    builder.call(prefetch, [builder.bitcast(ahead, i8p), _ir.Constant(i32, 0), _ir.Constant(i32, 3),
                                            _ir.Constant(i32, 1)])
                bv = [builder.load(vector_at(B, builder.add(b_row, const(v * lanes))), align=item) for v in range(V)]
                splat = _ir.Constant(_ir.VectorType(_ir.IntType(32), lanes), [0] * lanes)
                new = []
                for r in range(R):  # acc[r][v] += A[r, k] · B_panel[k, v·w : (v+1)·w]
                    x = builder.load(builder.gep(A, [builder.add(builder.mul(const(r), lda_i), k)]))
                    xv = builder.insert_element(_ir.Constant(vec, _ir.Undefined), x, _ir.Constant(_ir.IntType(32), 0))
                    xv = builder.shuffle_vector(xv, _ir.Constant(vec, _ir.Undefined), splat)
                    new.append([builder.call(fma, [xv, bv[v], acc[r][v]]) for v in range(V)])
                k_next = builder.add(k, const(1))
                k.add_incoming(const(0), entry)
                k.add_incoming(k_next, loop)
                for r in range(R):
                    for v in range(V):
                        acc[r][v].add_incoming(start[v], entry)
                        acc[r][v].add_incoming(new[r][v], loop)
                builder.cbranch(builder.icmp_signed("<", k_next, K_i), loop, done)
                builder.position_at_end(done)
                for r in range(R):
                    for v in range(V):
                        offset = builder.add(builder.mul(const(r), ldc_i), const(v * lanes))
                        builder.store(new[r][v], vector_at(C, offset), align=item)
                return context.get_dummy_value()

            return sig, codegen

        return block

    _W1, _W2, _W3, _W4, _W5, _W6 = (_panel_block_kernel(r, PANEL_VECTORS) for r in range(1, 7))
    _T1, _T2, _T3, _T4, _T5, _T6, _T7, _T8, _T9, _T10, _T11, _T12, _T13 = (
        _panel_block_kernel(min(r, TALL_ROWS), TALL_VECTORS) for r in range(1, 14))  # (AVX2: the last seven unused)

    @njit(inline="always", **JIT)
    def _wide_block(r, zero, a, lda, b, c, ldc, K, init):
        """The wide block kernel of r rows (1 ≤ r ≤ 6)."""
        if r == 6:
            _W6(zero, a, lda, b, c, ldc, K, init)
        elif r == 5:
            _W5(zero, a, lda, b, c, ldc, K, init)
        elif r == 4:
            _W4(zero, a, lda, b, c, ldc, K, init)
        elif r == 3:
            _W3(zero, a, lda, b, c, ldc, K, init)
        elif r == 2:
            _W2(zero, a, lda, b, c, ldc, K, init)
        else:
            _W1(zero, a, lda, b, c, ldc, K, init)

    @njit(inline="always", **JIT)
    def _tall_block(r, zero, a, lda, b, c, ldc, K, init):
        """The tall block kernel of r rows (1 ≤ r ≤ TALL_ROWS)."""
        if r == 13:
            _T13(zero, a, lda, b, c, ldc, K, init)
        elif r == 12:
            _T12(zero, a, lda, b, c, ldc, K, init)
        elif r == 11:
            _T11(zero, a, lda, b, c, ldc, K, init)
        elif r == 10:
            _T10(zero, a, lda, b, c, ldc, K, init)
        elif r == 9:
            _T9(zero, a, lda, b, c, ldc, K, init)
        elif r == 8:
            _T8(zero, a, lda, b, c, ldc, K, init)
        elif r == 7:
            _T7(zero, a, lda, b, c, ldc, K, init)
        elif r == 6:
            _T6(zero, a, lda, b, c, ldc, K, init)
        elif r == 5:
            _T5(zero, a, lda, b, c, ldc, K, init)
        elif r == 4:
            _T4(zero, a, lda, b, c, ldc, K, init)
        elif r == 3:
            _T3(zero, a, lda, b, c, ldc, K, init)
        elif r == 2:
            _T2(zero, a, lda, b, c, ldc, K, init)
        else:
            _T1(zero, a, lda, b, c, ldc, K, init)

    @njit(**JIT)
    def panel_affine(A, Bp, bias, out, tmp):
        """out (M, n) = A (M, K) B + bias, with B packed by :func:`pack_panels` as Bp (n_panels, K, PW)
        and bias padded by :func:`pack_bias` (n_panels·PW,), or empty for none.

        Each sum starts from its bias and adds the K products in order, one fused
        multiply-add each, so a row's result does not depend on the rows around it.
        The panel width says the block shape (``pack_panels``): rows go in wide blocks of
        at most 6 rows or tall blocks of at most TALL_ROWS, as even as possible (25 rows:
        five wide blocks of 5, not four of 6 and one of 1, which would use a fifth of the
        registers; two tall blocks of 13 and 12); a last panel narrower than PW is computed
        into ``tmp`` (rows of a block, PW) and its columns copied.  Rows of A and out must
        be contiguous.
        """
        wide_vectors()
        M, K = A.shape
        n = out.shape[1]
        n_panels, PW = Bp.shape[0], Bp.shape[2]
        size = A.itemsize
        zero = A.dtype.type(0)
        zeros = np.zeros(PW, A.dtype)  # the start of every sum without a bias
        tall = PW == TALL_VECTORS * (VECTOR_BYTES // size) and TALL_VECTORS != PANEL_VECTORS
        rows = TALL_ROWS if tall else 6
        blocks = (M + rows - 1) // rows
        lda, ldc = A.strides[0] // size, out.strides[0] // size
        for jp in range(n_panels):
            j0 = jp * PW
            width = min(PW, n - j0)
            b = Bp[jp].ctypes.data
            init = bias.ctypes.data + j0 * size if bias.shape[0] else zeros.ctypes.data
            for blk in range(blocks):
                i0, i1 = M * blk // blocks, M * (blk + 1) // blocks
                a = A.ctypes.data + i0 * lda * size
                c, ld = (out.ctypes.data + (i0 * ldc + j0) * size, ldc) if width == PW else (tmp.ctypes.data, PW)
                r = i1 - i0
                if tall:
                    _tall_block(r, zero, a, lda, b, c, ld, K, init)
                else:
                    _wide_block(r, zero, a, lda, b, c, ld, K, init)
                if width < PW:
                    for i in range(r):
                        for j in range(width):
                            out[i0 + i, j0 + j] = tmp[i, j]

    @njit(**JIT)
    def panel_times(A, Bp, out, tmp):
        """out (M, n) = A (M, K) B: :func:`panel_affine` without a bias."""
        panel_affine(A, Bp, Bp[0, 0, :0], out, tmp)

    # ======================================================================== packing and transposing
    def _tile_transpose_kernel():
        """An intrinsic ``tile(zero, src, lds, dst, ldd)``: the w × w tile at ``dst`` (rows ldd
        elements apart) = the transpose of the tile at ``src`` (rows lds apart), w the lanes of
        a vector of the dtype of ``zero``.

        The w rows are loaded as vectors and transposed in registers in log₂ w rounds: round
        s swaps bit s of every element's row index with bit s of its column index, pairing
        row r (bit s clear) with row r + 2ˢ in two two-source shuffles; after all rounds every
        row bit has changed places with its column bit, the transpose.  No element is computed.
        """

        @intrinsic
        def tile(typingctx, zero, src, lds, dst, ldd):
            if zero not in (types.float32, types.float64):
                return None
            sig = types.void(zero, types.intp, types.intp, types.intp, types.intp)
            item = 4 if zero == types.float32 else 8
            fp = _ir.FloatType() if item == 4 else _ir.DoubleType()
            w = VECTOR_BYTES // item

            def codegen(context, builder, signature, args):
                _, src_i, lds_i, dst_i, ldd_i = args
                i32, i64, vec = _ir.IntType(32), _ir.IntType(64), _ir.VectorType(fp, w)
                S, D = (builder.inttoptr(p, fp.as_pointer()) for p in (src_i, dst_i))

                def row(base, ld, r):
                    return builder.bitcast(builder.gep(base, [builder.mul(_ir.Constant(i64, r), ld)]), vec.as_pointer())

                def mask(values):
                    return _ir.Constant(_ir.VectorType(i32, w), values)

                v = [builder.load(row(S, lds_i, r), align=item) for r in range(w)]
                d = 1
                while d < w:  # round s = log₂ d
                    low = mask([c if not c & d else w + c - d for c in range(w)])  # row r: its own, then r + d's
                    high = mask([c + d if not c & d else w + c for c in range(w)])  # row r + d
                    new = list(v)
                    for r in range(w):
                        if not r & d:
                            new[r] = builder.shuffle_vector(v[r], v[r | d], low)
                            new[r | d] = builder.shuffle_vector(v[r], v[r | d], high)
                    v, d = new, 2 * d
                for r in range(w):
                    builder.store(v[r], row(D, ldd_i, r), align=item)
                return context.get_dummy_value()

            return sig, codegen

        return tile

    _tile_transpose = _tile_transpose_kernel()

    @njit(**JIT)
    def _transpose_into(W, out):
        """out (C, R) = W (R, C)ᵀ, both row-major: w × w tiles transposed in registers
        (``_tile_transpose``), the edges element by element."""
        R, C = W.shape
        size = W.itemsize
        zero = W.dtype.type(0)
        w = VECTOR_BYTES // size
        R_w, C_w = R - R % w, C - C % w
        for i0 in range(0, R_w, w):
            for j0 in range(0, C_w, w):
                _tile_transpose(zero, W.ctypes.data + (i0 * C + j0) * size, C, out.ctypes.data + (j0 * R + i0) * size, R)
        for i in range(R_w, R):
            for j in range(C):
                out[j, i] = W[i, j]
        for j in range(C_w, C):
            for i in range(R_w):
                out[j, i] = W[i, j]

    @njit(**JIT)
    def _pack_into(B, packed):
        """packed[jp, k, c] = B[k, jp·PW + c], zero past B's columns (B row-major).  B is read
        row after row, each row dealt out to the panels: twice as fast as panel after panel,
        which reads B in short strided pieces (a 2048×512 float32 B: 327 against 752 µs, a
        copy of it 326)."""
        K, n = B.shape
        n_panels, PW = packed.shape[0], packed.shape[2]
        full = n // PW  # whole panels; a last one, if any, holds the n − full·PW columns left
        for k in range(K):
            src = B[k]
            for jp in range(full):
                dst, j0 = packed[jp, k], jp * PW
                for c in range(PW):
                    dst[c] = src[j0 + c]
            if full < n_panels:
                dst, j0 = packed[full, k], full * PW
                for c in range(n - j0):
                    dst[c] = src[j0 + c]
                for c in range(n - j0, PW):
                    dst[c] = 0.0

    @njit(**JIT)
    def _pack_rows_into(W, packed):
        """packed[jp, k, c] = W[jp·PW + c, k], zero past W's rows: the panels of Wᵀ packed
        straight from W (n, K) row-major, in w × w tiles transposed in registers
        (``_tile_transpose``; PW is a multiple of w), the edges element by element."""
        n, K = W.shape
        n_panels, PW = packed.shape[0], packed.shape[2]
        size = W.itemsize
        zero = W.dtype.type(0)
        w = VECTOR_BYTES // size
        n_w, K_w = n - n % w, K - K % w
        for jp in range(n_panels):
            for c0 in range(0, PW, w):
                j0 = jp * PW + c0
                if j0 + w <= n_w:
                    for k0 in range(0, K_w, w):
                        _tile_transpose(zero, W.ctypes.data + (j0 * K + k0) * size, K,
                                        packed[jp, k0, c0:].ctypes.data, PW)
                    for k in range(K_w, K):
                        for c in range(w):
                            packed[jp, k, c0 + c] = W[j0 + c, k]
                else:  # the last rows of W, and the zeros past them
                    for c in range(w):
                        j = j0 + c
                        for k in range(K):
                            packed[jp, k, c0 + c] = W[j, k] if j < n else 0.0

    # ======================================================================== products inside the loops
    # ``gemm`` is NumPy's own BLAS ?gemm as a ctypes function (see gemm_function),
    # or None when the products run on panels (``Bp`` non-empty) or, for small sizes on
    # a CPU without them, as hand loops; Numba compiles the branch for None away.
    # Weights come transposed and contiguous, so BLAS
    # reads B untransposed: measured 44 against 58 µs for the 50×128 by 128×512
    # step product, 726 against 1019 µs at H = 512.  Calling BLAS from compiled code keeps the time
    # loop free of Python, and of the GIL, which matters when one thread per
    # layer runs (bptt.runtime.wavefront).
    _ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

    @njit(inline="always", **JIT)
    def times(gemm, one, zero, A, B, Bp, tmp, out):
        """out = A B.   A (M, K), B (K, N'); Bp is B packed (``pack_panels``) or empty."""
        if Bp.shape[0]:
            panel_times(A, Bp, out, tmp)
        elif gemm is None:
            mm_acc(A, B, out, True)
        else:
            M, K = A.shape
            n = B.shape[1]
            gemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, M, n, K, one, A.ctypes.data, K, B.ctypes.data, n, zero,
                 out.ctypes.data, n)


def panel_width(dtype, tall=False):
    """PW, the columns of one packed panel: PANEL_VECTORS vectors of ``dtype`` (TALL_VECTORS for
    the tall blocks of the per-step products)."""
    return (TALL_VECTORS if tall else PANEL_VECTORS) * VECTOR_BYTES // np.dtype(dtype).itemsize


def block_rows(tall=False):
    """The most rows of a block, the rows of ``panel_times``'s scratch ``tmp``."""
    return TALL_ROWS if tall else 6


def pack_panels(B, tall=False):
    """B (K, n) → (⌈n / PW⌉, K, PW) contiguous: column panels of PW = ``panel_width(dtype, tall)``
    columns, the last padded with zeros, each read by ``panel_times`` row after row, in tall
    blocks or wide ones (see TALL_ROWS).  B may be a transposed view (``W.T``): it is packed in
    one pass, without a transposed copy first.  The panels start on a cache line (``aligned_empty``),
    so each of their vectors is one line."""
    K, n = B.shape
    PW = panel_width(B.dtype, tall)
    packed = aligned_empty((-(-n // PW), K, PW), B.dtype, min_bytes=0)  # read on every step: always
    if B.T.flags.c_contiguous and not B.flags.c_contiguous and HAS_PANELS:
        _pack_rows_into(B.T, packed)
    else:
        _pack_into(B, packed)
    return packed


def pack_bias(b, dtype=None):
    """A bias (n,) padded with zeros to whole panels (⌈n / PW⌉·PW,), for :func:`panel_affine`."""
    dtype = np.dtype(dtype or b.dtype)
    PW = panel_width(dtype)
    out = np.zeros(-(-b.shape[0] // PW) * PW, dtype)
    out[: b.shape[0]] = b
    return out


def transposed(W):
    """Wᵀ as a contiguous array, ``np.ascontiguousarray(W.T)``: for large W in tiles transposed
    in registers (a (4096, 1024) float32 W: NumPy's copy, which reads W a column at a time, 30 ms)."""
    if W.ndim != 2 or not HAS_PANELS or not W.flags.c_contiguous or W.nbytes < 1 << 16:
        return np.ascontiguousarray(W.T)
    out = np.empty((W.shape[1], W.shape[0]), W.dtype)
    _transpose_into(W, out)
    return out


class PackedAffine:
    """x ↦ x Wᵀ + b on packed panels: W (n, K) and b (n,) or None packed once
    (:func:`pack_panels` of the view Wᵀ, :func:`pack_bias`), applied to any number of row
    blocks, from any thread (``panel_affine``; each call its own scratch)."""

    def __init__(self, W, b=None):
        self.n = W.shape[0]
        self.packed = pack_panels(W.T)
        self.bias = pack_bias(b, W.dtype) if b is not None else np.empty(0, W.dtype)

    def __call__(self, x, out):
        """out (M, n) = x (M, K) Wᵀ + b; rows of x and out contiguous."""
        panel_affine(x, self.packed, self.bias, out, np.empty((6, self.packed.shape[2]), out.dtype))


class Panels:
    """The step products' weights packed for ``panel_times``, made on first use by a run.

    One object may serve several runs of the same weights in several threads (the batch
    slices of :mod:`bptt.nn.rnn`): the first to ask packs, the others wait and share it."""

    def __init__(self):
        self.packed = None
        self.lock = threading.Lock()
        self._backward = None

    def for_backward(self):
        """The Panels of the backward's products with the same weights (W_hh itself, not W_hhᵀ),
        shared the same way: the batch slices' backward runs pack W_hh once between them, not
        once each (1 MB a layer at 2×512, which the RNN's training step held twice at its peak)."""
        with self.lock:
            if self._backward is None:
                self._backward = Panels()
            return self._backward

    def get(self, macs, weights):
        """(packed weights, packed projection (empty without one), scratch) when this run's
        step products should use ``panel_times``, else None.  ``weights``: (B, B_r or None),
        the right-hand factors of the products (transposed views are packed without a copy).

        They do when the kernels exist for this CPU (and :data:`bptt.runtime.policy.PANEL_PRODUCTS`
        allows them) and BLAS would run the product on one thread: below ``policy.ONE_THREAD_MACS``
        (every product of hand-loop size, ``policy.SMALL_MACS``, is), or inside
        :func:`bptt.runtime.threads.single_thread_blas` (the wavefront and the batch split).  Longer
        products on several BLAS threads stay with BLAS.
        """
        if not panels_enabled():
            return None
        if not (macs < policy.ONE_THREAD_MACS or threads.inside_single_thread_blas() or threads.blas_threads() == 1):
            return None
        with self.lock:
            if self.packed is None:
                W, W_r = weights  # a step's product over the batch rows: tall blocks
                tmp = np.empty((block_rows(True), panel_width(W.dtype, True)), W.dtype)
                self.packed = (pack_panels(W, True), np.empty((0, 0, 0), W.dtype) if W_r is None else pack_panels(W_r, True),
                               tmp)
        # the scratch rows are per run: two threads sharing the packed weights write their own
        return self.packed[0], self.packed[1], np.empty_like(self.packed[2])


def panels_enabled():
    """Whether register-blocked products may run: this CPU has them and
    :data:`bptt.runtime.policy.PANEL_PRODUCTS` allows them."""
    return policy.PANEL_PRODUCTS and HAS_PANELS


# ============================================================================ BLAS for compiled code
_GEMM: dict = {}  # dtype char -> ctypes ?gemm function or None


def gemm_function(dtype):
    """NumPy's own BLAS ``cblas_?gemm`` as a ctypes function the compiled loops can call, or None.

    Found through threadpoolctl (the library file NumPy loaded) under the names
    NumPy's wheels (``scipy_cblas_sgemm64_``, 64-bit integers) and other builds
    (``cblas_sgemm64_``, ``cblas_sgemm``) use, and checked on a small product
    before use.  None (BPTT_KERNEL_BLAS=0, or nothing found) keeps the time loop
    in Python with ``np.matmul`` per step.
    """
    key = np.dtype(dtype).char
    if key not in _GEMM:
        fn = None
        if HAVE_NUMBA and os.environ.get("BPTT_KERNEL_BLAS", "1") != "0":
            try:
                fn = _load_gemm(key)
            except Exception:  # any surprise: keep the NumPy route
                fn = None
        _GEMM[key] = fn
    return _GEMM[key]


def _load_gemm(key):
    import ctypes

    libs = threads.blas_controllers()
    if libs is None:
        return None
    t, real = ("s", ctypes.c_float) if key == "f" else ("d", ctypes.c_double)
    dtype = np.dtype(key)
    for controller in libs.lib_controllers:
        lib = ctypes.CDLL(controller.filepath)
        for name in (f"scipy_cblas_{t}gemm64_", f"cblas_{t}gemm64_", f"cblas_{t}gemm"):
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            integer = ctypes.c_int64 if name.endswith("64_") else ctypes.c_int
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, real, ctypes.c_void_p,
                           integer, ctypes.c_void_p, integer, real, ctypes.c_void_p, integer]
            rng = np.random.default_rng(0)
            A, B = rng.standard_normal((3, 5)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype)
            out = np.zeros((3, 4), dtype)
            times(fn, dtype.type(1), dtype.type(0), A, np.ascontiguousarray(B.T), np.empty((0, 0, 0), dtype),
                   np.empty((0, 0), dtype), out)  # compiled, as used
            if np.allclose(out, A @ B.T, rtol=1e-5, atol=1e-5):
                return fn
    return None


