"""Issue 22's numbers: character vs byte models, a word model's perplexity, truncation strategies, and
how much of a training step a 30k-word output layer takes.  Every run goes through the real ``bptt``
commands (subprocesses of this interpreter), so the figures are what a user would get.

    python benchmarks/units_report.py charbyte   --minutes 10   # (a) nats per character, char vs byte
    python benchmarks/units_report.py words      --minutes 10   # (b) word perplexity, train/valid/test
    python benchmarks/units_report.py words      --minutes 10 --adaptive  # (b) with --adaptive-softmax
    python benchmarks/units_report.py truncation --minutes 10   # (c) fixed / variable / randomized curves
    python benchmarks/units_report.py timing                    # output layer's share of a step, V = 30k,
                                                                # full softmax against adaptive softmax
    python benchmarks/units_report.py all --minutes 1           # everything, short (checks the script)

Options: --data (default ../shared/data/tinyshakespeare.txt, or $BPTT_TINYSHAKESPEARE), --out (run
directories, default runs/units), --minutes per training run.  Results are printed as markdown.

(a) trains ``--unit char`` and ``--unit byte`` on the first 90% of tinyshakespeare (the last 10% is
    held out, ``--val-frac 0.1``), then ``bptt eval`` each best checkpoint on the held-out 10% written to
    a file: the char model's nats/char against the byte model's nats per character of the decoded text
    (total nats / (characters − 1)).  tinyshakespeare is ASCII, so bytes and characters coincide there
    and the two figures measure the same thing; on other text the byte model pays for multi-byte
    characters with more predictions.
(b) the corpus: the docstrings of Python's own standard library (``ast.get_docstring`` of every module,
    class and function of the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, test suites
    excluded, files in sorted path order), a real English-like text on every machine (PSF licence, not
    shipped: rebuilt on the fly).  Files go 80 / 10 / 10 % to train / valid / test by a seeded
    permutation, so the splits are different modules; the vocabulary (``--vocab-size``) is the training
    split's most frequent words, the rest is <unk>.  The word model's test perplexity is ``bptt eval``'s.
(c) the three ``--truncation`` strategies, same model and seed, validation loss against minutes and
    against steps in one plot (``units_truncation.png`` in --out).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",  # beside the main checkout
               _ROOT.parent.parent / "shared" / "data" / "tinyshakespeare.txt"]  # beside a worktree's folder
DEFAULT_DATA = os.environ.get("BPTT_TINYSHAKESPEARE") or str(next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0]))
CHAR_MODEL = ["--model", "lstm", "--hidden", "256", "--layers", "2", "--seq-len", "64", "--batch-size", "32",
              "--optimizer", "adam", "--lr", "2e-3", "--schedule", "constant", "--eval-every", "100",
              "--eval-windows", "40", "--sample-length", "0", "--no-progress", "--log-every", "20", "--seed", "1"]


def bptt(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bptt.cli", *map(str, args)]
    print("$ bptt " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bptt {args[0]} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return r


STEPS = 0  # --steps: also stop every run after this many steps (equal work under a varying load)


def train(out: Path, minutes: float, *args) -> Path:
    bptt("train", "--out", out, "--max-time", minutes, "--max-epochs", 1000, "--max-iters", STEPS, "--overwrite", *args)
    return out


def evaluate(ckpt: Path, data: Path) -> dict:
    return json.loads(bptt("eval", ckpt, "--data", data, "--json").stdout)


def val_curve(run: Path):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["time"] / 60, r["step"], r["val_loss"]) for r in records if "val_loss" in r]


# ---------------------------------------------------------------------------- (a) char vs byte
def charbyte(a) -> None:
    data = Path(a.data)
    raw = data.read_bytes()
    text = raw.decode("utf-8")
    held = a.out / "heldout_last10pct.txt"
    held.write_bytes(text[int(len(text) * 0.9):].encode("utf-8"))  # the split --val-frac 0.1 makes (ASCII)
    rows = []
    for unit in ("char", "byte"):
        run = train(a.out / f"charbyte_{unit}", a.minutes, "--data", data, "--unit", unit, "--val-frac", "0.1",
                    *CHAR_MODEL)
        r = evaluate(run / "best.safetensors", held)
        steps = val_curve(run)[-1][1]
        per_char = r["loss"] if unit == "char" else r["nats_per_char"]
        rows.append((unit, steps, r["loss"], r["count"], per_char))
    limit = f"{a.minutes:g} min" + (f" or {STEPS} steps" if STEPS else "")
    print(f"\n(a) char vs byte on {data.name}, {limit} each, held-out last 10% ({len(held.read_text())} chars)\n")
    print("| unit | steps | nats per unit | predicted units | nats per character | bits per character |")
    print("|---|---|---|---|---|---|")
    for unit, steps, loss, n, per_char in rows:
        print(f"| {unit} | {steps} | {loss:.4f} | {n:,} | {per_char:.4f} | {per_char / np.log(2):.4f} |")


# ---------------------------------------------------------------------------- (b) words
def docstring_corpus(seed: int = 0) -> dict[str, str]:
    """train / valid / test texts from the standard library's docstrings (see the module docstring)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    docs = []
    for p in files:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        doc = "\n".join(d.strip() for d in map(ast.get_docstring, nodes) if d and d.strip())
        if doc:
            docs.append(doc + "\n")
    order = np.random.default_rng(seed).permutation(len(docs))
    n = len(docs)
    cut = {"train": order[: int(0.8 * n)], "valid": order[int(0.8 * n) : int(0.9 * n)], "test": order[int(0.9 * n) :]}
    return {k: "".join(docs[i] for i in sorted(v)) for k, v in cut.items()}


