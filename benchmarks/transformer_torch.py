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

The loop and ``log.jsonl`` (the format of ``bptt train``, read by ``charlm_report.py``; the validation
loss is bptt's, the whole validation split in TBPTT windows) are ``torch_lm_loop.py``'s, shared with
``charlm_torch.py``.
"""

from __future__ import annotations

import argparse

import torch

import torch_lm_loop as loop
from bptt.lm.train import make_lr_schedule
from bptt.lm.transformer import TransformerLM, TransformerLMConfig


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


def forward(model, x, state):
    return model(x), None  # each window alone: no state crosses windows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    loop.add_common_arguments(p, max_iters=2000, eval_every=250)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=0, help="0 = --seq-len (as bptt train)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--beta2", type=float, default=0.999, help="bptt's AdamW uses 0.999 (nanoGPT's config: 0.99)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--clip-mode", default="norm", choices=["norm", "value"])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    vocab, batches, val_batches = loop.load_corpus(a)
    V, C = len(vocab), a.context or a.seq_len
    cfg = TransformerLMConfig(V, a.layers, a.d_model, a.heads, C, a.dropout, a.dtype)
    model = TorchTransformerLM(V, a.d_model, a.heads, a.layers, C, a.dropout).to(getattr(torch, a.dtype))
    loop.load_bptt_weights(model, TransformerLM(cfg, rng=a.seed).state_dict())
    opt_cls = torch.optim.AdamW if a.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=a.lr, betas=(0.9, a.beta2), eps=1e-8, weight_decay=a.weight_decay)
    max_iters = loop.total_steps(a, len(batches))
    loop.train(a, model, forward, opt, make_lr_schedule(a, len(batches), max_iters), batches, val_batches, V, max_iters)


if __name__ == "__main__":
    main()
