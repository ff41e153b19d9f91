"""The PyTorch reference for `bptt train`: the same split, model, initialisation,
optimizer, schedule, clipping and batch order, so that losses and wall-clock
times can be compared one to one.

    python benchmarks/charlm_torch.py --data ../shared/data/tinyshakespeare.txt --out runs/torch_default \
        [--hidden 128 --layers 2 --dropout 0 --seq-len 50 --batch-size 50 --lr 2e-3 ...] [--max-time MINUTES]

It writes ``log.jsonl`` in the same format as ``bptt train`` (``train_loss``
lines every --log-every steps, ``val_loss`` lines every --eval-every steps, each
with ``time`` in seconds since the start), so ``benchmarks/charlm_report.py``
reads both.  The data pipeline and the initial weights come from bptt itself
(``TBPTTBatches``, ``CharLM(...).state_dict()``), which is what makes the two
runs see exactly the same numbers; everything that trains is PyTorch.
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
from bptt.lm.model import CharLM, CharLMConfig
from bptt.nn.optim import make_schedule


class TorchCharLM(torch.nn.Module):
    """one-hot → nn.LSTM/GRU/RNN → dropout → nn.Linear, with bptt's parameter names."""

    def __init__(self, V, H, L, model, dropout, embedding):
        super().__init__()
        self.V = V
        if embedding:
            self.embed = torch.nn.Embedding(V, embedding)
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[model]
        self.rnn = cls(embedding or V, H, num_layers=L, dropout=dropout)
        self.drop = torch.nn.Dropout(dropout)
        self.decoder = torch.nn.Linear(H, V)
        self.embedding = embedding

    def forward(self, x, state):
        e = self.embed(x) if self.embedding else torch.nn.functional.one_hot(x, self.V).to(self.decoder.weight.dtype)
        h, state = self.rnn(e, state)
        return self.decoder(self.drop(h)), state


def detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="lstm")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--embedding", type=int, default=0)
    p.add_argument("--init", default="torch")
    p.add_argument("--forget-bias", type=float, default=0.0)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adam"])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=0.95)
    p.add_argument("--schedule", default="charrnn", choices=["charrnn", "cosine", "constant"])
    p.add_argument("--lr-decay", type=float, default=0.97)
    p.add_argument("--lr-decay-after", type=int, default=10)
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--clip-mode", default="value", choices=["value", "norm"])
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--max-iters", type=int, default=0)
    p.add_argument("--max-epochs", type=float, default=50)
    p.add_argument("--max-time", type=float, default=0.0, help="minutes")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="as bptt train --dtype")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    text = read_text(a.data)
    vocab = Vocab(text)
    train_ids, val_ids, _ = split_corpus(encode_text(text, vocab), a.val_frac, 0.0)
    batches = TBPTTBatches(train_ids, a.batch_size, a.seq_len)
    val_batches = TBPTTBatches(val_ids, a.batch_size, a.seq_len)

    cfg = CharLMConfig(len(vocab), a.model, a.hidden, a.layers, a.dropout, a.embedding, a.init, a.forget_bias, a.dtype)
    model = TorchCharLM(len(vocab), a.hidden, a.layers, a.model, a.dropout, a.embedding).to(getattr(torch, a.dtype))
    init = CharLM(cfg, rng=a.seed).state_dict()  # bptt's initial weights, bit for bit
    model.load_state_dict({k: torch.from_numpy(v) for k, v in init.items()})
    if a.optimizer == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=a.lr, alpha=a.alpha, eps=1e-8)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    steps = len(batches)
    max_iters = int(a.max_epochs * steps)
    if a.max_iters:
        max_iters = min(max_iters, a.max_iters)
    if a.schedule == "charrnn":
        sched = make_schedule("charrnn", lr=a.lr, steps_per_epoch=steps, decay_after_epochs=a.lr_decay_after,
                              decay_rate=a.lr_decay)
    elif a.schedule == "cosine":
        sched = make_schedule("cosine", lr=a.lr, total_steps=max_iters, warmup_steps=a.warmup_iters, min_lr=a.min_lr)
    else:
        sched = make_schedule("constant", lr=a.lr)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w")
    start = time.time()
    deadline = start + a.max_time * 60 if a.max_time else math.inf
    state, window_loss, window_n, window_start = None, 0.0, 0, time.time()
    it = 0
    while it < max_iters and time.time() < deadline:
        k = it % steps
        if k == 0:
            state = None
        x, y = (torch.from_numpy(v) for v in batches.batch(k))
        for g in opt.param_groups:
            g["lr"] = sched(it)
        model.train()
        logits, state = model(x, state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if a.grad_clip:
            if a.clip_mode == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), a.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        state = detach(state)
        it += 1
        window_loss += loss.item()
        window_n += 1
        if it % a.log_every == 0:
            el = time.time() - window_start
            log.write(json.dumps({"iter": it, "epoch": it / steps, "train_loss": window_loss / window_n,
                                  "chars_per_sec": window_n * x.numel() / el, "time": time.time() - start}) + "\n")
            window_loss, window_n, window_start = 0.0, 0, time.time()
        if it % a.eval_every == 0 or it == max_iters:
            model.eval()
            with torch.no_grad():
                vstate, total, count = None, 0.0, 0
                for vk in range(len(val_batches)):
                    vx, vy = (torch.from_numpy(v) for v in val_batches.batch(vk))
                    vlogits, vstate = model(vx, vstate)
                    total += torch.nn.functional.cross_entropy(vlogits.reshape(-1, len(vocab)), vy.reshape(-1),
                                                               reduction="sum").item()
                    count += vy.numel()
            val = total / count
            log.write(json.dumps({"iter": it, "epoch": it / steps, "val_loss": val, "time": time.time() - start}) + "\n")
            log.flush()
            print(f"step {it} ({time.time() - start:.0f} s): val loss {val:.4f}", flush=True)
            window_start = time.time()
    log.close()


if __name__ == "__main__":
    main()