def words(a) -> None:
    texts = docstring_corpus()
    paths = {}
    for k, t in texts.items():
        paths[k] = a.out / f"docstrings_{k}.txt"
        paths[k].write_text(t, encoding="utf-8")
    extra = ["--adaptive-softmax"] + (["--cutoffs", a.cutoffs] if a.cutoffs else []) if a.adaptive else []
    run = train(a.out / ("words_adaptive" if a.adaptive else "words"), a.minutes, *extra, "--data", paths["train"],
                "--val-data", paths["valid"],
                "--test-data", paths["test"], "--unit", "word", "--vocab-size", a.vocab_size, "--embedding", 128,
                "--hidden", 256, "--layers", 1, "--seq-len", 35, "--batch-size", 20, "--optimizer", "adam",
                "--lr", "2e-3", "--schedule", "constant", "--eval-every", 200, "--eval-windows", 50,
                "--sample-length", 0, "--no-progress", "--log-every", 20, "--seed", 1)
    val = evaluate(run / "best.safetensors", paths["valid"])
    test = evaluate(run / "best.safetensors", paths["test"])
    steps = val_curve(run)[-1][1]
    softmax = "adaptive softmax" if a.adaptive else "full softmax"
    print(f"\n(b) word LSTM (1x256, E=128, V={a.vocab_size}, {softmax}) on the stdlib docstrings, {a.minutes:g} min, "
          f"{steps} steps\n")
    print("| split | MB | words predicted | unknown (<unk>) | perplexity per word |")
    print("|---|---|---|---|---|")
    print(f"| train | {len(texts['train'].encode()) / 1e6:.2f} | | | |")
    for name, r in (("valid", val), ("test", test)):
        print(f"| {name} | {len(texts[name].encode()) / 1e6:.2f} | {r['words']:,} | {r['unknown_count']:,} "
              f"({r['unknown_count'] / r['words']:.1%}) | {r['perplexity']:.1f} |")


# ---------------------------------------------------------------------------- (c) truncation
def truncation(a) -> None:
    curves = {}
    for strategy in ("fixed", "variable", "randomized"):
        run = train(a.out / f"trunc_{strategy}", a.minutes, "--data", a.data, "--truncation", strategy,
                    *CHAR_MODEL)
        curves[strategy] = val_curve(run)
    limit = f"{a.minutes:g} min" + (f" or {STEPS} steps" if STEPS else "")
    print(f"\n(c) truncation strategies on {Path(a.data).name}, {limit} each (val loss over 40 windows)\n")
    print("| truncation | steps | minutes | last val (nats/char) | best val |")
    print("|---|---|---|---|---|")
    for s, c in curves.items():
        print(f"| {s} | {c[-1][1]} | {c[-1][0]:.1f} | {c[-1][2]:.4f} | {min(v for *_, v in c):.4f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for s, c in curves.items():
        m, st, v = zip(*c)
        axes[0].plot(m, v, marker=".", label=s)
        axes[1].plot(st, v, marker=".", label=s)
    axes[0].set_xlabel("minutes")
    axes[1].set_xlabel("steps")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"--truncation on {Path(a.data).name} ({limit} each)")
    fig.tight_layout()
    png = a.out / "units_truncation.png"
    fig.savefig(png, dpi=100)
    print(f"\nplot: {png}")


# ---------------------------------------------------------------------------- output layer timing
def zipf_ids(rng, V: int, shape) -> np.ndarray:
    """Word ids drawn with p(k) ∝ 1/(k + 1): id 0 the most frequent, as a frequency-sorted vocabulary of
    real text (Zipf's law) — what an adaptive softmax is built for."""
    p = 1.0 / np.arange(1, V + 1)
    return rng.choice(V, size=shape, p=p / p.sum())


