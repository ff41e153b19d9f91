"""The per-step product on one core: NumPy's BLAS against bptt's packed panels, in wide and tall blocks.

    python benchmarks/bench_step_product.py [--calls 3000] [--rounds 2] [--layers]

A recurrent step multiplies the state (rows = batch rows) by the recurrent weights;
the weights are the same for all T steps, so bptt packs them once per sequence
(``bptt.kernels.gemm.pack_panels``) and runs the product as register-blocked blocks
(``bptt.kernels.gemm.panel_times``): wide blocks (at most 6 rows × 4 vectors on AVX-512,
what the input projection uses) or tall ones (at most 13 rows × 2 vectors, what the step
products use; see ``bptt.kernels.gemm.TALL_ROWS``).  This times the three on the shapes of
the BENCHMARKS.md table, one after the other, BLAS held to one thread, and prints µs per
call and GFLOP/s.  Packing is done once, outside the timing, as in a layer's time loop.

A second table times the products of hand-loop size (N·G·P ≤ ``bptt.runtime.policy.SMALL_MACS``,
batch 1 to 4), where a BLAS call costs more than the product: the hand loops
(``bptt.kernels.gemm.mm_acc``, what a CPU without panels runs) against the tall panels (what the
layers run where the CPU has them), each repeated inside one compiled loop as a time loop calls it.
``--layers`` also times the layers' own forward (inference) and training step at such sizes, hand
loops against panels (``policy.PANEL_PRODUCTS`` off and on), alternating in one process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from blas import blas_line  # benchmarks/blas.py
from bptt.kernels import gemm
from bptt.runtime import policy

# forward (h W_hhᵀ) and backward (da W_hh) step products of the batch slices and whole batches of the
# layer table: H = 128 (N = 25, 50, 12), 256 and 512
SHAPES = [(25, 128, 512), (50, 128, 512), (25, 512, 128), (50, 512, 128), (12, 128, 512), (25, 256, 1024),
          (25, 1024, 256), (50, 256, 1024), (25, 512, 2048), (25, 2048, 512), (50, 512, 2048)]
# products of hand-loop size: the LSTM of the table's batch-1 row (H 100) forward and backward, and smaller layers
SMALL_SHAPES = [(1, 100, 400), (1, 400, 100), (2, 100, 400), (2, 64, 256), (4, 48, 192), (1, 64, 256)]
# (mode, T, N, D, H, L) of the layer A/B (--layers)
SMALL_LAYERS = [("lstm", 25, 1, 65, 100, 1), ("gru", 25, 1, 65, 100, 1), ("rnn", 25, 1, 65, 100, 1),
                ("lstm", 50, 2, 65, 64, 2), ("gru", 50, 4, 65, 48, 2)]


@njit
def _repeat(A, B, Bp, tmp, out, calls, hand):
    """``calls`` products out = A B inside one compiled loop, as a time loop makes them."""
    for _ in range(calls):
        if hand:
            gemm.mm_acc(A, B, out, True)
        else:
            gemm.panel_times(A, Bp, out, tmp)


def per_call(fn, calls):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", action="store_true", help="also time the layers at hand-loop sizes, hand loops against panels")
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
        small_products(rng, a)
    if a.layers:
        small_layers()


def small_products(rng, a):
    """Hand loops against tall panels on products of hand-loop size (see the module docstring)."""
    print("\n| product of hand-loop size (rows × k × columns) | round | hand loops µs | tall panels µs | panels over hand loops |")
    print("|---|---:|---:|---:|---:|")
    for M, K, n in SMALL_SHAPES:
        A = rng.standard_normal((M, K)).astype(np.float32)
        B = rng.standard_normal((K, n)).astype(np.float32)
        packed = gemm.pack_panels(B, True)
        tmp = np.empty((gemm.block_rows(True), gemm.panel_width(np.float32, True)), np.float32)
        out = np.empty((M, n), np.float32)
        for hand in (True, False):
            _repeat(A, B, packed, tmp, out, 1, hand)  # compile before timing
            assert np.allclose(out, A @ B, rtol=1e-4, atol=1e-4)
        for r in range(a.rounds):
            th, tp = (per_call(lambda h=hand: _repeat(A, B, packed, tmp, out, a.calls, h), 5) / a.calls
                      for hand in (True, False))
            print(f"| {M}×{K}×{n} | {r + 1} | {th * 1e6:.2f} | {tp * 1e6:.2f} | {th / tp:.2f}× |", flush=True)


def small_layers(turns=9, calls=100):
    """The layers' forward (eval) and training step at hand-loop sizes, hand loops (``PANEL_PRODUCTS`` off)
    against panels, alternating in one process: per turn the best of 3 × ``calls`` calls each; medians."""
    import bptt

    cls = {"lstm": bptt.LSTM, "gru": bptt.GRU, "rnn": bptt.RNN}
    print("\n| layer (mode, T, N, D, H, L) | pass | hand loops µs | panels µs | panels over hand loops (per turn) |")
    print("|---|---|---:|---:|---|")
    for mode, T, N, D, H, L in SMALL_LAYERS:
        layer = cls[mode](D, H, L)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((T, N, D)).astype(np.float32)
        dy = rng.standard_normal((T, N, H)).astype(np.float32)

        def infer():
            layer.eval()
            layer.forward(x)
            layer.train()

        def train():
            layer.zero_grad()
            layer.forward(x)
            layer.backward(dy)

        for name, fn in (("inference", infer), ("training", train)):
            times = {False: [], True: []}
            saved = policy.PANEL_PRODUCTS  # BPTT_PANEL_PRODUCTS's setting, given back after the turns
            try:
                for _ in range(turns):
                    for panels in (False, True):
                        policy.PANEL_PRODUCTS = panels
                        fn()
                        times[panels].append(min(per_call(fn, calls) for _ in range(3)))
            finally:
                policy.PANEL_PRODUCTS = saved
            hand, pan = (float(np.median(times[p])) for p in (False, True))
            turns_ratio = " ".join(f"{h / p:.2f}" for h, p in zip(times[False], times[True]))
            print(f"| {mode}, {T}, {N}, {D}, {H}, {L} | {name} | {hand * 1e6:.0f} | {pan * 1e6:.0f} | "
                  f"**{hand / pan:.2f}×** ({turns_ratio}) |", flush=True)


if __name__ == "__main__":
    main()
