"""The per-step product on one core: NumPy's BLAS against bptt's packed panels, in wide and tall blocks.

    python benchmarks/bench_step_product.py [--calls 3000] [--rounds 2]

A recurrent step multiplies the state (rows = batch rows) by the recurrent weights;
the weights are the same for all T steps, so bptt packs them once per sequence
(``bptt.kernels.gemm.pack_panels``) and runs the product as register-blocked blocks
(``bptt.kernels.gemm.panel_times``): wide blocks (at most 6 rows × 4 vectors on AVX-512,
what the input projection uses) or tall ones (at most 13 rows × 2 vectors, what the step
products use; see ``bptt.kernels.gemm.TALL_ROWS``).  This times the three on the shapes of
the BENCHMARKS.md table, one after the other, BLAS held to one thread, and prints µs per
call and GFLOP/s.  Packing is done once, outside the timing, as in a layer's time loop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from blas import blas_line  # benchmarks/blas.py
from bptt.kernels import gemm

# forward (h W_hhᵀ) and backward (da W_hh) step products of the batch slices and whole batches of the
# layer table: H = 128 (N = 25, 50, 12), 256 and 512
SHAPES = [(25, 128, 512), (50, 128, 512), (25, 512, 128), (50, 512, 128), (12, 128, 512), (25, 256, 1024),
          (25, 1024, 256), (50, 256, 1024), (25, 512, 2048), (25, 2048, 512), (50, 512, 2048)]


def per_call(fn, calls):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    if not gemm.HAS_PANELS:
        raise SystemExit("no packed-panel products on this CPU (needs x86 with FMA and Numba)")
    rng = np.random.default_rng(0)
    print(blas_line())
    print(f"wide blocks: at most 6 rows × {gemm.PANEL_VECTORS} vectors; tall blocks (what a layer's step products use): "
          f"at most {gemm.TALL_ROWS} rows × {gemm.TALL_VECTORS} vectors\n")
    print("| product (rows × k × columns) | round | BLAS µs (GFLOP/s) | wide panels µs (GFLOP/s) "
          "| tall panels µs (GFLOP/s) | tall over BLAS | tall over wide |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with threadpool_limits(1):
        for M, K, n in SHAPES:
            A = rng.standard_normal((M, K)).astype(np.float32)
            B = rng.standard_normal((K, n)).astype(np.float32)
            out_blas = np.empty((M, n), np.float32)
            ways = {}
            for tall in (False, True):
                packed = gemm.pack_panels(B, tall)
                tmp = np.empty((gemm.block_rows(tall), gemm.panel_width(np.float32, tall)), np.float32)
                out = np.empty((M, n), np.float32)
                gemm.panel_times(A, packed, out, tmp)  # compile (or load) before timing
                assert np.allclose(out, A @ B, rtol=1e-4, atol=1e-4)
                ways[tall] = (packed, out, tmp)  # panel_times' arguments after A
            flop = 2 * M * K * n

            def cell(t):
                return f"{t * 1e6:.1f} ({flop / t / 1e9:.0f})"

            for r in range(a.rounds):
                tb = per_call(lambda: np.matmul(A, B, out=out_blas), a.calls)
                tw, tt = (per_call(lambda w=ways[tall]: gemm.panel_times(A, *w), a.calls)
                          for tall in (False, True))
                print(f"| {M}×{K}×{n} | {r + 1} | {cell(tb)} | {cell(tw)} | {cell(tt)} | {tb / tt:.2f}× | {tw / tt:.2f}× |",
                      flush=True)


if __name__ == "__main__":
    main()
