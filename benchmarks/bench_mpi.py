"""Data-parallel training over MPI: what one gradient Allreduce costs here, and a model of scaling.

    python benchmarks/bench_mpi.py [--quick] [--json FILE]

Two parts, run in well under a minute:

1. Measured, on this machine: ``mpiexec -n 2`` ranks time ``MPI_Allreduce`` (in place, float32,
   sum) of one flat buffer from 1 KB to 32 MB (bptt.dist reduces all gradients as one such
   buffer), the median of several calls after warm-up.  A least-squares line t(n) = α + n·β is
   fitted to the (bytes, seconds) pairs.  Both ranks share one node, so this is MPICH's
   shared-memory path: it says what the reduction itself costs, not what a network costs.
   (The fit is in relative error; the line is rough: times per byte grow past the caches.)
   Then one training step (forward + backward) of each model is timed in one process.

2. A MODEL, not a measurement: the scaling efficiency of data parallelism on K nodes (one rank
   per node, a fixed batch per rank: weak scaling) over a network, with a ring Allreduce:

       t_ring(K, n) = 2 (K − 1) · α_net + 2 (K − 1) / K · n / B
       efficiency(K) = t_step / (t_step + t_ring(K, n))

   where n is the gradient size in bytes (float32), B the link bandwidth (10 or 100 Gb/s, taken
   as fully usable), α_net a per-message latency (assumed: 30 µs for 10 Gb/s Ethernet with TCP,
   3 µs for a 100 Gb/s RDMA fabric), and t_step the measured step time of this machine's node
   (2 cores).  Assumptions: no overlap of communication with the backward pass (bptt reduces
   once, after backward), the reduction's arithmetic and the buffer packing free, nodes as fast
   as this one, no stragglers, no contention.  Real runs will do worse than the table where
   these fail (a slower node sets everyone's pace).

Timings on a shared machine are noisy: read the measured figures as ±20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = [("2x128", 2, 128), ("2x512", 2, 512), ("1x1024", 1, 1024)]
VOCAB, SEQ, BATCH = 100, 50, 32  # per-rank batch of the step timed (T = 50, N = 32 streams)
LINKS = [("10 Gb/s", 10e9 / 8, 30e-6), ("100 Gb/s", 100e9 / 8, 3e-6)]  # (name, bytes/s, assumed α_net)
NODES = [2, 4, 8, 16, 32, 64]


# ============================================================================ part 1: measured
def worker(quick: bool) -> None:
    """Under mpiexec: time Allreduce per message size; rank 0 prints one JSON line."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    sizes = [2**k for k in range(10, 26, 2 if quick else 1)]  # bytes: 1 KB ... 32 MB
    results = []
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, np.float32)
        for _ in range(3):  # warm-up: first-touch pages, MPICH's buffers
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times = []
        budget = time.perf_counter() + (0.15 if quick else 0.4)
        while len(times) < 5 or (time.perf_counter() < budget and len(times) < 2000):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t0)
        slowest = comm.allreduce(float(np.median(times)), op=MPI.MAX)  # the step waits for the slower rank
        results.append((nbytes, slowest))
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "library": MPI.Get_library_version().splitlines()[0],
                          "allreduce": results}), flush=True)


def measure_allreduce(quick: bool) -> dict:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", "2", sys.executable, __file__, "--worker"]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fit_line(points) -> tuple[float, float]:
    """t = α + n·β over (n, t) pairs, least squares in *relative* error (each row divided by its t).

    The sizes span four decades: a plain fit would follow the 32 MB point alone (and gave a negative α).
    Returns (α seconds, β seconds per byte), α clipped at 0.
    """
    n = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    A = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    if alpha < 0:  # the line through the origin instead
        alpha, beta = 0.0, float(np.sum(n / t) / np.sum((n / t) ** 2))
    return float(alpha), float(beta)


def measure_steps(quick: bool) -> dict:
    """Median seconds of one forward + backward step of each model (float32, this process's threads)."""
    from bptt.lm.model import CharLM, CharLMConfig

    rng = np.random.default_rng(0)
    out = {}
    for name, layers, hidden in MODELS:
        model = CharLM(CharLMConfig(VOCAB, "lstm", hidden, layers, dtype="float32"), rng=0)
        x = rng.integers(0, VOCAB, size=(SEQ, BATCH))
        y = rng.integers(0, VOCAB, size=(SEQ, BATCH))
        times = []
        for k in range(2 if quick else 4):
            model.zero_grad()
            t0 = time.perf_counter()
            with model.blas_scope(SEQ, BATCH):
                _, dlogits, _ = model.loss(x, y)
                model.backward(dlogits)
            if k:  # the first call compiles and warms up
                times.append(time.perf_counter() - t0)
        out[name] = {"params": model.num_parameters(), "step_seconds": float(np.median(times))}
    return out


# ============================================================================ part 2: the model
def ring_seconds(k: int, nbytes: float, bandwidth: float, latency: float) -> float:
    return 2 * (k - 1) * latency + 2 * (k - 1) / k * nbytes / bandwidth


def report(measured: dict, steps: dict) -> str:
    lines = []
    ar = measured["allreduce"]
    alpha, beta = fit_line(ar)
    lines.append(f"MEASURED on this machine ({measured['ranks']} ranks, one node, {measured['library']}; noisy, ±20 %)")
    lines.append(f"{'bytes':>12} {'Allreduce s':>12}")
    for nbytes, sec in ar:
        lines.append(f"{nbytes:>12,} {sec:>12.2e}")
    lines.append(f"fit t = α + n·β: α = {alpha * 1e6:.1f} µs, β = {beta * 1e9:.3f} ns/byte "
                 f"(≈ {1 / beta / 1e9:.2f} GB/s through the shared-memory reduction)")
    lines.append("")
    lines.append(f"one training step, forward + backward, T={SEQ}, N={BATCH} per rank, float32, this node:")
    for name, s in steps.items():
        nbytes = 4 * s["params"]
        local = alpha + beta * nbytes
        lines.append(f"  {name:>7}: {s['params']:>10,} parameters = {nbytes / 2**20:6.2f} MB of gradient; "
                     f"step {s['step_seconds'] * 1e3:7.1f} ms; its Allreduce here (fit) {local * 1e3:6.2f} ms "
                     f"= {100 * local / s['step_seconds']:.1f} % of the step")
    lines.append("")
    lines.append("A MODEL, NOT A MEASUREMENT: weak-scaling efficiency t_step / (t_step + t_ring) on K nodes,")
    lines.append("ring Allreduce t_ring = 2(K−1)·α_net + 2(K−1)/K · n/B, no overlap, identical nodes, no stragglers")
    for link, bandwidth, latency in LINKS:
        lines.append(f"{link} (α_net assumed {latency * 1e6:g} µs):")
        lines.append(f"  {'model':>7} " + " ".join(f"{'K=' + str(k):>7}" for k in NODES))
        for name, s in steps.items():
            nbytes, t = 4 * s["params"], s["step_seconds"]
            eff = [t / (t + ring_seconds(k, nbytes, bandwidth, latency)) for k in NODES]
            lines.append(f"  {name:>7} " + " ".join(f"{100 * e:6.1f}%" for e in eff))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--json", help="also write the measured figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.quick)
        return 0
    if any(v in os.environ for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        p.error("run this script without mpiexec: it starts its own 2-rank job")
    t0 = time.time()
    measured = measure_allreduce(args.quick)
    steps = measure_steps(args.quick)
    print(report(measured, steps))
    print(f"\n(measured in {time.time() - t0:.0f} s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    if args.json:
        Path(args.json).write_text(json.dumps({"measured": measured, "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
