"""The validation pass, bptt against PyTorch: a character model over its whole held-out split, forward only.

    python benchmarks/bench_eval.py [--data tinyshakespeare.txt] [--hidden 128 --layers 2 --model lstm] [--rounds 5]

Both sides evaluate the same model over the same windows:
- the model is bptt's ``CharLM`` with its initial weights, and torch's one-hot → ``nn.LSTM`` → ``nn.Linear``
  with those weights loaded (``charlm_torch.TorchCharLM``);
- the windows are bptt's split (the last 10%), N streams × T steps, the state carried from one window to the
  next.

bptt runs ``bptt.lm.evaluate.evaluate``, what `bptt train`'s validation and `bptt eval` run: eval mode, no
gradient. torch runs ``torch_lm_loop.evaluate``, the reference runs' evaluation (under ``torch.inference_mode``). Both are in the same process with the same
number of threads; whole passes alternate after 0.3 s of idle (see bench_layers.py on thread pools), and the
median of ``--rounds`` passes is reported with both mean losses, which must agree.  The last line prices a
pass as bench_layers.py prices a layer: its products done bptt's way (``bench_layers.charlm_flops``, forward
only) at the best float32 GEMM rate measured before the passes (numpy's or torch's 2048³ product), the
element-wise work and the loss free; PyTorch's pass over that time is the ceiling of the ratio.  Without ``--data`` the
corpus is bptt's built-in default (``bptt.lm.data.default_corpus``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from threadpoolctl import threadpool_limits

import bench_layers  # charlm_flops, priced, sgemm_peak
from blas import blas_line  # benchmarks/blas.py
import torch_lm_loop as loop
from charlm_torch import TorchCharLM, forward
from bptt.lm.data import TBPTTBatches, Vocab, default_corpus, encode_text, read_text, split_corpus
from bptt.lm.evaluate import evaluate
from bptt.lm.model import CharLM, CharLMConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="a text file (default: bptt's built-in corpus)")
    ap.add_argument("--model", default="lstm", choices=["lstm", "gru", "rnn"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    text, name = (read_text(a.data), a.data) if a.data else default_corpus()
    vocab = Vocab(text)
    _, val_ids, _ = split_corpus(encode_text(text, vocab), 0.1, 0.0)
    batches = TBPTTBatches(val_ids, a.batch_size, a.seq_len)
    V = len(vocab)
    config = CharLMConfig(vocab_size=V, hidden=a.hidden, layers=a.layers, model=a.model)
    ours = CharLM(config, rng=0)
    theirs = TorchCharLM(V, a.hidden, a.layers, a.model, 0.0, 0)
    loop.load_bptt_weights(theirs, ours.state_dict())
    torch.set_num_threads(a.threads)
    sides = {"bptt": lambda: evaluate(ours, batches), "torch": lambda: loop.evaluate(theirs, forward, batches, V)}
    times, losses = {k: [] for k in sides}, {}
    with threadpool_limits(a.threads):
        print(f"{blas_line()}; torch {torch.__version__}, {a.threads} threads")
        best_peak = max(bench_layers.sgemm_peak())  # GFLOP/s
        print(f"{name}: {len(val_ids):,} held-out characters, {len(batches)} windows of {a.seq_len} × {a.batch_size}; "
              f"{a.model} {a.layers}×{a.hidden}, V {V}\n")
        for k, fn in sides.items():  # compile, load, warm up
            losses[k] = fn()
        for _ in range(a.rounds):
            for k, fn in sides.items():
                time.sleep(0.3)
                t = time.perf_counter()
                losses[k] = fn()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| side | mean loss (nats/char) | s per pass (median) | passes |")
    print("|---|---:|---:|---:|")
    for k in sides:
        print(f"| {k} | {losses[k]:.6f} | {med[k]:.3f} | {len(times[k])} |")
    print(f"\nbptt / torch speed: {med['torch'] / med['bptt']:.2f}×")
    flops = len(batches) * bench_layers.charlm_flops(a.seq_len, a.batch_size, V, a.hidden, a.layers, a.model, train=False)
    print(bench_layers.priced("a pass", flops, med["bptt"], med["torch"], best_peak))
    if abs(losses["bptt"] - losses["torch"]) > 1e-4 * abs(losses["torch"]):
        raise SystemExit(f"the two losses differ: {losses['bptt']} against {losses['torch']}")


if __name__ == "__main__":
    main()
