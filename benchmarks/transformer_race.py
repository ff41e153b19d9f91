"""nanoGPT's laptop-CPU configuration on both sides: `bptt train --model transformer` against the
PyTorch reference (benchmarks/transformer_torch.py), the same split, initial weights, optimizer,
schedule, clipping and batch order for each seed, one run at a time.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/transformer_race.py \
        --data /work/shared/data/tinyshakespeare.txt --out race_tf [--seeds 123] [--threads 2] \
        [--max-iters 2000] [--png curves.png] [--report-only]

The configuration (nanoGPT's README, "I only have a macbook": ``config/train_shakespeare_char.py``
with ``--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0``; the config file and train.py's defaults give lr 1e-3,
cosine decay to min_lr 1e-4 at lr_decay_iters, warmup_iters 100, weight_decay 0.1, beta1 0.9,
beta2 0.99, grad_clip 1.0 (global norm), eval_interval 250):

    4 layers, 4 heads, d_model 128, context 64, batch 12, 2,000 steps, dropout 0,
    AdamW lr 1e-3, cosine to 1e-4 after 100 warm-up steps, weight decay 0.1, clip norm 1.0

Differences from nanoGPT, the same on both sides here (they are bptt's):
* beta2 0.999 (bptt's AdamW has no beta2 option; nanoGPT uses 0.99);
* weight decay on every parameter (nanoGPT decays only the ≥2-D ones: not biases, LayerNorms);
* warm-up lr·(t+1)/100 (nanoGPT: lr·(t+1)/101), then the same half cosine;
* the model has biases (nanoGPT's default bias=False), a GELU MLP of 4·d_model, learned positions,
  and an untied output layer (nanoGPT ties it to the token embedding);
* batches are bptt's TBPTT windows (12 contiguous streams read in order), not random windows;
  validation is the whole held-out 10 % (the end of the text), not 20 random batches.

Order alternates between seeds (bptt first for the first seed) so a slow spell of a shared machine
does not always hit the same side.  The table gives the best validation loss, the minutes to reach
each threshold and the pace (seconds per 1,000 steps, evaluations included).
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
THRESHOLDS = (2.2, 2.0, 1.9)
NANOGPT_LAPTOP = ["--layers", "4", "--heads", "4", "--d-model", "128", "--seq-len", "64", "--batch-size", "12",
                  "--dropout", "0", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.1",
                  "--schedule", "cosine", "--warmup-iters", "100", "--min-lr", "1e-4", "--grad-clip", "1",
                  "--clip-mode", "norm"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, type=Path, help="folder for the runs (bptt_s<seed>, torch_s<seed>)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[123])
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", type=Path, help="validation curves of all runs against wall-clock minutes")
    ap.add_argument("--report-only", action="store_true", help="no training: tabulate and plot the runs in --out")
    a = ap.parse_args(argv)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(a.threads)
    bptt_exe = str(Path(sys.executable).with_name("bptt"))
    runs = {}
    for i, seed in enumerate(a.seeds):
        for side in ("bptt", "torch") if i % 2 == 0 else ("torch", "bptt"):
            out = a.out / f"{side}_s{seed}"
            common = ["--data", a.data, "--out", str(out), "--max-iters", str(a.max_iters),
                      "--eval-every", str(a.eval_every), "--seed", str(seed), *NANOGPT_LAPTOP]
            if side == "torch":
                cmd = [sys.executable, str(HERE / "transformer_torch.py"), *common, "--threads", str(a.threads)]
            else:
                cmd = [bptt_exe, "train", "--model", "transformer", *common, "--no-progress", "--overwrite",
                       "--sample-length", "0"]
            if not a.report_only:
                print(f"seed {seed}: {side} ...", flush=True)
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[side, seed] = load(out)

    head = ("| seed | run | best val | last val | " + " | ".join(f"min to {t:.2f}" for t in THRESHOLDS) +
            " | chars/s (median) | s per 1,000 steps |")
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    pace = {"bptt": [], "torch": []}
    for seed in a.seeds:
        for side in ("bptt", "torch"):
            val, cps = runs[side, seed]
            cells = [f"{h[0]:.2f}" if h else "—" for h in (reached(val, t) for t in THRESHOLDS)]
            minute, step, last = val[-1]
            pace[side].append(minute * 60 / step * 1000)
            print(f"| {seed} | {side} | {min(v for _, _, v in val):.4f} | {last:.4f} | " + " | ".join(cells) +
                  f" | {statistics.median(cps):,.0f} | {pace[side][-1]:.1f} |")
    print("\nmedian over seeds of PyTorch's pace / bptt's pace (> 1: bptt faster): "
          f"{statistics.median(t / b for b, t in zip(pace['bptt'], pace['torch'])):.3f}")
    if a.png:
        series = [(f"{'bptt' if side == 'bptt' else 'PyTorch'} seed {seed}", val,
                   {"ls": "-" if side == "bptt" else "--", "lw": 1.2, "color": "C0" if side == "bptt" else "C1"})
                  for (side, seed), (val, _) in sorted(runs.items())]
        plot_curves(series, a.png, THRESHOLDS, (1.4, 3.5))


if __name__ == "__main__":
    main()
