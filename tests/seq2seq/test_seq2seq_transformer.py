"""The seq2seq Transformer: torch parity (float64), gradcheck, the decoding cache, greedy == beam 1, the CLI."""

import json
import math

import numpy as np
import pytest

from bptt.nn.gradcheck import gradcheck, rel_error
from bptt.seq2seq.model import make_batch
from bptt.seq2seq.tasks import BOS, EOS
from bptt.seq2seq.transformer import TransformerSeq2Seq, TransformerSeq2SeqConfig


def _model(dtype=np.float64, dropout=0.0, seed=0, **kw):
    cfg = TransformerSeq2SeqConfig(**(dict(src_vocab=9, tgt_vocab=8, d_model=8, heads=2, layers=2, ff=12,
                                           dropout=dropout, max_len=40) | kw))
    return TransformerSeq2Seq(cfg, dtype=dtype, rng=seed)


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    srcs = [rng.integers(4, 9, n) for n in (5, 3, 4)]  # ids ≥ 4: not <pad>/<s>/</s>/<unk>
    tgts = [list(rng.integers(4, 8, n)) for n in (2, 4, 3)]
    return make_batch(srcs, tgts)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch's note on its inference fast path
def test_matches_torch_transformer(torch):
    """The same model from torch modules (nn.Embedding, nn.Transformer(norm_first=True), nn.Linear) loads
    bptt's state dict unchanged; loss and every gradient agree in float64."""
    nn = torch.nn
    model = _model()
    for p in model.params.values():  # larger weights, so that every path matters
        p[...] = 0.3 * np.random.default_rng(3).standard_normal(p.shape)
    b = _batch()
    E = model.config.d_model

    class TorchModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.src_embed = nn.Embedding(9, E)
            self.tgt_embed = nn.Embedding(8, E)
            self.transformer = nn.Transformer(E, 2, 2, 2, 12, 0.0, norm_first=True)
            self.out = nn.Linear(E, 8)

    tm = TorchModel().double()
    assert sorted(tm.state_dict()) == sorted(model.state_dict())
    tm.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    S, T = b.src.shape[0], b.tgt_in.shape[0]
    P = torch.tensor(model.src_pos.table[:max(S, T)])
    pad = torch.tensor(np.arange(S)[None] >= b.src_len[:, None])
    x = tm.src_embed(torch.tensor(b.src)) * math.sqrt(E) + P[:S, None]
    y = tm.tgt_embed(torch.tensor(b.tgt_in)) * math.sqrt(E) + P[:T, None]
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    logits = tm.out(tm.transformer(x, y, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                                   tgt_is_causal=True))
    target = torch.tensor(np.where(b.tgt_mask, b.tgt_out, -100))
    tloss = nn.functional.cross_entropy(logits.reshape(-1, 8), target.reshape(-1), ignore_index=-100)
    tloss.backward()

    model.zero_grad()
    loss, dlogits = model.loss(b)
    model.backward(dlogits)
    assert abs(loss - tloss.item()) < 1e-12
    tgrads = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    for name, g in model.grads.items():
        assert rel_error(g, tgrads[name]) < 1e-10, name


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradcheck(dropout):
    model = _model(dropout=dropout)
    for p in model.params.values():
        p[...] = 0.3 * np.random.default_rng(7).standard_normal(p.shape)  # (a seed with no ReLU input near 0)
    b = _batch(2)
    rng = model.transformer.rng
    seed_state = rng.bit_generator.state

    def loss():  # the same dropout masks on every call
        rng.bit_generator.state = seed_state
        return model.loss(b)[0]

    rng.bit_generator.state = seed_state
    model.zero_grad()
    _, d = model.loss(b)
    model.backward(d)
    # central differences of a float64 loss: ~1e-6 on the smallest gradients (torch parity above is the exact check)
    errors = gradcheck(loss, model.params, model.grads, eps=1e-5, tol=1e-5)
    assert max(errors.values()) < 1e-5


