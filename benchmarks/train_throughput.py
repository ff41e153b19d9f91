"""End-to-end training throughput: `bptt train` against the PyTorch reference
script (benchmarks/charlm_torch.py) on the same corpus and configuration.

    python benchmarks/train_throughput.py --data ../shared/data/tinyshakespeare.txt [--threads 2]
        [--rounds 3] [--seconds 40] [-- extra flags for both, e.g. --hidden 512 --seq-len 100]
    python benchmarks/train_throughput.py --data ../shared/data/tinyshakespeare.txt --in-process [--rounds 9] [--block 30]
        [--lstm-alone]

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

``--in-process``: both training loops in this one process instead, taking turns every
``--block`` steps (default 30) for ``--rounds`` rounds (default here 9), each turn's figure the
median time of its steps.  A step is what each trainer's loop runs per window (bptt:
``zero_grad``, the model's ``train_step`` under its ``blas_scope``, ``clip_grad_value``, the
RMSprop step; PyTorch: ``torch_lm_loop.train_step``, as the script's loop runs it), on the
same windows from the same initial weights, both models training as they go.  On a shared
machine whose speed drifts over tens of seconds (one 30 s run of the PyTorch script took 22 ms
a step and the next 29, with nothing else of ours running) the separate runs' ratio moves with
the drift; turns of about a second do not see it.  No logging, checkpoints or progress bar.
``--lstm-alone`` also times each side's recurrent layer alone (one-hot input, forward and backward with
a random ∂L/∂y) in turns of its own, and prints what the whole step's ratio would be with bptt's LSTM at
1, 1.25, 1.33 and 1.5 times PyTorch's speed and the rest of the step as measured (row E8).
The in-process table ends with the step's ceiling, as bench_layers.py prices a layer's: the products of a
step done bptt's way (``bench_layers.charlm_flops``: 3,074 MFLOP at char-rnn's defaults) at the best float32
GEMM rate measured at the start of the run (a 2048³ product, numpy's or torch's), the element-wise work,
loss and optimiser free; PyTorch's step over that time is the highest ratio the machine allows, and bptt's
GFLOP/s over the same rate is its share of the peak.
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


def in_process(a):
    """Both trainers' steps in this process, taking turns (see the module docstring); prints a table."""
    import time

    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    import bench_layers
    import torch_lm_loop as loop
    from blas import blas_line
    from bptt.lm.data import TBPTTBatches, Vocab, encode_text, read_text, split_corpus
    from bptt.lm.model import CharLM, CharLMConfig
    from bptt.nn.optim import RMSprop, clip_grad_value
    from charlm_torch import TorchCharLM, forward

    torch.set_num_threads(a.threads)
    threadpool_limits(a.threads)
    print(f"{blas_line()}; torch {torch.__version__}, {a.threads} threads")
    best_peak = max(bench_layers.sgemm_peak())  # GFLOP/s, before either side's threads have run
    text = read_text(a.data)
    vocab = Vocab(text)
    V = len(vocab)
    batches = TBPTTBatches(split_corpus(encode_text(text, vocab), 0.1, 0.0)[0], 50, 50)
    ours = CharLM(CharLMConfig(vocab_size=V, hidden=128, layers=2, model="lstm"), rng=123)
    theirs = TorchCharLM(V, 128, 2, "lstm", 0.0, 0)
    loop.load_bptt_weights(theirs, ours.state_dict())
    opt_b = RMSprop(ours, lr=2e-3, alpha=0.95)
    opt_t = torch.optim.RMSprop(theirs.parameters(), lr=2e-3, alpha=0.95, eps=1e-8)
    at = {"bptt": [0, None], "torch": [0, None]}  # each side's next window and carried state

    def bptt_step():
        k, state = at["bptt"]
        x, y = batches.batch(k)
        opt_b.zero_grad()
        with ours.blas_scope(*x.shape):
            _, state = ours.train_step(x, y, None if k == 0 else state)
        clip_grad_value(ours, 5.0)
        opt_b.step()
        at["bptt"] = [(k + 1) % len(batches), state]

    def torch_step():
        k, state = at["torch"]
        x, y = (torch.from_numpy(np.asarray(v, np.int64)) for v in batches.batch(k))
        loss, state = loop.train_step(theirs, forward, opt_t, x, y, None if k == 0 else state, V, 5.0, "value")
        loss.item()  # as the script's loop reads it every step
        at["torch"] = [(k + 1) % len(batches), state]

    steps = {"torch": torch_step, "bptt": bptt_step}
    if a.lstm_alone:  # the recurrent layer's own step besides: one-hot input, forward and backward, on the same window
        x0 = batches.batch(0)[0]
        dy = np.random.default_rng(2).standard_normal((*x0.shape, ours.rnn.out_size)).astype(np.float32)
        x_t, dy_t = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(x0, np.int64)), V).float(), torch.from_numpy(dy)

        def bptt_lstm():
            with ours.blas_scope(*x0.shape):
                ours.rnn.zero_grad()
                ours.rnn.forward(x0, one_hot=True)
                ours.rnn.backward(dy, need_input_grad=False)

        def torch_lstm():
            theirs.rnn.zero_grad()
            out, _ = theirs.rnn(x_t)
            out.backward(dy_t)

        steps |= {"torch LSTM": torch_lstm, "bptt LSTM": bptt_lstm}
    for step in steps.values():  # compilation, first touch of memory, the warm-up of both libraries
        for _ in range(a.block):
            step()
    results = {side: [] for side in steps}
    for r in range(a.rounds):
        for side, step in steps.items():
            times = []
            for _ in range(a.block):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            results[side].append(statistics.median(times))
        print(f"round {r + 1}: torch {1e3 * results['torch'][-1]:.2f} ms, bptt {1e3 * results['bptt'][-1]:.2f} ms a step",
              flush=True)
    t, b = statistics.median(results["torch"]), statistics.median(results["bptt"])
    paired = [x / y for x, y in zip(results["torch"], results["bptt"])]
    chars = batches.batch(0)[0].size
    print(f"\n| threads | PyTorch chars/s | bptt chars/s | bptt / PyTorch | median of the turns' ratios |\n"
          f"|---:|---:|---:|---:|---:|\n| {a.threads} | {chars / t:,.0f} | {chars / b:,.0f} | {t / b:.2f}× | "
          f"{statistics.median(paired):.2f}× |")
    print(f"(in one process, {a.rounds} rounds of {a.block} steps a side in turn; per round's ratio: "
          f"{', '.join(f'{x:.2f}' for x in paired)})")
    (T, N), H, L = batches.batch(0)[0].shape, ours.config.hidden, ours.config.layers
    flops = bench_layers.charlm_flops(T, N, V, H, L, "lstm", train=True)
    print(bench_layers.priced("a step", flops, b, t, best_peak, their_name="PyTorch's step"))
    if a.lstm_alone:
        m = {side: statistics.median(v) for side, v in results.items()}
        rest_b, rest_t = m["bptt"] - m["bptt LSTM"], m["torch"] - m["torch LSTM"]
        print(f"LSTM alone: bptt {1e3 * m['bptt LSTM']:.2f} ms, torch {1e3 * m['torch LSTM']:.2f} ms "
              f"({m['torch LSTM'] / m['bptt LSTM']:.2f}×); the rest of the step: bptt {1e3 * rest_b:.2f} ms, "
              f"torch {1e3 * rest_t:.2f} ms")
        lstm_flops = bench_layers.charlm_flops(T, N, 0, H, L, "lstm", train=True)  # V = 0: no output layer
        print(f"  the LSTM's products: {lstm_flops / 1e6:,.0f} MFLOP, bptt at "
              f"{100 * lstm_flops / m['bptt LSTM'] / 1e9 / best_peak:.0f}% of the best sgemm rate; the LSTM's "
              f"ceiling {m['torch LSTM'] * best_peak * 1e9 / lstm_flops:.2f}×")
        for x in (1.0, 1.25, 1.33, 1.5):  # the step's ratio if bptt's LSTM ran at x times PyTorch's speed, the rest as measured
            print(f"  with the LSTM at {x:.2f}× PyTorch's: the step at {m['torch'] / (rest_b + m['torch LSTM'] / x):.2f}×")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="default 3, or 9 with --in-process")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--in-process", action="store_true",
                    help="both training loops in this process, in turns of --block steps (char-rnn defaults only)")
    ap.add_argument("--block", type=int, default=30)
    ap.add_argument("--lstm-alone", action="store_true",
                    help="with --in-process: also time the LSTM layer's own step, and bound the step's ratio by it")
    ap.add_argument("extra", nargs="*", help="flags passed to both trainers (after --)")
    a = ap.parse_args(argv)
    a.rounds = a.rounds or (9 if a.in_process else 3)
    if a.lstm_alone and not a.in_process:
        raise SystemExit("--lstm-alone goes with --in-process")
    if a.in_process:
        if a.extra:
            raise SystemExit("--in-process runs char-rnn's defaults only; drop the extra flags")
        return in_process(a)
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
