"""Where an LSTM inference forward spends its time: a per-phase breakdown against the sgemm peak.

    python benchmarks/profile_infer.py [--configs T,N,D,H,L;...] [--repeat 7]

For each shape (the L6 row of BENCHMARKS.md by default) this times, one core and one BLAS
thread each, on the rows one batch slice holds (n = N / 2 when the eval forward splits the
batch over two threads, see ``bptt.runtime.policy.batch_parts``):

* ``input``: every layer's input projection X W_ihᵀ + b for all T steps, one (T·n, D_k)×(D_k, G)
  product per layer, by BLAS (then the bias added) and on packed panels (the bias included);
  and the cost of packing W_ih and W_hh for the panels, once per forward call;
* ``recurrent``: T step products h_{t−1} W_hhᵀ, (n, P)×(P, G), in one compiled loop, with
  the packed panels (``bptt.kernels.gemm.panel_times``) and with BLAS called from compiled code;
* ``gates``: T fused LSTM gate steps (``bptt.kernels.steps.lstm_fw_step``) on n rows;
* ``slice``: the layer's own eval forward on the n rows, one thread (what each thread runs);
* ``whole``: the layer's eval forward on all N rows, as the benchmark times it (two threads);
* torch's ``nn.LSTM`` under ``no_grad`` on n rows with one thread and on N rows with two.

GFLOP/s count the products' multiply-adds only (2 flops each).  ``peak1`` is a 2048³ sgemm
on one thread.  Sum of the phases against ``slice`` is the Python and bookkeeping overhead;
``slice`` against ``whole`` is what running two threads costs.  Medians of ``--repeat`` runs.
Timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

import bptt
from bptt.kernels import gemm
from bptt.kernels.steps import lstm_fw_step
from bptt.runtime import policy

CONFIGS = [(50, 50, 65, 128, 2), (50, 50, 128, 256, 2), (50, 50, 512, 512, 2), (100, 64, 1024, 1024, 1)]


@njit(cache=False, nogil=True)
def _panel_loop(T, h, Wp, tmp, a):
    for _ in range(T):
        gemm.panel_times(h, Wp, a, tmp)


@njit(cache=False, nogil=True)
def _blas_loop(T, fn, one, zero, h, WT, a):
    none = np.empty((0, 0, 0), h.dtype)
    for _ in range(T):
        gemm.times(fn, one, zero, h, WT, none, none[0], a)


@njit(cache=False, nogil=True)
def _gate_loop(T, a, gx, hs, cs, y, gates, aux, mask):
    for t in range(T):
        gates[:] = gx  # the step activates gx_t's row in place (in inference the row is the window's)
        lstm_fw_step(0, t % 2, a, hs, cs, y, gates, aux, aux, mask, False, False)


def median_time(fn, repeat, inner=1):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t) / inner)
    return statistics.median(ts)


def profile(cfg, repeat, peak1):
    import torch

    T, N, D, H, L = cfg
    n = N // 2
    G, P = 4 * H, H
    rng = np.random.default_rng(0)
    f32 = np.float32
    layer = bptt.LSTM(D, H, L, rng=0).eval()
    x = rng.standard_normal((T, N, D)).astype(f32)
    row = {}
    with threadpool_limits(1):
        # input projection, one product per layer over all T·n rows; packing the weights
        t_in = t_inp = t_pack = 0.0
        for k in range(L):
            Dk = D if k == 0 else H
            X = rng.standard_normal((T * n, Dk)).astype(f32)
            W_ih = rng.standard_normal((G, Dk)).astype(f32)
            W = np.ascontiguousarray(W_ih.T)
            b = rng.standard_normal(G).astype(f32)
            out = np.empty((T * n, G), f32)
            t_in += median_time(lambda: np.add(np.matmul(X, W, out=out), b, out=out), repeat)
            affine = gemm.PackedAffine(W_ih, b)
            t_inp += median_time(lambda: affine(X, out), repeat)
            W_hh = rng.standard_normal((G, P)).astype(f32)
            t_pack += median_time(lambda: (gemm.PackedAffine(W_ih, b), gemm.pack_panels(W_hh.T, tall=True)), repeat)
        row["input"], row["input_panels"], row["pack"] = t_in, t_inp, t_pack
        flops_in = sum(2 * T * n * G * (D if k == 0 else H) for k in range(L))
        # recurrent step products
        h = rng.standard_normal((n, P)).astype(f32) * 0.1
        WT = rng.standard_normal((P, G)).astype(f32) * 0.1
        a = np.empty((n, G), f32)
        Wp = gemm.pack_panels(WT, tall=True)  # as the layers pack a step product's weights
        tmp = np.empty((gemm.block_rows(True), gemm.panel_width(f32, True)), f32)
        row["rec_panels"] = L * median_time(lambda: _panel_loop(T, h, Wp, tmp, a), repeat)
        fn = gemm.gemm_function(f32)
        row["rec_blas"] = L * median_time(lambda: _blas_loop(T, fn, f32(1), f32(0), h, WT, a), repeat)
        flops_rec = L * 2 * T * n * G * P
        # gate arithmetic
        gx = rng.standard_normal((1, n, G)).astype(f32)
        hs, cs = np.zeros((2, n, P), f32), np.zeros((2, n, H), f32)
        y, gates, aux = np.empty((1, n, P), f32), np.empty((1, n, G), f32), np.empty((1, n, H), f32)
        mask = np.ones((1, 1), np.bool_)
        row["gates"] = L * median_time(lambda: _gate_loop(T, a, gx, hs, cs, y, gates, aux, mask), repeat)
        # the layer's own forward on one slice, one thread
        xs = np.ascontiguousarray(x[:, :n])
        saved = policy.SPLIT_MIN_ROWS
        policy.SPLIT_MIN_ROWS = 1 << 62
        try:
            row["slice"] = median_time(lambda: layer.forward(xs), repeat)
        finally:
            policy.SPLIT_MIN_ROWS = saved
        torch.set_num_threads(1)
        tl = torch.nn.LSTM(D, H, L)
        xt_s = torch.from_numpy(xs)
        with torch.no_grad():
            row["torch_slice"] = median_time(lambda: tl(xt_s), repeat)
    torch.set_num_threads(2)
    xt = torch.from_numpy(x)
    row["whole"] = median_time(lambda: layer.forward(x), repeat, inner=3)
    with torch.no_grad():
        row["torch_whole"] = median_time(lambda: tl(xt), repeat, inner=3)
    row["flops_slice"] = flops_in + flops_rec
    row["peak1"] = peak1
    print(f"\n## {cfg}: slice of n = {n} rows, one thread (peak1 {peak1:.1f} GFLOP/s)\n")
    print("| phase | ms | GFLOP/s | % peak1 |")
    print("|---|---:|---:|---:|")

    def line(name, t, flops=None):
        rate = f"{flops / t / 1e9:.1f} | {100 * flops / t / 1e9 / peak1:.0f}%" if flops else " | "
        print(f"| {name} | {t * 1e3:.2f} | {rate} |")

    line("input projection + bias, BLAS (all layers)", row["input"], flops_in)
    line("input projection + bias, panels", row["input_panels"], flops_in)
    line("packing W_ih, W_hh (all layers)", row["pack"])
    line("recurrent products, panels", row["rec_panels"], flops_rec)
    line("recurrent products, BLAS", row["rec_blas"], flops_rec)
    line("gate steps", row["gates"])
    parts = min(row["input"], row["input_panels"]) + min(row["rec_panels"], row["rec_blas"]) + row["gates"]
    line("sum of phases (best products, no packing)", parts, row["flops_slice"])
    line("bptt slice forward (1 thread)", row["slice"], row["flops_slice"])
    line("torch slice forward (1 thread)", row["torch_slice"], row["flops_slice"])
    line("bptt whole forward (2 threads)", row["whole"], 2 * row["flops_slice"])
    line("torch whole forward (2 threads)", row["torch_whole"], 2 * row["flops_slice"])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=None, help="'T,N,D,H,L' separated by ';'")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    configs = CONFIGS if not args.configs else [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    bptt.kernels.available("lstm", np.float32)
    with threadpool_limits(1):
        A = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
        C = np.empty_like(A)
        peak1 = 2 * 2048**3 / min(median_time(lambda: np.matmul(A, A, out=C), 3) for _ in range(2)) / 1e9
    for cfg in configs:
        profile(cfg, args.repeat, peak1)


if __name__ == "__main__":
    main()
