"""The exported char model in ONNX Runtime against bptt's own sampler and PyTorch's, at batch 1.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_onnx.py [--hidden 512] [--layers 2]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_onnx.py --model transformer

For a char LSTM (V = 65, one-hot input, random weights — the speed does not depend on them) it prints:
the time to export the one-step and the full-sequence graphs and their file sizes; then the time per
character of generating at batch 1 — one step of the model per character, the state carried — for
bptt's ``CharLM.step``, ONNX Runtime on the one-step graph, and ``torch.nn.LSTM`` + ``nn.Linear`` on
the same weights under ``torch.inference_mode``, all with the same number of threads, alternating,
medians of --rounds rounds of --chars characters.  Needs the onnx extra and torch.

``--model transformer``: a TransformerLM (4 layers, d_model 128, 4 heads, context 128, V = 65, random
weights), greedy generation of --chars characters from position 0 (fewer than the context): bptt's
``step`` (its key/value cache), ONNX Runtime on the step graph (the cache fed back) and on the
sequence graph (the prefix run again per character), and torch's ``nn.TransformerEncoder`` re-running
the prefix (it has no cache; the model of ``bench_transformer.py``), all producing the same characters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from blas import blas_line


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--chars", type=int, default=300, help="characters per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=("lstm", "transformer"), default="lstm")
    a = p.parse_args()
    if a.model == "transformer":
        return transformer(a)

    import torch

    import bptt.onnx as bo
    from bptt.lm.data import Vocab
    from bptt.lm.model import CharLM, CharLMConfig
    from bptt.onnx.runtime import load_charlm

    torch.set_num_threads(a.threads)
    print(f"BLAS: {blas_line()}; threads {a.threads}")

    V, H, L = a.vocab, a.hidden, a.layers
    model = CharLM(CharLMConfig(V, "lstm", H, L), rng=0)
    model.eval()
    vocab = Vocab([chr(33 + i) for i in range(V)])
    paths = export_both(bo.export_charlm, model, vocab)
    ort, _, _ = load_charlm(paths["step"], threads=a.threads)

    sd = {k: torch.tensor(v) for k, v in model.state_dict().items()}
    tl = torch.nn.LSTM(V, H, L)
    tl.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("rnn.")})
    tdec = torch.nn.Linear(H, V)
    tdec.load_state_dict({"weight": sd["decoder.weight"], "bias": sd["decoder.bias"]})
    eye = torch.eye(V)

    ids = np.random.default_rng(0).integers(0, V, a.chars)

    def run_bptt():
        model.reset_state()
        with model.blas_scope(1, 1):
            for i in ids:
                model.step(np.array([i]))

    def run_ort():
        ort.reset_state()
        for i in ids:
            ort.step(np.array([i]))

    def run_torch():
        state = None
        with torch.inference_mode():
            for i in ids:
                h, state = tl(eye[int(i)].view(1, 1, V), state)
                tdec(h[0])

    runs = {"bptt": run_bptt, "onnxruntime": run_ort, "torch": run_torch}
    for f in runs.values():  # warm up (compilation, allocation)
        f()
    report(runs, a.rounds, a.chars,
           f"per character at batch 1, {L}x{H} LSTM, V={V} (median of {a.rounds} x {a.chars} characters)")


def export_both(export, model, vocab):
    """Export ``model`` as its step and its sequence graph into a temporary folder, printing the time each
    export took and the file's size → {graph: path}."""
    tmp, paths = tempfile.mkdtemp(), {}
    for graph in ("step", "sequence"):
        paths[graph] = path = os.path.join(tmp, f"{graph}.onnx")
        t0 = time.perf_counter()
        export(model, vocab, path, graph=graph)
        dt = time.perf_counter() - t0
        print(f"export {graph:8s} graph: {dt:.2f} s, {os.path.getsize(path) / 1e6:.1f} MB ({model.num_parameters():,} parameters)")
    return paths


def report(runs, rounds, chars, title):
    """Time every run (each making ``chars`` characters) ``rounds`` times, the sides alternating after 0.2 s
    of idle, and print each side's median time per character and PyTorch's over it."""
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for name, f in runs.items():
            time.sleep(0.2)
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) / chars)
    print(f"\n{title}:")
    base = statistics.median(times["torch"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:12s} {m * 1e6:8.1f} us/char  {1 / m:9,.0f} chars/s  torch/this {base / m:5.2f}x"
              f"  (range {min(ts) * 1e6:.1f}-{max(ts) * 1e6:.1f})")


def transformer(a):
    import torch

    import bptt.onnx as bo  # noqa: F401  (the extra's check)
    from bench_transformer import build_generation, greedy
    from bptt.lm.data import Vocab
    from bptt.onnx.runtime import load_charlm
    from bptt.onnx.transformer_lm import export_transformer_lm

    torch.set_num_threads(a.threads)
    print(f"BLAS: {blas_line()}; threads {a.threads}")
    n = min(a.chars, 127)
    bptt_gen, torch_gen, same, lm = build_generation(n, C=128, return_model=True)
    vocab = Vocab([chr(33 + i) for i in range(lm.vocab_size)])
    sessions = {graph: load_charlm(path, threads=a.threads)[0]
                for graph, path in export_both(export_transformer_lm, lm, vocab).items()}
    runs = {"bptt": bptt_gen, "ort step": lambda: greedy(sessions["step"], n),
            "ort sequence": lambda: greedy(sessions["sequence"], n), "torch": torch_gen}
    outs = {name: f() for name, f in runs.items()}  # warm up, and the characters to compare
    agree = same and all(o == outs["bptt"] for o in outs.values())
    report(runs, a.rounds, n, f"per character at batch 1, greedy, {n} characters from position 0, transformer 4x128, "
                              f"context 128 (median of {a.rounds} rounds; the same characters on every side: {agree})")


if __name__ == "__main__":
    main()
