"""The char-LM race over several seeds: `bptt train` against the PyTorch reference
script (benchmarks/charlm_torch.py), the same split, initialisation, optimizer and
batch order for each seed, one run at a time.

    python benchmarks/charlm_race.py --data ../shared/data/tinyshakespeare.txt --out race \
        [--seeds 123 1 2] [--minutes 4] [--threads 2] [--png curves.png] [--report-only] [-- extra flags for both]

Why several seeds: the two programs compute the same training (in float64 their
losses agree to 1e-14 at step 50), but float32 rounding sends the trajectories
apart after ~100 steps, and the number of steps a run needs to reach 1.56 then
varies by ±15% from one trajectory to the next.  One pair of runs says more about
that luck than about speed; the median over seeds says which is faster.

Order: for the first seed bptt runs first, for the next PyTorch, and so on, so
that a slow spell of a shared machine does not always hit the same side.  Each
run evaluates the whole validation split every ``--eval-every`` steps (bptt also
writes its checkpoints, a sample and the plot, as a user's run does); "minutes to"
a threshold is the wall-clock time of the first evaluation at or below it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from charlm_report import load, plot_curves, reached

HERE = Path(__file__).resolve().parent
THRESHOLDS = (1.70, 1.60, 1.56)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, type=Path, help="folder for the runs (bptt_s<seed>, torch_s<seed>)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[123, 1, 2])
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", type=Path, help="validation curves of all runs against wall-clock minutes")
    ap.add_argument("--report-only", action="store_true", help="no training: tabulate and plot the runs in --out")
    ap.add_argument("extra", nargs="*", help="flags passed to both trainers (after --)")
    a = ap.parse_args(argv)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(a.threads)
    bptt_exe = str(Path(sys.executable).with_name("bptt"))
    runs = {}
    for i, seed in enumerate(a.seeds):
        order = ("bptt", "torch") if i % 2 == 0 else ("torch", "bptt")
        for side in order:
            out = a.out / f"{side}_s{seed}"
            common = ["--data", a.data, "--out", str(out), "--max-time", str(a.minutes),
                      "--eval-every", str(a.eval_every), "--seed", str(seed), *a.extra]
            if side == "torch":
                cmd = [sys.executable, str(HERE / "charlm_torch.py"), *common, "--threads", str(a.threads)]
            else:
                cmd = [bptt_exe, "train", *common, "--no-progress"]
            if not a.report_only:
                print(f"seed {seed}: {side} ...", flush=True)
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[side, seed] = load(out)

    head = ("| seed | run | best val | " + " | ".join(f"min to {t:.2f}" for t in THRESHOLDS) +
            " | steps to 1.56 | chars/s (median) | s per 1,000 steps |")
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    summary = {side: {t: [] for t in THRESHOLDS} | {"best": [], "pace": []} for side in ("bptt", "torch")}
    for seed in a.seeds:
        for side in ("bptt", "torch"):
            val, cps = runs[side, seed]
            hits = [reached(val, t) for t in THRESHOLDS]
            summary[side]["best"].append(min(v for _, _, v in val))
            for t, hit in zip(THRESHOLDS, hits):
                summary[side][t].append(hit[0] if hit else float("inf"))
            cells = [f"{h[0]:.2f}" if h else "—" for h in hits]
            steps = f"{hits[-1][1]:,}" if hits[-1] else "—"
            # wall clock per step over the whole run, evaluations included: the pace, whatever the trajectory
            minute, step, _ = val[-1]
            summary[side]["pace"].append(minute * 60 / step * 1000)
            print(f"| {seed} | {side} | {summary[side]['best'][-1]:.4f} | " + " | ".join(cells) +
                  f" | {steps} | {statistics.median(cps):,.0f} | {summary[side]['pace'][-1]:.1f} |")
    for side in ("bptt", "torch"):
        s = summary[side]
        print(f"| median | {side} | {statistics.median(s['best']):.4f} | " +
              " | ".join(f"{statistics.median(s[t]):.2f}" for t in THRESHOLDS) +
              f" | | | {statistics.median(s['pace']):.1f} |")
    b, t = summary["bptt"], summary["torch"]
    n = len(a.seeds)
    print("\nseeds where bptt reached the threshold first: " +
          ", ".join(f"{th:.2f}: {sum(x < y for x, y in zip(b[th], t[th]))} of {n}" for th in THRESHOLDS))
    print("median over seeds of PyTorch's time / bptt's time: " +
          ", ".join(f"{th:.2f}: {statistics.median(y / x for x, y in zip(b[th], t[th])):.2f}" for th in THRESHOLDS) +
          f"; pace (s per 1,000 steps): {statistics.median(y / x for x, y in zip(b['pace'], t['pace'])):.3f}")

    if a.png:
        series, labelled = [], set()
        for (side, seed), (val, _) in sorted(runs.items()):
            label = None if side in labelled else f"{'bptt' if side == 'bptt' else 'PyTorch'} ({len(a.seeds)} seeds)"
            labelled.add(side)
            series.append((label, val, {"ls": "-" if side == "bptt" else "--", "lw": 1.2, "alpha": 0.8,
                                        "color": "C0" if side == "bptt" else "C1"}))
        plot_curves(series, a.png, THRESHOLDS, (1.5, 2.0))


if __name__ == "__main__":
    main()
