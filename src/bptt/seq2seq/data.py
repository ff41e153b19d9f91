"""Where seq2seq training pairs come from: a built-in task (an endless stream) or a TSV file of pairs.

Batches are padded id arrays (:func:`bptt.seq2seq.model.make_batch`): src (S, N), tgt (T, N), with
``bucket`` batches at a time sorted by source length so little padding is computed.
"""

from __future__ import annotations

import numpy as np

from bptt.seq2seq.model import make_batch
from bptt.seq2seq.tasks import TokenVocab, get_task, load_pairs

__all__ = ["SeqData"]


class SeqData:
    """Where training pairs come from: a built-in task (endless stream) or a TSV file."""

    def __init__(self, task=None, pairs=None, level="char", valid=None, src_vocab=None, tgt_vocab=None,
                 max_src_len=0, max_tgt_len=0):
        self.task, self.pairs, self.level, self.valid = task, pairs, level, valid
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.max_src_len, self.max_tgt_len = max_src_len, max_tgt_len

    @classmethod
    def from_task(cls, name):
        task = get_task(name)
        sv, tv = task.vocabs()
        valid = [(list(s), list(t)) for s, t in task.test_set()]
        return cls(task=task, level="char", valid=valid, src_vocab=sv, tgt_vocab=tv,
                   max_src_len=task.max_src_len, max_tgt_len=task.max_tgt_len)

    @classmethod
    def from_file(cls, path, level, seed=0, log=print):
        pairs, skipped = load_pairs(path, level)
        if skipped:
            log(f"{path}: skipped {skipped} empty line(s)")
        order = np.random.default_rng(seed).permutation(len(pairs))
        n_valid = len(pairs) // 20 if len(pairs) >= 40 else 0  # hold out 5% for validation when there is enough
        valid = [pairs[i] for i in order[:n_valid]] or pairs[: min(len(pairs), 200)]
        train = [pairs[i] for i in order[n_valid:]]
        sv = TokenVocab.build(s for s, _ in pairs)
        tv = TokenVocab.build(t for _, t in pairs)
        return cls(pairs=train, level=level, valid=valid, src_vocab=sv, tgt_vocab=tv,
                   max_src_len=max(len(s) for s, _ in pairs), max_tgt_len=max(len(t) for _, t in pairs))

    def batches(self, rng, batch_size, bucket=20):
        """Endless batches of ids; ``bucket`` batches at a time are sorted by source length."""
        stream = self.task.train_stream(rng) if self.task else None
        while True:
            if stream is not None:
                chunk = [(list(s), list(t)) for s, t in (next(stream) for _ in range(batch_size * bucket))]
                chunks = [chunk]
            else:
                order = rng.permutation(len(self.pairs))
                chunks = [[self.pairs[i] for i in order[k : k + batch_size * bucket]]
                          for k in range(0, len(order), batch_size * bucket)]
            for chunk in chunks:
                chunk.sort(key=lambda p: (len(p[0]), len(p[1])))
                groups = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
                for g in (groups[i] for i in rng.permutation(len(groups))):
                    yield make_batch([self.src_vocab.encode(s) for s, _ in g], [self.tgt_vocab.encode(t) for _, t in g])
