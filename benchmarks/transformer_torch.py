"""The PyTorch reference for `bptt train --model transformer`: the same split, model, initial weights,
optimizer, schedule, clipping and batch order, so that losses and wall-clock times compare one to one.

    python benchmarks/transformer_torch.py --data tinyshakespeare.txt --out runs/torch_tf \
        [--layers 4 --d-model 128 --heads 4 --seq-len 64 --batch-size 12 --dropout 0 \
         --optimizer adamw --lr 1e-3 --weight-decay 0.1 --schedule cosine --warmup-iters 100 --min-lr 1e-4 \
         --grad-clip 1 --clip-mode norm --max-iters 2000 --eval-every 250] [--max-time MINUTES]

The model is the torch layout given in the docstring of ``bptt.lm.transformer`` (token and
position ``nn.Embedding``, ``nn.TransformerEncoder`` of pre-norm GELU layers with a final
``nn.LayerNorm``, run with the causal mask, then ``nn.Linear``), so bptt's state dict loads
unchanged: the initial weights are ``TransformerLM(config, rng=seed).state_dict()``, bit for bit.
The data pipeline is bptt's (``TBPTTBatches``: window k of the epoch at step k, N contiguous
streams of T characters), the schedule is bptt's schedule object (the same lr at every step),
AdamW is ``torch.optim.AdamW`` with bptt's defaults (betas (0.9, 0.999), eps 1e-8, weight decay
on every parameter, as bptt's AdamW does), and clipping is ``clip_grad_norm_`` / ``clip_grad_value_``.
Dropout draws different masks on the two sides (different generators); with --dropout 0 the two
runs compute the same training up to float32 rounding.

It writes ``log.jsonl`` as ``bptt train`` does (``{"step", "train_loss", "lr", "items_per_sec",
"time"}`` every --log-every steps, ``{"step", "time", "val_loss", "val_bpc"}`` every --eval-every
steps and at the last), so ``benchmarks/charlm_report.py`` reads both.  The validation loss is
bptt's: the whole validation split in TBPTT windows, eval mode, summed cross-entropy / characters.
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
from bptt.lm.transformer import TransformerLM, TransformerLMConfig
from bptt.nn.optim import make_schedule


class TorchTransformerLM(torch.nn.Module):
    """bptt's TransformerLM from torch modules, with its parameter names."""

    def __init__(self, V, E, h, L, C, dropout):
        super().__init__()
        nn = torch.nn
        self.embed = nn.Embedding(V, E)
        self.pos = nn.Embedding(C, E)
        self.drop = nn.Dropout(dropout)  # on the summed embeddings (bptt: the positional layer's dropout)
        layer = nn.TransformerEncoderLayer(E, h, 4 * E, dropout, "gelu", norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, L, norm=nn.LayerNorm(E), enable_nested_tensor=False)
        self.decoder = nn.Linear(E, V)

    def forward(self, x):  # x (T, N) → logits (T, N, V)
        T = x.shape[0]
        e = self.drop(self.embed(x) + self.pos(torch.arange(T))[:, None])
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=self.decoder.weight.dtype)
        return self.decoder(self.encoder(e, mask=mask, is_causal=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=0, help="0 = --seq-len (as bptt train)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--beta2", type=float, default=0.999, help="bptt's AdamW uses 0.999 (nanoGPT's config: 0.99)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--clip-mode", default="norm", choices=["norm", "value"])
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--max-epochs", type=float, default=50)
    p.add_argument("--max-time", type=float, default=0.0, help="minutes")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    text = read_text(a.data)
    vocab = Vocab(text)
    train_ids, val_ids, _ = split_corpus(encode_text(text, vocab), a.val_frac, 0.0)
    batches = TBPTTBatches(train_ids, a.batch_size, a.seq_len)
    val_batches = TBPTTBatches(val_ids, a.batch_size, a.seq_len)
    V, C = len(vocab), a.context or a.seq_len

    cfg = TransformerLMConfig(V, a.layers, a.d_model, a.heads, C, a.dropout, a.dtype)
    model = TorchTransformerLM(V, a.d_model, a.heads, a.layers, C, a.dropout).to(getattr(torch, a.dtype))
    init = TransformerLM(cfg, rng=a.seed).state_dict()  # bptt's initial weights, bit for bit
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in init.items()})
    opt_cls = torch.optim.AdamW if a.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=a.lr, betas=(0.9, a.beta2), eps=1e-8, weight_decay=a.weight_decay)
    steps = len(batches)
    max_iters = int(a.max_epochs * steps)
    if a.max_iters:
        max_iters = min(max_iters, a.max_iters)
    if a.schedule == "cosine":
        sched = make_schedule("cosine", lr=a.lr, total_steps=max(max_iters, a.warmup_iters, 1),
                              warmup_steps=a.warmup_iters, min_lr=a.min_lr)
    else:
        sched = make_schedule("constant", lr=a.lr)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w")
    start = time.time()
    deadline = start + a.max_time * 60 if a.max_time else math.inf
    window_loss, window_n, window_items, window_start = 0.0, 0, 0, time.time()
    it = 0
    model.train()
    while it < max_iters and time.time() < deadline:
        x, y = (torch.from_numpy(np.asarray(v, np.int64)) for v in batches.batch(it % steps))
        lr = sched(it)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if a.grad_clip:
            if a.clip_mode == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            else:
                torch.nn.utils.clip_grad_value_(model.parameters(), a.grad_clip)
        opt.step()
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
            model.eval()
            with torch.no_grad():
                total, count = 0.0, 0
                for vk in range(len(val_batches)):
                    vx, vy = (torch.from_numpy(np.asarray(v, np.int64)) for v in val_batches.batch(vk))
                    total += torch.nn.functional.cross_entropy(model(vx).reshape(-1, V), vy.reshape(-1),
                                                               reduction="sum").item()
                    count += vy.numel()
            model.train()
            val = total / count
            log.write(json.dumps({"step": it, "time": time.time() - start, "val_loss": val,
                                  "val_bpc": val / math.log(2)}) + "\n")
            log.flush()
            print(f"step {it} ({time.time() - start:.0f} s): val loss {val:.4f}", flush=True)
            window_start = time.time()
    log.close()


if __name__ == "__main__":
    main()