def test_decode_steps_equal_the_full_forward():
    """The key/value cache: step-by-step log-probs equal the teacher-forced forward's, padding included."""
    model = _model()
    model.eval()
    b = _batch(3)
    logp_full = model.forward(b.src, b.src_len, b.tgt_in)
    memory = model.encode(b.src, b.src_len)
    state = memory.state
    for t in range(b.tgt_in.shape[0]):
        logp, state, a = model.decode_step(b.tgt_in[t], state, memory)
        ref = logp_full[t] - np.log(np.exp(logp_full[t] - logp_full[t].max(1, keepdims=True)).sum(1,
                                    keepdims=True)) - logp_full[t].max(1, keepdims=True)
        assert np.abs(logp - ref).max() < 1e-12
        assert np.allclose(a.sum(1), 1.0) and np.all(a[~memory.mask] == 0)  # no weight on padding
    heads = model.cross_attention_heads(b.src[: b.src_len[0], 0], [5, 6])
    assert heads.shape == (2, 3, b.src_len[0])
    assert np.allclose(heads.sum(-1), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_greedy_equals_beam_one_and_scores(dtype):
    model = _model(dtype=dtype, seed=5)
    for p in model.params.values():
        p[...] = 0.5 * np.random.default_rng(6).standard_normal(p.shape).astype(dtype)
    b = _batch(4)
    g = model.greedy(b.src, b.src_len, max_len=7, return_attention=True)
    one = model.beam_search(b.src, b.src_len, beam=1, max_len=7, return_attention=True)
    assert g.tokens == one.tokens
    assert np.allclose(g.logprob, one.logprob)
    wide = model.beam_search(b.src, b.src_len, beam=3, max_len=7)
    assert np.all(wide.logprob >= g.logprob - 1e-6)
    finished = [n for n, t in enumerate(wide.tokens) if len(t) < 7]  # ended with </s>: score is log p(y|x)
    if finished:
        s = model.score(b.src, b.src_len, [wide.tokens[n] for n in range(3)])
        assert np.allclose(s[finished], wide.logprob[finished], atol=1e-4)
    for att, n in zip(g.attention, range(3)):
        assert att.shape[1] == b.src_len[n]


def test_config_checks():
    with pytest.raises(ValueError, match="divisible"):
        TransformerSeq2SeqConfig(5, 5, d_model=10, heads=4)
    with pytest.raises(ValueError, match="arch"):
        TransformerSeq2SeqConfig(5, 5, arch="rnn")
    model = _model(max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model.forward(np.zeros((5, 1), np.int64) + 4, np.array([5]), np.array([[BOS], [EOS]]))


def test_cli_transformer_train_translate_eval(tmp_path, capsys):
    from bptt.cli import main

    out = tmp_path / "run"
    rc = main(["seq2seq", "train", "--task", "reverse", "--arch", "transformer", "--d-model", "16", "--heads", "2",
               "--layers", "1", "--ff", "32", "--max-steps", "30", "--eval-every", "15", "--eval-size", "20",
               "--batch-size", "16", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= summary["exact_match"] <= 1.0
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["arch"] == "transformer" and meta["config"]["d_model"] == 16
    png = tmp_path / "att.png"
    assert main(["seq2seq", "translate", str(out / "model.safetensors"), "abc", "--attention-png", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["seq2seq", "translate", str(out / "model.safetensors"), "abc", "--beam", "3"]) == 0
    assert main(["seq2seq", "eval", str(out / "model.safetensors"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] > 0
    # resuming a transformer run as an rnn is one clear line
    rc = main(["seq2seq", "train", "--task", "reverse", "--max-steps", "40", "--out", str(out), "--resume", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bptt: error:") and "transformer" in err[0]
    # and it resumes with --arch transformer
    assert main(["seq2seq", "train", "--task", "reverse", "--arch", "transformer", "--max-steps", "40",
                 "--eval-every", "20", "--eval-size", "10", "--out", str(out), "--resume", "--quiet"]) == 0
