"""Decoding many inputs (greedy or beam, batched by length) and scoring them: exact match, token accuracy, BLEU."""

from __future__ import annotations

import numpy as np

from bptt.seq2seq.data import SeqData
from bptt.seq2seq.model import make_batch
from bptt.seq2seq.tasks import detokenize

__all__ = ["decode_max_len", "translate_batch", "evaluate"]


def decode_max_len(max_tgt_len):
    return int(max_tgt_len * 1.5) + 2


def translate_batch(model, src_vocab, srcs, max_len, beam=1, alpha=0.0, return_attention=False, batch_size=256):
    """Token lists in, DecodeResult fields out (lists), batched by similar length."""
    order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))
    outs, logps, atts = [None] * len(srcs), np.zeros(len(srcs)), [None] * len(srcs)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        b = make_batch([src_vocab.encode(srcs[i]) for i in idx])
        r = model.translate(b.src, b.src_len, max_len, beam, alpha, return_attention)
        for j, i in enumerate(idx):
            outs[i], logps[i] = r.tokens[j], r.logprob[j]
            if r.attention is not None:
                atts[i] = r.attention[j]
    return outs, logps, atts


def evaluate(model, data: SeqData, pairs, beam=1, alpha=0.0, bleu=False):
    """Exact match and token accuracy (position-wise, over reference tokens) of decoded outputs."""
    srcs = [s for s, _ in pairs]
    outs, logps, _ = translate_batch(model, data.src_vocab, srcs, decode_max_len(data.max_tgt_len), beam, alpha)
    exact = correct = total = 0
    hyps, refs = [], []
    for (_, ref), ids in zip(pairs, outs):
        hyp = data.tgt_vocab.decode(ids)
        exact += hyp == list(ref)
        correct += sum(a == b for a, b in zip(hyp, ref))
        total += len(ref)
        hyps.append(detokenize(hyp, data.level))
        refs.append(detokenize(ref, data.level))
    res = {"n": len(pairs), "exact_match": exact / len(pairs), "token_accuracy": correct / max(total, 1),
           "mean_logprob": float(np.mean(logps))}
    if bleu:
        try:
            import sacrebleu
        except ImportError:
            res["bleu"] = None
            res["bleu_note"] = "install sacrebleu (pip install 'bptt[bleu]') for BLEU"
        else:
            tok = "char" if data.level == "char" else "13a"
            res["bleu"] = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tok).score
    return res, outs, logps
