"""The character language model: gradients, PyTorch parity, overfitting, sampling, evaluation."""

import math

import numpy as np
import pytest

from bptt.lm.data import DataError, Vocab
from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.lm.model import CharLM, CharLMConfig
from bptt.lm.sample import generate, next_char_distribution
from bptt.lm.evaluate import evaluate_text


@pytest.mark.parametrize("model,embedding,dropout", [("lstm", 0, 0.0), ("gru", 5, 0.0), ("rnn", 0, 0.3)])
def test_charlm_gradcheck(model, embedding, dropout):
    cfg = CharLMConfig(vocab_size=6, model=model, hidden=5, layers=2, embedding=embedding, dropout=dropout,
                       dtype="float64")
    lm = CharLM(cfg, rng=0)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, (4, 3)), rng.integers(0, 6, (4, 3))
    seed_state = lm.rng.bit_generator.state

    def forward_loss():  # the same dropout masks on every call
        lm.rng.bit_generator.state = seed_state
        return lm.loss(x, y)

    def loss():
        return forward_loss()[0]

    _, dlogits, _ = forward_loss()
    lm.zero_grad()
    lm.backward(dlogits)
    errors = gradcheck(loss, lm.params, lm.grads, eps=1e-5, tol=1e-7)  # small grads: a larger step beats roundoff
    assert max(errors.values()) < 1e-7


def test_charlm_matches_a_torch_model_with_the_same_names(torch):
    """A PyTorch char-rnn built from nn.Embedding/nn.LSTM/nn.Linear loads unchanged and agrees."""

    class TorchCharLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 4)
            self.rnn = torch.nn.LSTM(4, 8, num_layers=2)
            self.decoder = torch.nn.Linear(8, 7)

        def forward(self, x):
            return self.decoder(self.rnn(self.embed(x))[0])

    tm = TorchCharLM().double()
    lm = CharLM(CharLMConfig(vocab_size=7, hidden=8, layers=2, embedding=4, dtype="float64"))
    lm.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 7, (6, 3)), rng.integers(0, 7, (6, 3))
    logits = tm(torch.tensor(x))
    tloss = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), torch.tensor(y).reshape(-1))
    tloss.backward()
    loss, dlogits, _ = lm.loss(x, y)
    lm.zero_grad()
    lm.backward(dlogits)
    assert abs(loss - tloss.item()) < 1e-12
    for name, p in tm.named_parameters():
        assert rel_error(lm.grads[name], p.grad.numpy()) < 1e-10, name


def test_overfits_one_batch():
    """A small LSTM with Adam memorises one batch: the loss falls from ln V to near zero."""
    from bptt.nn.optim import Adam

    lm = CharLM(CharLMConfig(vocab_size=10, hidden=32, layers=1), rng=0)
    opt = Adam(lm, 1e-2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, (12, 4)), rng.integers(0, 10, (12, 4))
    first = lm.loss(x, y)[0]
    for _ in range(200):
        loss, dlogits, _ = lm.loss(x, y)
        lm.zero_grad()
        lm.backward(dlogits)
        opt.step()
    assert abs(first - math.log(10)) < 0.2
    assert loss < 0.05


def test_forget_bias_and_charrnn_init():
    lm = CharLM(CharLMConfig(vocab_size=5, hidden=4, layers=1, init="charrnn", forget_bias=1.0), rng=0)
    b = lm.params["rnn.bias_ih_l0"]
    assert np.all(np.abs(lm.params["rnn.weight_hh_l0"]) <= 0.08)
    assert np.all(b[4:8] >= 0.92) and np.all(np.abs(np.delete(b, range(4, 8))) <= 0.08)


def test_sampling_is_reproducible_and_respects_argmax_and_top_k():
    vocab = Vocab("abcde")
    lm = CharLM(CharLMConfig(vocab_size=5, hidden=8, layers=2), rng=0)
    a = generate(lm, vocab, 30, rng=np.random.default_rng(1), prime="ab")
    b = generate(lm, vocab, 30, rng=np.random.default_rng(1), prime="ab")
    assert a == b and len(a) == 30 and set(a) <= set("abcde")
    g1 = generate(lm, vocab, 10, argmax=True, prime="c")
    # argmax equals a manual greedy loop over the full-sequence forward
    ids = list(vocab.encode("c"))
    for _ in range(10):
        logits, _ = lm.forward(np.array(ids)[:, None])
        ids.append(int(np.argmax(logits[-1, 0])))
    assert g1 == vocab.decode(ids[1:])
    p = next_char_distribution(np.array([1.0, 3.0, 2.0, 0.0]), temperature=0.5, top_k=2)
    assert p[0] == 0 and p[3] == 0 and abs(p.sum() - 1) < 1e-12 and p[1] > p[2]
    with pytest.raises(DataError, match="'z'"):
        generate(lm, vocab, 5, prime="az")
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.*argmax"):  # points to greedy decoding
        generate(lm, vocab, 5, temperature=0.0, prime="a")
    assert len(generate(lm, vocab, 5, temperature=0.0, argmax=True, prime="a")) == 5  # argmax needs no temperature


def test_evaluate_text_counts_every_character_and_reports_unknown():
    vocab = Vocab("abc\n")
    lm = CharLM(CharLMConfig(vocab_size=4, hidden=6, layers=1, dtype="float64"), rng=0)
    text = "abcab\ncba" * 50
    r = evaluate_text(lm, vocab, text + "xyzx", window=7, streams=3)
    assert r["characters"] == len(text) - 1 and r["unknown_count"] == 4 and r["unknown_chars"] == ["x", "y", "z"]
    # one stream, one window: the plain mean over all predicted characters
    r1 = evaluate_text(lm, vocab, text, window=10_000, streams=1)
    ids = vocab.encode(text).astype(np.int64)
    from bptt.nn.losses import cross_entropy

    logits, _ = lm.forward(ids[:-1, None])
    assert abs(r1["loss"] - cross_entropy(logits, ids[1:, None])[0]) < 1e-12
    assert abs(r1["perplexity"] - math.exp(r1["loss"])) < 1e-9
