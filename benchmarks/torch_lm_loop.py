"""The training loop of the two PyTorch reference scripts (charlm_torch.py, transformer_torch.py).

Both train a torch model that carries bptt's parameter names from bptt's initial weights, on bptt's
data pipeline (``TBPTTBatches``: window k of the epoch at step k, N contiguous streams of T
characters) with bptt's schedule (``bptt.lm.train.make_lr_schedule``, which the scripts call), so that
a bptt run and a torch run see the same numbers.
What differs between them is the model, its forward and its optimizer; the rest of the loop is here, once.

``log.jsonl`` is written as ``bptt train`` writes it: ``{"step", "train_loss", "lr",
"items_per_sec", "time", "epoch"}`` every --log-every steps and ``{"step", "time", "val_loss",
"val_bpc"}`` every --eval-every steps and at the last, so ``charlm_report.py`` and
``train_throughput.py`` read both sides alike.  The validation loss is bptt's: the whole validation
split in TBPTT windows, eval mode, summed cross-entropy / characters.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from bptt.lm.data import TBPTTBatches, Vocab, encode_text, read_text, split_corpus


def add_common_arguments(p: argparse.ArgumentParser, *, max_iters: int, eval_every: int) -> None:
    """The flags both scripts share, with the defaults that differ passed in."""
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--max-iters", type=int, default=max_iters, help="0 = --max-epochs only")
    p.add_argument("--max-epochs", type=float, default=50)
    p.add_argument("--max-time", type=float, default=0.0, help="minutes")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="as bptt train --dtype")


def load_corpus(a):
    """bptt's split and windows: (vocab, training batches, validation batches)."""
    text = read_text(a.data)
    vocab = Vocab(text)
    train_ids, val_ids, _ = split_corpus(encode_text(text, vocab), a.val_frac, 0.0)
    return vocab, TBPTTBatches(train_ids, a.batch_size, a.seq_len), TBPTTBatches(val_ids, a.batch_size, a.seq_len)


def total_steps(a, steps_per_epoch: int) -> int:
    max_iters = int(a.max_epochs * steps_per_epoch)
    return min(max_iters, a.max_iters) if a.max_iters else max_iters


def load_bptt_weights(model: torch.nn.Module, state_dict) -> None:
    """bptt's initial weights into the torch model, bit for bit (the names are the same)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})


def _tensors(batch):
    return (torch.from_numpy(np.asarray(v, np.int64)) for v in batch)


def _detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def train_step(model, forward, opt, x, y, state, V: int, grad_clip: float, clip_mode: str):
    """One training step on the window x, y (T, N) int64 from ``state``: forward, mean cross-entropy,
    backward, clipping (by value or by norm; none if grad_clip is 0), the optimizer's step
    → (the loss tensor, the state detached for the next window)."""
    logits, state = forward(model, x, state)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    opt.zero_grad(set_to_none=False)
    loss.backward()
    if grad_clip:
        if clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
    opt.step()
    return loss, _detach(state)


def train(a, model, forward, opt, sched, batches, val_batches, V: int, max_iters: int) -> None:
    """Train until ``max_iters`` steps or ``--max-time`` minutes, logging as ``bptt train`` does.

    ``forward(model, x, state) -> (logits, state)``: x (T, N) int64 → logits (T, N, V).  A recurrent
    model carries ``state`` across the windows of an epoch (reset at its first window, detached after
    each step: truncated BPTT); a Transformer returns None and sees each window alone.
    """
    steps = len(batches)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w")
    start = time.time()
    deadline = start + a.max_time * 60 if a.max_time else math.inf
    state, window_loss, window_n, window_items, window_start = None, 0.0, 0, 0, time.time()
    it = 0
    model.train()
    while it < max_iters and time.time() < deadline:
        k = it % steps
        if k == 0:
            state = None
        x, y = _tensors(batches.batch(k))
        lr = sched(it)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, state = train_step(model, forward, opt, x, y, state, V, a.grad_clip, a.clip_mode)
        it += 1
        window_loss += loss.item()
        window_n += 1
        window_items += y.numel()
        if it % a.log_every == 0 or it == max_iters:
            el = max(time.time() - window_start, 1e-9)
            log.write(json.dumps({"step": it, "train_loss": window_loss / window_n, "lr": lr,
                                  "items_per_sec": window_items / el, "time": time.time() - start,
                                  "epoch": it / steps}) + "\n")
            window_loss, window_n, window_items, window_start = 0.0, 0, 0, time.time()
        if it % a.eval_every == 0 or it == max_iters:
            val = evaluate(model, forward, val_batches, V)
            log.write(json.dumps({"step": it, "time": time.time() - start, "val_loss": val,
                                  "val_bpc": val / math.log(2)}) + "\n")
            log.flush()
            print(f"step {it} ({time.time() - start:.0f} s): val loss {val:.4f}", flush=True)
            window_start = time.time()
    log.close()


def evaluate(model, forward, val_batches, V: int) -> float:
    """Mean cross-entropy (nats per character) over the whole validation split, eval mode."""
    model.eval()
    with torch.inference_mode():
        state, total, count = None, 0.0, 0
        for k in range(len(val_batches)):
            x, y = _tensors(val_batches.batch(k))
            logits, state = forward(model, x, state)
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count