def timing(a) -> None:
    """One training step of a word LSTM (E=256, H=256, 1 layer, T=35, N=20) at V = 30,000, and its output
    layer alone on the same hidden states, for the full softmax (decoder forward, cross-entropy, decoder
    backward) and the adaptive softmax (forward on each target's cluster, backward).  The adaptive one's
    cost depends on where the targets fall: Zipf-distributed ids (realistic) and uniform ids (its worst
    case: two thirds of the targets in the largest cluster)."""
    from bptt.lm.model import CharLM, CharLMConfig, default_cutoffs
    from bptt.nn.losses import cross_entropy

    V, T, N, H = a.timing_vocab, 35, 20, 256
    rng = np.random.default_rng(0)
    cutoffs = [int(c) for c in a.cutoffs.split(",")] if a.cutoffs else default_cutoffs(V)
    full = CharLM(CharLMConfig(V, "lstm", H, 1, embedding=H), rng=0)
    adaptive = CharLM(CharLMConfig(V, "lstm", H, 1, embedding=H, adaptive_softmax=True, cutoffs=cutoffs), rng=0)
    h = rng.standard_normal((T, N, H)).astype(np.float32)
    targets = {"zipf": zipf_ids(rng, V, (T, N)), "uniform": rng.integers(V, size=(T, N))}
    x = zipf_ids(rng, V, (T, N))

    def step(model, y):
        def run():
            model.zero_grad()
            _, d, _ = model.loss(x, y)
            model.backward(d)
        return run

    def full_output(y):
        def run():
            full.zero_grad()
            _, d = cross_entropy(full.decoder(h), y)
            full.decoder.backward(d)
        return run

    def adaptive_output(y):
        def run():
            adaptive.zero_grad()
            adaptive.decoder(h.reshape(-1, H), y.reshape(-1))
            adaptive.decoder.backward()
        return run

    cases = {("full softmax", "any"): (step(full, targets["zipf"]), full_output(targets["zipf"]))}
    for kind, y in targets.items():
        cases[(f"adaptive {cutoffs}", kind)] = (step(adaptive, y), adaptive_output(y))
    funcs = [f for pair in cases.values() for f in pair]
    for f in funcs:  # warm up
        f()
    times = {f: [] for f in funcs}
    for _ in range(a.timing_rounds):  # alternating, so that a busy moment of the machine hits every case
        for f in funcs:
            t0 = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - t0)

    def madds(y):
        """Multiply-adds per token of the output layer's forward, by arithmetic: full H·V; adaptive
        H·(S + C) for every token plus d_i·(H + V_i) for a token of cluster i."""
        if y is None:
            return H * V
        edges = [*cutoffs, V]
        per = H * (cutoffs[0] + len(cutoffs))
        for i in range(len(cutoffs)):
            share = np.mean((y >= edges[i]) & (y < edges[i + 1]))
            per += share * int(H // 4.0 ** (i + 1)) * (H + edges[i + 1] - edges[i])
        return per

    lstm = 4 * H * (H + H)
    print(f"\n(d) V={V:,}, E=H=256, T={T}, N={N}, float32, min of {a.timing_rounds} alternating rounds "
          f"(noisy on a shared machine)\n")
    print("| output layer | targets | training step (ms) | output layer alone (ms) | its share | "
          "output multiply-adds per token | their share of the step's |")
    print("|---|---|---|---|---|---|---|")
    for (name, kind), (f_step, f_out) in cases.items():
        t_step, t_out = min(times[f_step]), min(times[f_out])
        m = madds(None if kind == "any" else targets[kind])
        print(f"| {name} | {kind} | {t_step * 1e3:.1f} | {t_out * 1e3:.1f} | {t_out / t_step:.0%} | "
              f"{m / 1e6:.2f} M | {m / (m + lstm):.0%} |")
    y = targets["zipf"]
    edges = [0, *cutoffs, V]
    shares = ", ".join(f"{np.mean((y >= edges[i]) & (y < edges[i + 1])):.0%}" for i in range(len(edges) - 1))
    print(f"\nZipf targets in the head / each cluster: {shares}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["charbyte", "words", "truncation", "timing", "all"])
    p.add_argument("--data", default=DEFAULT_DATA, help="tinyshakespeare.txt")
    p.add_argument("--out", type=Path, default=Path("runs/units"))
    p.add_argument("--minutes", type=float, default=10.0, help="per training run")
    p.add_argument("--vocab-size", type=int, default=10000, help="(b): word vocabulary, <unk> and <eos> included")
    p.add_argument("--timing-vocab", type=int, default=30000)
    p.add_argument("--timing-rounds", type=int, default=9)
    p.add_argument("--adaptive", action="store_true", help="(b): train the word model with --adaptive-softmax")
    p.add_argument("--cutoffs", default="", help="(b) with --adaptive, and timing: the adaptive softmax's cutoffs "
                   "(default: V/15,V/3)")
    p.add_argument("--eval-every", type=int, default=100, help="(a), (c): steps between validations")
    p.add_argument("--steps", type=int, default=0, help="also stop each run after this many steps (0 = time only): "
                   "on a shared machine equal steps compare fairer than equal minutes")
    a = p.parse_args()
    global STEPS
    STEPS = a.steps
    CHAR_MODEL[CHAR_MODEL.index("--eval-every") + 1] = str(a.eval_every)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, f in (("charbyte", charbyte), ("words", words), ("truncation", truncation), ("timing", timing)):
        if a.what in (name, "all"):
            f(a)


if __name__ == "__main__":
    main()
