"""Evaluation runs the recurrent layers forward only (bptt.lm.evaluate: the validation pass and `bptt eval`).

In eval mode an RNN/LSTM/GRU on the compiled kernels keeps nothing for a backward
(bptt.nn.rnn, bptt.kernels.loops.ForwardRun(keep=False)); its outputs are those of the
training forward bit for bit, so an evaluation's loss is exactly the one a training-mode
forward gives.
"""

import numpy as np
import pytest

from conftest import require_numba

from bptt.lm.data import TBPTTBatches, Vocab
from bptt.lm.evaluate import evaluate, evaluate_text
from bptt.lm.model import CharLM, CharLMConfig
from bptt.nn.losses import cross_entropy

require_numba()


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
def test_evaluate_text_is_forward_only_and_exact(model):
    vocab = Vocab("abc\n")
    lm = CharLM(CharLMConfig(vocab_size=4, model=model, hidden=8, layers=2), rng=0)  # float32
    text = "abcab\ncba" * 40
    r = evaluate_text(lm, vocab, text, window=10_000, streams=1)
    with pytest.raises(ValueError, match="no cache"):
        lm.rnn.last_forward_caches()  # the evaluation kept nothing for a backward
    ids = vocab.encode(text).astype(np.int64)
    lm.train()  # dropout 0: the training forward, keeping its caches
    logits, _ = lm.forward(ids[:-1, None])
    total, _ = cross_entropy(logits, ids[1:, None], mask=np.ones((len(ids) - 1, 1), bool), reduction="sum",
                             need_grad=False)
    assert r["loss"] == total / (len(ids) - 1)


def test_validation_pass_is_forward_only_and_exact():
    ids = np.random.default_rng(0).integers(0, 5, 2000)
    batches = TBPTTBatches(ids, batch_size=20, seq_len=25)
    lm = CharLM(CharLMConfig(vocab_size=5, hidden=16, layers=2), rng=1)
    got = evaluate(lm, batches, max_windows=3)
    assert lm.training  # evaluate puts the mode back
    with pytest.raises(ValueError, match="no cache"):
        lm.rnn.last_forward_caches()
    state, total, count = None, 0.0, 0
    for k in range(3):  # the same windows through the training forward
        x, y = batches.batch(k)
        with lm.blas_scope(*x.shape):
            logits, state = lm.forward(x, state)
        total += cross_entropy(logits, y, reduction="sum", need_grad=False)[0]
        count += y.size
    assert got == total / count


@pytest.mark.parametrize("tied", [False, True])
def test_nll_sums_the_loss_by_the_decoders_row_slices(tied, monkeypatch):
    """CharLM.nll sums each slice of logit rows in the thread that made it (ops.affine_forward_then):
    the same sum as the cross-entropy over all the logits, in one slice or in two, with a mask."""
    from bptt.runtime import policy
    from bptt.runtime import threads as blas

    V, T, N = 7, 30, 50  # 1,500 rows: two slices of 750 with two threads
    config = CharLMConfig(vocab_size=V, hidden=12, layers=1, embedding=12 if tied else 0, tie_weights=tied)
    lm = CharLM(config, rng=0)
    lm.eval()
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, V, (T, N)), rng.integers(0, V, (T, N))
    mask = rng.random((T, N)) < 0.7
    logits, _ = lm.forward(x)
    for m in (None, mask):
        want, _ = cross_entropy(logits.astype(np.float64), y, mask=m, reduction="sum", need_grad=False)
        for threads in (1, 2):
            monkeypatch.setattr(blas, "OUTER_THREADS", [threads] if threads > 1 else [])
            monkeypatch.setattr(blas, "blas_threads", lambda t=threads: t)
            assert len(policy.row_slices(T * N, V * 12)) == threads
            got, _ = lm.nll(x, y, mask=m)
            assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="mask must have the targets' shape"):
        lm.nll(x, y, mask=mask[:, :3])
