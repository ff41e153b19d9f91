"""End-to-end training throughput: `bptt train` against the PyTorch reference
script (benchmarks/charlm_torch.py) on the same corpus and configuration.

    python benchmarks/train_throughput.py --data ../shared/data/tinyshakespeare.txt [--threads 2]
        [--rounds 3] [--seconds 40] [-- extra flags for both, e.g. --hidden 512 --seq-len 100]

Method: the two commands run one at a time, alternating (PyTorch, bptt, PyTorch,
bptt, ...) for ``--rounds`` rounds of ``--seconds`` each, so that slow drifts
of a shared machine hit both; no evaluation during the runs.  Each run logs
training characters per second every 10 steps (training time only); a run's
figure is the median of those lines after the first three (start-up,
compilation, first touch of memory), and the result is the median over rounds.
Each round also gives a ratio, bptt's figure over the PyTorch run just before it;
the median of those per-round ratios is printed too: when the machine's speed
drifts during the run (both sides' rates moved by a third in one run of row E5),
it compares runs minutes apart less often than the ratio of the two medians does.
Threads: ``--threads`` for both (OMP/MKL/OpenBLAS variables and the torch
script's ``--threads``; bptt's own BLAS follows OPENBLAS_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd, env, out_dir):
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # bptt's trainer logs "items_per_sec" (characters, bytes or words: the unit's items); the torch script "chars_per_sec"
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r.get("items_per_sec", r.get("chars_per_sec")) for r in records]
    rates = [x for x in rates if x is not None]
    if len(rates) < 5:
        raise SystemExit(f"{cmd[0]}: only {len(rates)} throughput lines in {out_dir}; give it more --seconds")
    return statistics.median(rates[3:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("extra", nargs="*", help="flags passed to both trainers (after --)")
    a = ap.parse_args(argv)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(a.threads)
    minutes = str(a.seconds / 60)
    bptt_exe = str(Path(sys.executable).with_name("bptt"))
    results = {"torch": [], "bptt": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for side in ("torch", "bptt"):
                out = Path(tmp) / f"{side}{r}"
                common = ["--data", a.data, "--out", str(out), "--max-time", minutes, "--eval-every", "1000000", *a.extra]
                if side == "torch":
                    cmd = [sys.executable, str(HERE / "charlm_torch.py"), *common, "--threads", str(a.threads)]
                else:
                    cmd = [bptt_exe, "train", *common, "--no-progress"]
                cps = run(cmd, env, out)
                results[side].append(cps)
                print(f"round {r + 1} {side:5s} {cps:10,.0f} chars/s", flush=True)
    t, b = statistics.median(results["torch"]), statistics.median(results["bptt"])
    paired = [y / x for x, y in zip(results["torch"], results["bptt"])]  # each round: bptt over the torch run before it
    print(f"\n| threads | PyTorch chars/s | bptt chars/s | bptt / PyTorch | median of the rounds' ratios |\n"
          f"|---:|---:|---:|---:|---:|\n| {a.threads} | {t:,.0f} | {b:,.0f} | {b / t:.2f}× | {statistics.median(paired):.2f}× |")
    print(f"(median of {a.rounds} alternating runs of {a.seconds:.0f} s; per round: "
          f"torch {', '.join(f'{x:,.0f}' for x in results['torch'])}; bptt {', '.join(f'{x:,.0f}' for x in results['bptt'])}; "
          f"ratios {', '.join(f'{x:.2f}' for x in paired)})")


if __name__ == "__main__":
    main()
