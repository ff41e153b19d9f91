"""bptt vs PyTorch on CPU: the seq2seq Transformer's training step and its greedy decoding.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_seq2seq.py [--quick] [--threads 2]

Method (as ``bench_layers.py``, whose ``alternate`` and ``sgemm_peak`` this script uses)
------
* One process, float32, the same thread count on both sides, the same weights: bptt's
  ``TransformerSeq2Seq`` state dict loaded unchanged into the same model built from torch modules
  (``nn.Embedding`` ×2, ``nn.Transformer(norm_first=True)``, ``nn.Linear``; the parity test's model).
  The two sides alternate; each figure is the median over the turns.  The header prints numpy's BLAS
  and both libraries' 2048³ sgemm rate, measured in the same run.
* Sources and targets like the dates task's (``bptt seq2seq train --task dates``): N pairs of
  20–29 source and 8–12 target tokens, padded; the model of row Z3 (d_model 128, 4 heads, 2 + 2
  layers, feed-forward 512, ReLU).
* training step: forward, masked mean cross-entropy, backward (no optimizer), at batch 64, with
  dropout 0.1 on both sides (the masks differ; the losses are compared with dropout off).
* greedy decoding: 256 sources, 12 output tokens (no early stop on either side, so both do the same
  work).  bptt: ``translate`` (``encode`` once, then ``decode_step`` with its key/value caches).
  torch: the encoder once, then ``nn.TransformerDecoder`` over the whole prefix at every step under
  ``inference_mode`` — torch's nn.Transformer modules have no key/value cache.  The tokens are compared.
* bptt alone (no PyTorch model here to compare with): ``translate`` of the same 256 sources, at most
  12 tokens, greedy and beam 4, with the Transformer and with the default recurrent model plus general
  attention (``bptt seq2seq train --attention general``): medians of ``--repeat`` calls.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_layers  # noqa: E402  (alternate, sgemm_peak, GAP/WARM)
import bench_transformer  # noqa: E402  (step_pair, start)

SRC_VOCAB, TGT_VOCAB = 40, 20
CONFIG = dict(src_vocab=SRC_VOCAB, tgt_vocab=TGT_VOCAB, d_model=128, heads=4, layers=2)


def pairs(n, seed):
    """n (source, target) id lists of the dates task's lengths, ids ≥ 4 (not <pad>/<s>/</s>/<unk>)."""
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, SRC_VOCAB, rng.integers(20, 30)) for _ in range(n)]
    tgt = [list(rng.integers(4, TGT_VOCAB, rng.integers(8, 13))) for _ in range(n)]
    return src, tgt


def build(dropout, seed=0, perturb=0.0):
    """A bptt TransformerSeq2Seq and the same model in torch modules, with bptt's weights; ``perturb`` > 0
    adds that much N(0, 1) noise to bptt's weights first (away from the init's small values)."""
    import torch

    from bptt.seq2seq.transformer import TransformerSeq2Seq, TransformerSeq2SeqConfig

    ours = TransformerSeq2Seq(TransformerSeq2SeqConfig(**CONFIG, dropout=dropout), rng=seed)
    noise = np.random.default_rng(seed + 1)
    for p in ours.params.values() if perturb else ():
        p += perturb * noise.standard_normal(p.shape).astype(p.dtype)
    E, cfg = ours.config.d_model, ours.config
    nn = torch.nn

    class TorchSeq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.src_embed = nn.Embedding(SRC_VOCAB, E)
            self.tgt_embed = nn.Embedding(TGT_VOCAB, E)
            self.transformer = nn.Transformer(E, cfg.heads, cfg.layers, cfg.layers, cfg.feedforward, dropout,
                                              norm_first=True)
            self.out = nn.Linear(E, TGT_VOCAB)
            self.register_buffer("P", torch.from_numpy(ours.src_pos.table.copy()))

        def embed(self, emb, ids):  # (L, N) → (L, N, E): √E · Embed(ids) + P[0:L], then dropout
            x = emb(ids) * math.sqrt(E) + self.P[: ids.shape[0], None]
            return nn.functional.dropout(x, dropout, self.training)

        def encode(self, src, pad):
            return self.transformer.encoder(self.embed(self.src_embed, src), src_key_padding_mask=pad)

        def decode(self, tgt, memory, pad):
            T = tgt.shape[0]
            mask = nn.Transformer.generate_square_subsequent_mask(T)
            z = self.transformer.decoder(self.embed(self.tgt_embed, tgt), memory, tgt_mask=mask, tgt_is_causal=True,
                                         memory_key_padding_mask=pad)
            return self.out(z)

    theirs = TorchSeq2Seq()
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()} | {"P": theirs.P})
    return ours, theirs


