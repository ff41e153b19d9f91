"""The per-step product on one core: NumPy's BLAS against bptt's packed panels.

    python benchmarks/bench_step_product.py [--calls 3000] [--rounds 2]

A recurrent step multiplies the state (rows = batch rows) by the recurrent weights;
the weights are the same for all T steps, so bptt packs them once per sequence
(``bptt.kernels.gemm.pack_panels``) and runs the product as register-blocked blocks
(``bptt.kernels.gemm.panel_times``).  This times both on the shapes of the BENCHMARKS.md
table, alternating, BLAS held to one thread, and prints µs per call and GFLOP/s.
Packing is done once, outside the timing, as in a layer's time loop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from bptt.kernels import gemm

SHAPES = [(25, 128, 512), (50, 128, 512), (25, 512, 128), (50, 512, 128), (12, 128, 512), (25, 256, 1024)]


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
    print("| product (rows × k × columns) | round | BLAS µs (GFLOP/s) | panels µs (GFLOP/s) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    with threadpool_limits(1):
        for M, K, n in SHAPES:
            A = rng.standard_normal((M, K)).astype(np.float32)
            B = rng.standard_normal((K, n)).astype(np.float32)
            packed, tmp = gemm.pack_panels(B), np.empty((6, gemm.panel_width(np.float32)), np.float32)
            out_blas, out_panels = np.empty((M, n), np.float32), np.empty((M, n), np.float32)
            gemm.panel_times(A, packed, out_panels, tmp)  # compile (or load) before timing
            assert np.allclose(out_panels, A @ B, rtol=1e-4, atol=1e-4)
            flop = 2 * M * K * n
            for r in range(a.rounds):
                tb = per_call(lambda: np.matmul(A, B, out=out_blas), a.calls)
                tp = per_call(lambda: gemm.panel_times(A, packed, out_panels, tmp), a.calls)
                print(f"| {M}×{K}×{n} | {r + 1} | {tb * 1e6:.1f} ({flop / tb / 1e9:.0f}) "
                      f"| {tp * 1e6:.1f} ({flop / tp / 1e9:.0f}) | {tb / tp:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
