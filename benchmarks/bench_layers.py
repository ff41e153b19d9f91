"""bptt vs PyTorch on CPU: training step, inference, per-character sampling, peak memory.

    python benchmarks/bench_layers.py [--quick] [--threads 2] [--repeat 7] [--out FILE]
    python benchmarks/bench_layers.py --configs 50,50,512,512,2 --modes lstm --passes infer   (one row)

Method
------
* Both libraries run in this one process, on the same shapes, the same weights
  (bptt's parameters are copied into the torch module), float32, with the same
  thread count: threadpoolctl limits OpenBLAS (numpy) and torch.set_num_threads
  limits torch (MKL / OpenMP).
* The two sides alternate (bptt, torch, bptt, torch, ...) so that drift in the
  machine's load hits both alike; each number is the median of ``--repeat``
  timed runs after untimed warm-up calls (see "Thread pools" below).
* train = forward + backward of ``(out · dout).sum()`` with the gradient of the
  input (torch: ``x.requires_grad_()``, ``.backward()``; bptt: ``forward`` then
  ``backward(dout)``).  infer = forward only (torch under ``no_grad``, bptt in
  eval mode, which lets the largest layers run as batch slices).
* GFLOP/s counts the multiply-adds of the matrix products only (2 flops each):
  forward T·N·G·(D + P) per layer and direction, training 3× that; the
  element-wise work is not counted.  "% peak" divides by the float32 GEMM rate
  of numpy measured in the same run (a 2048³ sgemm).  The same two columns are
  given for torch, and "ceiling" is the higher of the two libraries' measured
  GEMM rates (numpy's BLAS, torch's MKL) over torch's GFLOP/s: the speed-up
  over torch that a step would have if every product ran at that rate and the
  element-wise work took no time at all.  A target above the ceiling asks for
  products faster than the best large sgemm measured on the machine.
* sampling: one character at a time, batch 1, a 2-layer LSTM of 512 units over
  a one-hot input of V = 65; bptt's ``LSTM.step`` vs ``torch.nn.LSTM`` called on
  a (1, 1, V) input with the carried state, under ``no_grad``.
* peak memory of one training step, and of one inference forward, is measured in a fresh subprocess per side
  and configuration (Linux): after building the model and inputs (and, for
  bptt, loading the compiled kernels), the peak resident set is reset
  (``/proc/self/clear_refs`` ← 5), one training step (or forward) runs, and the growth of the
  peak (``VmHWM``) over the resident set before the step is reported.  Both sides
  are measured the same way (tracemalloc would miss torch's allocator).  Memory
  already mapped and reused by an allocator is not counted, so these are
  approximate (± a few MB).
* Thread pools: both libraries' worker threads busy-wait for a while after
  each parallel region (libgomp's for torch, OpenBLAS's for numpy).  With the
  two in one process on 2 cores, the spinning threads of one side starve the
  other (a 0.7 ms bptt step took 35 ms right after a torch call).  So each
  side's turn starts after ``--gap`` seconds (default 0.3) of idle, long
  enough for the other side's threads to go to sleep, then calls the function
  untimed for at least ``--warm`` seconds (default 0.15; at least once) and
  times 3 calls in a row (the steady state of a training loop); the number
  reported is the median of those over all turns.  The warm-up is a duration,
  not one call, because on the 2-vCPU VMs of this project a process that has
  idled 0.3 s runs its next ~40 ms of work up to 2× slower (measured for bptt's
  forward: 8.5, 12.7, 13.3, 13.4 ms for the first four calls after the idle
  against 6.4–6.8 ms from the fifth on: the scheduler kept its two threads on
  one core, see BENCHMARKS.md); with one untimed call, calls of a few
  milliseconds were timed inside that slow spell.  Both thread
  pools as they ship: torch keeps libgomp's default (active) wait policy, which
  is what makes its small parallel regions fast.  ``--omp-passive`` sets
  ``OMP_WAIT_POLICY=PASSIVE`` instead (earlier versions of this script did; it
  makes torch slower).
* torch's default CPU path for nn.LSTM/GRU/RNN goes through oneDNN (mkldnn);
  ``--torch-mkldnn off`` disables it to compare with torch's native kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

GRID = [(25, 1, 65, 100, 1), (50, 50, 65, 128, 2), (50, 50, 128, 256, 2), (50, 50, 512, 512, 2), (100, 64, 1024, 1024, 1)]
QUICK_GRID = [(25, 1, 65, 100, 1), (50, 50, 128, 256, 2)]
MODES = ("lstm", "gru", "rnn")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def build(mode, D, H, L, seed=0):
    """A bptt layer and a torch layer with the same weights."""
    import torch

    import bptt

    cls = {"lstm": bptt.LSTM, "gru": bptt.GRU, "rnn": bptt.RNN}[mode]
    ours = cls(D, H, L, rng=seed)
    theirs = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[mode](D, H, L)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(ours.params[name]))
    return ours, theirs


def make_runners(mode, T, N, D, H, L):
    import torch

    ours, theirs = build(mode, D, H, L)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, N, D)).astype(np.float32)
    dout = rng.standard_normal((T, N, H)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    dt = torch.from_numpy(dout.copy())

    def ours_train():
        ours.zero_grad()
        ours.forward(x)
        ours.backward(dout)

    def ours_infer():  # eval mode, as bptt's own evaluation and sampling run (torch: no_grad)
        ours.eval()
        ours.forward(x)
        ours.train()

    def torch_train():
        theirs.zero_grad()
        xt.grad = None
        out, _ = theirs(xt)
        (out * dt).sum().backward()

    def torch_infer():
        with torch.no_grad():
            theirs(xt)

    return ours_train, torch_train, ours_infer, torch_infer


GAP = [0.3]  # seconds of idle before each side's turn (--gap)
WARM = [0.15]  # seconds of untimed calls after the idle (--warm)
FOREIGN = [None]  # redo a turn when other processes used more than this share of the cores (--max-foreign)
REDONE = [0]  # turns redone for that reason


def busy_seconds():
    """(CPU seconds all processes have used on this machine, this process's own), Linux; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / tick, own.user + own.system


def alternate(f, g, repeat, inner=3):
    """Median seconds of f and g over ``repeat`` alternating turns: each turn idles
    GAP seconds (see Method), calls untimed for WARM seconds (at least once), then
    times ``inner`` calls in a row — the steady state of a training loop.  With
    ``--max-foreign``, a turn during which other processes kept more than that share of
    the cores busy is timed again (up to 5 times; the count is printed at the end)."""
    tf, tg = [], []
    for _ in range(repeat):
        for fn, times in ((f, tf), (g, tg)):
            for attempt in range(6):
                time.sleep(GAP[0])
                warm_until = time.perf_counter() + WARM[0]
                fn()
                while time.perf_counter() < warm_until:
                    fn()
                start, t_start, took = busy_seconds(), time.perf_counter(), []
                for _ in range(inner):
                    t = time.perf_counter()
                    fn()
                    took.append(time.perf_counter() - t)
                end = busy_seconds()
                if FOREIGN[0] is None or start is None or end is None or attempt == 5:
                    break
                foreign = (end[0] - start[0]) - (end[1] - start[1])  # CPU seconds of everyone else
                if foreign <= FOREIGN[0] * (time.perf_counter() - t_start) * (os.cpu_count() or 1):
                    break
                REDONE[0] += 1
            times.extend(took)
    return statistics.median(tf), statistics.median(tg)


def matmul_flops(T, N, D, H, L, mode):
    G = GATES[mode] * H
    total = 0
    for k in range(L):
        Dk = D if k == 0 else H
        total += 2 * T * N * G * (Dk + H)
    return total


def charlm_flops(T, N, V, H, L, mode, train):
    """The products of a character model's window as bptt runs them (2 flops a multiply-add): layer 0's input
    product is a gather of W_ihᵀ's rows (one-hot input: no flops, and no input gradient), the layers above it
    multiply T·N × H by H × G, every layer's recurrence T·N × H by H × G, the output layer T·N × H by H × V.
    Training adds ∂W and the input gradient of each product: 3× the forward's.  PyTorch multiplies the one-hot
    input as a dense product besides, so this is the work of the faster way, the one a ceiling should price."""
    G = GATES[mode] * H
    forward = 2 * T * N * (G * H * L + G * H * (L - 1) + H * V)
    return 3 * forward if train else forward


def priced(what, flops, ours, theirs, peak, their_name="torch"):
    """One line pricing a timed call as the layer table's columns do: its products (``flops``) at the best
    float32 GEMM rate ``peak`` (GFLOP/s) → each side's share of that rate (``ours``, ``theirs``: seconds a
    call) and the ceiling, ``theirs`` over the time of the products at that rate."""
    return (f"products of {what} done bptt's way: {flops / 1e6:,.0f} MFLOP; best sgemm rate {peak:.1f} GFLOP/s → "
            f"bptt at {100 * flops / ours / 1e9 / peak:.0f}% of it, {their_name} at "
            f"{100 * flops / theirs / 1e9 / peak:.0f}%; ceiling {theirs * peak * 1e9 / flops:.2f}× "
            f"(every product at that rate, everything else free)")


def sgemm_peak(repeat=5):
    """Best float32 GEMM rate (GFLOP/s) of a 2048³ product: (numpy's BLAS, torch's)."""
    import torch

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    c = np.empty_like(a)
    at, ct = torch.from_numpy(a), torch.from_numpy(c)
    rates = []
    for mm in (lambda: np.matmul(a, a, out=c), lambda: torch.mm(at, at, out=ct)):
        mm()
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            mm()
            ts.append(time.perf_counter() - t)
        rates.append(2 * n**3 / min(ts) / 1e9)
    return tuple(rates)


def sampling(repeat_chars, V=65, H=512, L=2):
    import torch

    ours, theirs = build("lstm", V, H, L)
    ours.eval()
    eye = np.eye(V, dtype=np.float32)
    ids = np.random.default_rng(2).integers(0, V, repeat_chars)
    xs_t = [torch.from_numpy(eye[i][None, None].copy()) for i in ids]

    def run_ours():
        ours.reset_state()
        for i in ids:
            ours.step(eye[i])

    def run_torch():
        state = None
        with torch.no_grad():
            for xt in xs_t:
                _, state = theirs(xt, state)

    a, b = alternate(run_ours, run_torch, 5)
    return a / repeat_chars, b / repeat_chars


# ---------------------------------------------------------------------------- memory (subprocess)
MEM_CHILD = r"""
import json, sys
import numpy as np
side, mode, which, (T, N, D, H, L, threads) = sys.argv[1], sys.argv[2], sys.argv[3], map(int, sys.argv[4:])
from threadpoolctl import threadpool_limits
threadpool_limits(threads)
import torch
torch.set_num_threads(threads)
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else ".")
from bench_layers import make_runners
ours_train, torch_train, ours_infer, torch_infer = make_runners(mode, T, N, D, H, L)
step = {("bptt", "train"): ours_train, ("torch", "train"): torch_train,
        ("bptt", "infer"): ours_infer, ("torch", "infer"): torch_infer}[side, which]
import gc; gc.collect()
if side == "bptt":
    import bptt.kernels as K
    K.available(mode if mode != "rnn" else "rnn_tanh", np.float32)  # compile / load kernels first
    from bptt.runtime.wavefront import run_parallel
    run_parallel([lambda: 0, lambda: 0])  # and the slices' worker thread with its compiled wait
def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
before = rss_kb("VmRSS:")
step()
after = rss_kb("VmHWM:")
print(json.dumps({"mb": (after - before) / 1024}))
"""


def peak_memory(side, mode, which, cfg, threads):
    """Growth of the peak resident set (MB) over one call of ``which`` (train or infer) in a fresh process."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "_mem_child.py")
    with open(script, "w") as f:
        f.write(MEM_CHILD)
    try:
        out = subprocess.run([sys.executable, script, side, mode, which, *map(str, cfg), str(threads)],
                             capture_output=True, text=True, check=True, cwd=here)
        return json.loads(out.stdout.strip().splitlines()[-1])["mb"]
    finally:
        if os.path.exists(script):
            os.remove(script)


# ---------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short grid (2 shapes) and fewer repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (default 5, quick 3)")
    ap.add_argument("--modes", default="lstm,gru,rnn")
    ap.add_argument("--configs", default=None,
                    help="shapes to time instead of the grid: 'T,N,D,H,L' separated by ';' (e.g. 50,50,512,512,2)")
    ap.add_argument("--passes", default="train,infer", help="which passes to time: train, infer or both")
    ap.add_argument("--torch-mkldnn", choices=("on", "off"), default="on")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-timing", action="store_true", help="skip the timing table (e.g. memory only)")
    ap.add_argument("--no-sampling", action="store_true")
    ap.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for torch (see Method)")
    ap.add_argument("--gap", type=float, default=0.3, help="idle seconds before each timed call (see Method)")
    ap.add_argument("--warm", type=float, default=0.15, help="seconds of untimed calls after the idle (see Method)")
    ap.add_argument("--max-foreign", type=float, default=None,
                    help="redo a timed turn when other processes used more than this share of the cores "
                         "during it (e.g. 0.05; Linux; see alternate)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read by libgomp when torch loads it
    GAP[0], WARM[0], FOREIGN[0] = args.gap, args.warm, args.max_foreign

    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    torch.backends.mkldnn.enabled = args.torch_mkldnn == "on"
    import bptt.kernels as K

    repeat = args.repeat or (3 if args.quick else 5)
    grid = QUICK_GRID if args.quick else GRID
    if args.configs:
        grid = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    passes = args.passes.split(",")
    modes = args.modes.split(",")
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    peak, torch_peak = sgemm_peak()
    best_peak = max(peak, torch_peak)
    emit(f"# bptt vs PyTorch {torch.__version__} (CPU, float32, {args.threads} threads, mkldnn {args.torch_mkldnn})")
    emit()
    emit(f"float32 GEMM peak measured in this run: numpy {peak:.1f}, torch {torch_peak:.1f} GFLOP/s.  Median of {repeat} alternating runs.  "
         f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, {GAP[0]} s idle and {WARM[0]} s of untimed calls before each side's turn.")
    from blas import blas_line

    emit(f"BLAS kernel: {blas_line()}.")
    emit()
    emit("| config (T, N, D, H, L) | mode | pass | ms bptt | ms torch | speed-up torch/bptt | GFLOP/s bptt | % peak "
         "| GFLOP/s torch | % peak torch | ceiling |")
    emit("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cfg in [] if args.no_timing else grid:
        for mode in modes:
            for m in (mode if mode != "rnn" else "rnn_tanh",):
                K.available(m, np.float32)  # compile outside the timing
            ot, tt, oi, ti = make_runners(mode, *cfg)
            fl = matmul_flops(*cfg, mode)
            for name, f, g, mult in (("train", ot, tt, 3), ("infer", oi, ti, 1)):
                if name not in passes:
                    continue
                a, b = alternate(f, g, repeat)
                gf, gt = mult * fl / a / 1e9, mult * fl / b / 1e9
                emit(f"| {cfg} | {mode} | {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}× | {gf:.1f} | "
                     f"{100 * gf / peak:.0f}% | {gt:.1f} | {100 * gt / peak:.0f}% | {best_peak / gt:.2f}× |")

    if FOREIGN[0] is not None:
        emit()
        emit(f"Turns timed again because other processes used more than {FOREIGN[0]:.0%} of the cores: {REDONE[0]}.")

    if not args.no_sampling:
        emit()
        emit("## Sampling, one character at a time (N = 1, 2×512 LSTM, V = 65)")
        emit()
        chars = 50 if args.quick else 200
        a, b = sampling(chars)
        emit("| | µs/char bptt | µs/char torch | speed-up |")
        emit("|---|---:|---:|---:|")
        emit(f"| LSTM.step vs nn.LSTM(x_t, state) | {a * 1e6:.0f} | {b * 1e6:.0f} | {b / a:.2f}× |")

    if not args.no_memory:
        emit()
        emit("## Peak memory of one training step and one inference forward (growth of peak RSS in a fresh subprocess, MB)")
        emit()
        emit("| config | mode | train MB bptt | train MB torch | infer MB bptt | infer MB torch |")
        emit("|---|---|---:|---:|---:|---:|")
        mem_grid = grid[1:] if not args.quick else grid[-1:]
        for cfg in mem_grid:
            for mode in ("lstm",) if args.quick else modes:
                mb = [peak_memory(side, mode, which, cfg, args.threads)
                      for which in ("train", "infer") for side in ("bptt", "torch")]
                emit(f"| {cfg} | {mode} | " + " | ".join(f"{v:.1f}" for v in mb) + " |")

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