def build_train(batch, dropout):
    """(ours, theirs, |loss difference| with dropout off): one training step each on the same batch."""
    import torch

    from bptt.seq2seq.model import make_batch

    ours, theirs = build(dropout)
    b = make_batch(*pairs(batch, 1))
    src, tgt_in = torch.from_numpy(b.src), torch.from_numpy(b.tgt_in)
    pad = torch.from_numpy(np.arange(b.src.shape[0])[None] >= b.src_len[:, None])
    target = torch.from_numpy(np.where(b.tgt_mask, b.tgt_out, -100))

    def theirs_loss():
        logits = theirs.decode(tgt_in, theirs.encode(src, pad), pad)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, TGT_VOCAB), target.reshape(-1), ignore_index=-100)

    return bench_transformer.step_pair(ours, lambda: ours.loss(b), theirs, theirs_loss)


def build_greedy(n, steps):
    """(ours, theirs, whether both produce the same tokens): greedy decoding of n sources for ``steps`` tokens."""
    import torch

    from bptt.seq2seq.model import make_batch
    from bptt.seq2seq.tasks import BOS

    ours, theirs = build(0.0, seed=2, perturb=0.3)  # larger weights, so that the tokens vary
    ours.eval(), theirs.eval()
    b = make_batch(pairs(n, 4)[0])
    src = torch.from_numpy(b.src)
    pad = torch.from_numpy(np.arange(b.src.shape[0])[None] >= b.src_len[:, None])
    out = {}

    def ours_greedy():  # every token, </s> or not, as torch's loop below: the same work on both sides
        memory = ours.encode(b.src, b.src_len)
        state, tokens, seq = memory.state, np.full(n, BOS), []
        for _ in range(steps):
            logp, state, _ = ours.decode_step(tokens, state, memory)
            tokens = logp.argmax(axis=1)
            seq.append(tokens)
        out["ours"] = np.stack(seq)

    def theirs_greedy():
        with torch.inference_mode():
            memory = theirs.encode(src, pad)
            ys = torch.full((1, n), BOS, dtype=torch.long)
            for _ in range(steps):
                nxt = theirs.decode(ys, memory, pad)[-1].argmax(-1)
                ys = torch.cat([ys, nxt[None]])
        out["theirs"] = ys[1:].numpy()

    ours_greedy(), theirs_greedy()
    return ours_greedy, theirs_greedy, bool(np.array_equal(out["ours"], out["theirs"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 turns instead of 7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="alternating turns per figure (default 7, quick 3)")
    ap.add_argument("--gap", type=float, default=0.3)
    ap.add_argument("--warm", type=float, default=0.15)
    args = ap.parse_args(argv)
    repeat = bench_transformer.start(args, "the seq2seq Transformer", f"  Model: {CONFIG}, feed-forward 512, ReLU.")
    print("| what | ms bptt | ms torch | torch/bptt | check |")
    print("|---|---:|---:|---:|---|")
    ot, tt, diff = build_train(64, 0.1)
    a, b = bench_layers.alternate(ot, tt, repeat)
    print(f"| training step, batch 64, dropout 0.1 | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}× | "
          f"loss diff {diff:.1e} (dropout off) |", flush=True)
    og, tg, same = build_greedy(256, 12)
    a, b = bench_layers.alternate(og, tg, repeat, inner=1)
    print(f"| greedy decoding, 256 sources × 12 tokens (torch: whole prefix per step) | {a * 1e3:.1f} | "
          f"{b * 1e3:.1f} | {b / a:.2f}× | same tokens: {same} |", flush=True)
    print("\n| bptt alone: translate 256 sources, ≤ 12 tokens | greedy ms | beam 4 ms |\n|---|---:|---:|")
    from bptt.seq2seq.model import make_batch

    b = make_batch(pairs(256, 4)[0])
    for name, model in decoders():
        # alternate() against nothing: the same idle gap, warm-up and median as the rows above
        greedy, beam = (bench_layers.alternate(lambda k=k: model.translate(b.src, b.src_len, 12, k), lambda: None,
                                               repeat, inner=1)[0] for k in (1, 4))
        print(f"| {name} | {greedy * 1e3:.1f} | {beam * 1e3:.1f} |", flush=True)


def decoders():
    """(name, model in eval mode): the Transformer above and the recurrent model with general attention."""
    from bptt.seq2seq.model import Seq2Seq, Seq2SeqConfig

    ours, _ = build(0.0, seed=2)
    rnn = Seq2Seq(Seq2SeqConfig(src_vocab=SRC_VOCAB, tgt_vocab=TGT_VOCAB, attention="general"), rng=2)
    return [("Transformer (d_model 128, 2 + 2 layers)", ours.eval()),
            ("LSTM, bidirectional encoder, general attention (H 128)", rnn.eval())]


if __name__ == "__main__":
    main()
