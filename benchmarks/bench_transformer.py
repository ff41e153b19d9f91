"""bptt vs PyTorch on CPU: a Transformer encoder layer (training step) and causal generation.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_transformer.py [--quick] [--threads 2]

Method (as ``bench_layers.py``, whose ``alternate`` and ``sgemm_peak`` this script uses)
------
* One process, the same weights (bptt's state dict loaded into torch), float32, the same thread
  count (threadpoolctl for numpy's BLAS, ``torch.set_num_threads`` for torch).  The two sides
  alternate; each figure is the median over the alternating turns (idle gap, untimed warm-up,
  then 3 timed calls).  The header prints numpy's BLAS (threadpoolctl's ``internal_api`` and
  ``architecture``: the kernel OpenBLAS picked) and the 2048³ sgemm rate of both libraries, measured
  in the same run.  Run with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset so that OpenBLAS picks its
  own kernel for the CPU.
* layer: one ``TransformerEncoderLayer(E, h, 4E, dropout=0, activation='gelu', norm_first=True)``
  (the block of bptt's TransformerLM) on x (T, N, E) with the causal mask; train = forward + backward
  of ``Σ out ⊙ G`` including the input's gradient (torch: train mode, autograd, ``x.requires_grad_()``).
  GFLOP/s counts the matrix products only (2 flops per multiply-add): per position the four
  projections 4E² and the feed-forward 8E², per query the two attention products 2·T·E (the causal
  mask does not halve them: both libraries compute the whole square), forward; training 3×.
* language model step: a TransformerLM (bptt) and the same model in torch modules (``torch_lm``: embeddings,
  ``nn.TransformerEncoder``, linear decoder) with its weights, in train mode with the configuration's dropout:
  forward, mean cross-entropy, backward (no optimizer) on the same ids.  Their losses are compared with
  dropout off (the masks cannot be the same).  Its evaluation pass: eval mode, forward and the loss, torch under
  ``inference_mode`` (where its TransformerEncoderLayer takes its fused inference path).
* generation: a TransformerLM (4 layers, d_model 128, 4 heads, context 512, V = 65) at batch 1
  generates N_CHARS characters greedily (argmax, so both sides follow the same path).  bptt: ``step``
  with its key/value cache (one position per call).  torch: ``nn.TransformerEncoder`` with the causal
  mask run on the whole prefix at every step under ``no_grad`` in eval mode: torch's nn.Transformer
  modules have no key/value cache (``nn.MultiheadAttention`` takes the full key/value sequences on
  every call), so re-running the prefix is what they offer.  Incremental decoding in torch would
  have to be written by hand from ``F.scaled_dot_product_attention``; not done here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_layers  # noqa: E402  (alternate, sgemm_peak, GAP/WARM)
from blas import blas_line  # noqa: E402

LAYERS = [(12, 64, 128, 4), (16, 256, 384, 6)]  # (N, T, E, h)
# (T, N, layers, d_model, heads, dropout): nanoGPT's laptop configuration (row F1), and F4's 4 × 256 model
LM_STEPS = [(64, 12, 4, 128, 4, 0.0), (128, 32, 4, 256, 4, 0.1)]


def layer_flops(N, T, E):
    per_pos = 2 * (4 * E * E + 8 * E * E) + 2 * 2 * T * E
    return 3 * N * T * per_pos  # training: forward + two products per forward product


def build_layer(N, T, E, h, seed=0):
    import torch

    from bptt.nn.multihead import causal_mask
    from bptt.nn.transformer import TransformerEncoderLayer

    ours = TransformerEncoderLayer(E, h, 4 * E, dropout=0.0, activation="gelu", norm_first=True, rng=seed)
    theirs = torch.nn.TransformerEncoderLayer(E, h, 4 * E, dropout=0.0, activation="gelu", norm_first=True)
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()})
    theirs.train()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, N, E)).astype(np.float32)
    G = rng.standard_normal((T, N, E)).astype(np.float32)
    mask = causal_mask(T)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    Gt = torch.from_numpy(G.copy())
    tmask = torch.nn.Transformer.generate_square_subsequent_mask(T)

    def ours_train():
        ours.zero_grad()
        ours.forward(x, src_mask=mask, is_causal=True)
        ours.backward(G)

    def torch_train():
        theirs.zero_grad()
        xt.grad = None
        (theirs(xt, src_mask=tmask, is_causal=True) * Gt).sum().backward()

    # the same numbers (so the timings compare the same work)
    ours.zero_grad()
    y = ours.forward(x, src_mask=mask, is_causal=True)
    dx = ours.backward(G)
    torch_train()
    err_y = np.abs(y - theirs(xt, src_mask=tmask, is_causal=True).detach().numpy()).max()
    err_dx = np.abs(dx - xt.grad.numpy()).max() / np.abs(dx).max()
    return ours_train, torch_train, max(err_y, err_dx)


def greedy(model, n_chars):
    """``n_chars`` ids generated greedily at batch 1 from id 0 by ``model.step`` (a TransformerLM, or its
    ONNX Runtime wrapper: bench_onnx.py), after ``reset_state()``."""
    model.reset_state()
    c, out = 0, []
    for _ in range(n_chars):
        c = int(np.argmax(model.step(np.array([c]))[0]))
        out.append(c)
    return out


def torch_lm(lm):
    """bptt's TransformerLM as PyTorch modules with its weights: token + learned position embeddings (dropout),
    ``nn.TransformerEncoder`` of pre-norm GELU layers with the final LayerNorm, a linear decoder;
    forward (T, N) ids → (T, N, V) logits under the causal mask."""
    import torch

    nn, c = torch.nn, lm.config
    V, E, C = c.vocab_size, c.d_model, c.context

    class TorchLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, E)
            self.pos = nn.Embedding(C, E)
            self.drop = nn.Dropout(c.dropout)
            layer = nn.TransformerEncoderLayer(E, c.heads, 4 * E, c.dropout, "gelu", norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, c.layers, norm=nn.LayerNorm(E), enable_nested_tensor=False)
            self.decoder = nn.Linear(E, V)

        def forward(self, x):  # x (T, N)
            T = x.shape[0]
            e = self.drop(self.embed(x) + self.pos(torch.arange(T))[:, None])
            mask = nn.Transformer.generate_square_subsequent_mask(T)
            return self.decoder(self.encoder(e, mask=mask, is_causal=True))

    tm = TorchLM()
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in lm.state_dict().items()})
    return tm


def _lm_pair(T, N, L, E, h, dropout, seed, V):
    """A TransformerLM, the same model in torch modules (``torch_lm``), and ids and targets (T, N) for both:
    → (lm, tm, ids, targets, a function giving torch's mean cross-entropy of tm's logits on them)."""
    import torch

    from bptt.lm.transformer import TransformerLM, TransformerLMConfig

    lm = TransformerLM(TransformerLMConfig(V, layers=L, d_model=E, heads=h, context=T, dropout=dropout), rng=seed)
    tm = torch_lm(lm)
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, V, (T, N)), rng.integers(0, V, (T, N))
    tids, ttargets = torch.from_numpy(ids), torch.from_numpy(targets)

    def torch_loss():
        return torch.nn.functional.cross_entropy(tm(tids).reshape(-1, V), ttargets.reshape(-1))

    return lm, tm, ids, targets, torch_loss


def build_lm_step(T, N, L, E, h, dropout, seed=0, V=65):
    """A TransformerLM training step (forward, cross-entropy, backward; no optimizer) at (T, N) on both sides,
    in train mode with ``dropout``: the same weights and ids.  Returns (ours, theirs, |loss difference|), the
    difference measured with dropout off (the masks cannot be the same)."""
    lm, tm, ids, targets, torch_loss = _lm_pair(T, N, L, E, h, dropout, seed, V)
    return step_pair(lm, lambda: lm.loss(ids, targets)[:2], tm, torch_loss)


def step_pair(ours, ours_loss, theirs, theirs_loss):
    """Training steps (zero_grad, loss, backward; no optimizer) of a bptt model, whose ``ours_loss()`` gives
    (loss, dlogits), and of a torch model, whose ``theirs_loss()`` gives the loss tensor → (ours_step,
    theirs_step, |loss difference|), the difference measured in eval mode (dropout off: the masks cannot
    be the same); both models are left in train mode."""

    def ours_step():
        ours.zero_grad()
        loss, dlogits = ours_loss()
        ours.backward(dlogits)
        return loss

    def theirs_step():
        theirs.zero_grad()
        loss = theirs_loss()
        loss.backward()
        return float(loss.detach())

    ours.eval(), theirs.eval()
    diff = abs(ours_step() - theirs_step())
    ours.train(), theirs.train()
    return ours_step, theirs_step, diff


def build_lm_eval(T, N, L, E, h, seed=0, V=65):
    """A TransformerLM's evaluation pass (eval mode: forward and the mean cross-entropy, no gradient) on both
    sides, torch under ``inference_mode``: the same weights and ids → (ours, theirs, |loss difference|)."""
    import torch

    from bptt.nn.losses import cross_entropy

    lm, tm, ids, targets, torch_loss = _lm_pair(T, N, L, E, h, 0.0, seed, V)
    lm.eval(), tm.eval()

    def ours():
        return cross_entropy(lm.forward(ids)[0], targets, need_grad=False)[0]

    def theirs():
        with torch.inference_mode():
            return float(torch_loss())

    return ours, theirs, abs(ours() - theirs())


def build_generation(n_chars, seed=0, V=65, L=4, E=128, h=4, C=512, return_model=False):
    import torch

    from bptt.lm.transformer import TransformerLM, TransformerLMConfig

    lm = TransformerLM(TransformerLMConfig(V, layers=L, d_model=E, heads=h, context=C), rng=seed)
    lm.eval()
    tm = torch_lm(lm)
    tm.eval()

    def ours_generate():
        return greedy(lm, n_chars)

    def torch_generate():
        ids = [0]
        with torch.no_grad():
            for _ in range(n_chars):
                logits = tm(torch.tensor(ids)[:, None])
                ids.append(int(logits[-1, 0].argmax()))
        return ids[1:]

    same = ours_generate() == torch_generate()
    if return_model:  # bench_onnx.py exports this model
        return ours_generate, torch_generate, same, lm
    return ours_generate, torch_generate, same


def start(args, title, note=""):
    """The run's set-up and header, shared with bench_seq2seq.py: the idle gap and warm-up of
    ``alternate``, ``args.threads`` threads on both sides, the BLAS kernel and both libraries' sgemm
    rate printed.  Returns the alternating turns per figure (``args.repeat``, default 7, quick 3)."""
    bench_layers.GAP[0], bench_layers.WARM[0] = args.gap, args.warm
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    repeat = args.repeat or (3 if args.quick else 7)
    peak, torch_peak = bench_layers.sgemm_peak()
    print(f"# bptt vs PyTorch {torch.__version__}: {title} (CPU, float32, {args.threads} threads)\n")
    print(f"BLAS: {blas_line()}")
    print(f"float32 2048³ GEMM measured in this run: numpy {peak:.1f}, torch {torch_peak:.1f} GFLOP/s.  "
          f"Medians of {repeat} alternating turns.{note}\n")
    return repeat


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and 100 characters (< 60 s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="alternating turns per figure (default 7, quick 3)")
    ap.add_argument("--chars", type=int, default=None, help="characters generated (default 500, quick 100)")
    ap.add_argument("--gen-repeat", type=int, default=None, help="generation turns (default 3, quick 1)")
    ap.add_argument("--gap", type=float, default=0.3)
    ap.add_argument("--warm", type=float, default=0.15)
    ap.add_argument("--no-generation", action="store_true")
    args = ap.parse_args(argv)
    repeat = start(args, "Transformer")
    chars = args.chars or (100 if args.quick else 500)
    gen_repeat = args.gen_repeat or (1 if args.quick else 3)
    print("| layer (N, T, E, h) | ms bptt | ms torch | torch/bptt | GFLOP/s bptt | GFLOP/s torch | max diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for N, T, E, h in LAYERS:
        ot, tt, err = build_layer(N, T, E, h)
        big = N * T * E > 200_000
        a, b = bench_layers.alternate(ot, tt, repeat, inner=1 if (args.quick and big) else 3)
        fl = layer_flops(N, T, E)
        print(f"| ({N}, {T}, {E}, {h}) fwd+bwd | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}× | "
              f"{fl / a / 1e9:.1f} | {fl / b / 1e9:.1f} | {err:.1e} |", flush=True)
    print("\n| language model training step (T, N, layers × d_model, heads, dropout) | ms bptt | ms torch | "
          "torch/bptt | characters/s bptt | characters/s torch | loss diff (dropout off) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for T, N, L, E, h, p in LM_STEPS:
        ot, tt, diff = build_lm_step(T, N, L, E, h, p)
        a, b = bench_layers.alternate(ot, tt, repeat, inner=1 if args.quick else 3)
        print(f"| ({T}, {N}, {L} × {E}, {h}, {p}) | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}× | "
              f"{T * N / a:,.0f} | {T * N / b:,.0f} | {diff:.1e} |", flush=True)
    print("\n| language model evaluation pass (T, N, layers × d_model, heads); torch in inference_mode | ms bptt | "
          "ms torch | torch/bptt | loss diff |")
    print("|---|---:|---:|---:|---:|")
    for T, N, L, E, h, _ in LM_STEPS:
        ot, tt, diff = build_lm_eval(T, N, L, E, h)
        a, b = bench_layers.alternate(ot, tt, repeat, inner=1 if args.quick else 3)
        print(f"| ({T}, {N}, {L} × {E}, {h}) | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}× | {diff:.1e} |", flush=True)
    if args.no_generation:
        return
    og, tg, same = build_generation(chars)
    to, tt_ = [], []
    for _ in range(gen_repeat):
        for fn, times in ((og, to), (tg, tt_)):
            time.sleep(args.gap)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    a, b = statistics.median(to), statistics.median(tt_)
    print(f"\ngeneration, batch 1, {chars} characters, 4 layers × 128, 4 heads (greedy; same characters: {same}):")
    print(f"  bptt step() with KV cache   {a:.3f} s  ({a / chars * 1e3:.2f} ms/char)")
    print(f"  torch, whole prefix per step {b:.3f} s  ({b / chars * 1e3:.2f} ms/char)")
    print(f"  torch/bptt {b / a:.2f}×  (median of {gen_repeat}; torch's nn.Transformer modules have no KV cache)")


if __name__ == "__main__":
    main()
