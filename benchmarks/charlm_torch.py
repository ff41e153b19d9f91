"""The PyTorch reference for `bptt train`: the same split, model, initialisation,
optimizer, schedule, clipping and batch order, so that losses and wall-clock
times can be compared one to one.

    python benchmarks/charlm_torch.py --data ../shared/data/tinyshakespeare.txt --out runs/torch_default \
        [--hidden 128 --layers 2 --dropout 0 --seq-len 50 --batch-size 50 --lr 2e-3 ...] [--max-time MINUTES]

The data pipeline and the initial weights come from bptt itself (``TBPTTBatches``,
``CharLM(...).state_dict()``), which is what makes the two runs see exactly the same
numbers; everything that trains is PyTorch.  The loop and ``log.jsonl`` (the format of
``bptt train``, read by ``charlm_report.py``) are ``torch_lm_loop.py``'s, shared with
``transformer_torch.py``.
"""

from __future__ import annotations

import argparse

import torch

import torch_lm_loop as loop
from bptt.lm.model import CharLM, CharLMConfig
from bptt.lm.train import make_lr_schedule


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


def forward(model, x, state):
    return model(x, state)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    loop.add_common_arguments(p, max_iters=0, eval_every=200)
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
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    vocab, batches, val_batches = loop.load_corpus(a)
    V = len(vocab)
    cfg = CharLMConfig(V, a.model, a.hidden, a.layers, a.dropout, a.embedding, a.init, a.forget_bias, a.dtype)
    model = TorchCharLM(V, a.hidden, a.layers, a.model, a.dropout, a.embedding).to(getattr(torch, a.dtype))
    loop.load_bptt_weights(model, CharLM(cfg, rng=a.seed).state_dict())
    if a.optimizer == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=a.lr, alpha=a.alpha, eps=1e-8)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    max_iters = loop.total_steps(a, len(batches))
    loop.train(a, model, forward, opt, make_lr_schedule(a, len(batches), max_iters), batches, val_batches, V, max_iters)


if __name__ == "__main__":
    main()
