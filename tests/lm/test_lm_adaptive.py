"""CharLM with an adaptive softmax (a word model's output layer): the whole model against torch
(Embedding → LSTM → AdaptiveLogSoftmaxWithLoss on the same weights), a float64 gradient check, exact
evaluation (``nll``) and sampling scores, the config and its checks, and the word vocabulary's order."""

from collections import Counter

import numpy as np
import pytest

from bptt.lm.model import CharLM, CharLMConfig, config_from_dict, default_cutoffs
from bptt.lm.units import WordUnits, tokenize
from bptt.nn.gradcheck import gradcheck, rel_error

V, H, E = 40, 12, 10
CUTOFFS = [5, 15]
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _model(dtype=np.float64, layers=1, **kw):
    cfg = CharLMConfig(V, "lstm", H, layers, embedding=E, dtype=np.dtype(dtype).name, adaptive_softmax=True,
                       cutoffs=list(CUTOFFS), div_value=2.0, **kw)
    return CharLM(cfg, rng=0)


def _torch_twin(torch, model, dtype):
    """The same model in torch, modules named as CharLM's so that its state dict loads unchanged."""
    tdt = torch.float64 if dtype == np.float64 else torch.float32

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, E, dtype=tdt)
            self.rnn = torch.nn.LSTM(E, H, model.config.layers, dtype=tdt)
            self.decoder = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, CUTOFFS, div_value=2.0, head_bias=True, dtype=tdt)

        def hidden(self, ids):
            return self.rnn(self.embed(ids))[0]

    twin = Twin()
    twin.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    return twin


def _batch(rng, T=7, N=4):
    ids = rng.integers(0, V, (T + 1, N))
    ids[1, :3] = [2, 9, 30]  # the head and both clusters among the targets
    return ids[:-1], ids[1:]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layers", [1, 2])
def test_loss_gradients_and_log_probs_match_torch(torch, dtype, layers):
    model = _model(dtype, layers)
    twin = _torch_twin(torch, model, dtype)
    x, y = _batch(np.random.default_rng(layers))
    loss, dout, _ = model.loss(x, y)
    model.zero_grad()
    model.backward(dout)
    h = twin.hidden(torch.tensor(x))
    t_out = twin.decoder(h.reshape(-1, H), torch.tensor(y).reshape(-1))
    t_out.loss.backward()
    tol = TOL[dtype]
    assert dout.shape == y.shape and dout.dtype == dtype
    assert abs(loss - t_out.loss.item()) <= tol * abs(loss)
    for name, p in twin.named_parameters():
        assert rel_error(model.grads[name], p.grad.numpy()) < tol, name
    # forward's "logits": every word's log-probability (what sampling draws from), equal to torch's log_prob
    model.eval()
    logp, _ = model.forward(x)
    with torch.no_grad():
        t_logp = twin.decoder.log_prob(twin.hidden(torch.tensor(x)).reshape(-1, H)).numpy().reshape(logp.shape)
    assert logp.shape == (*x.shape, V) and rel_error(logp, t_logp) < tol
    # the stateful step gives the same rows, one position at a time
    model.reset_state()
    steps = np.stack([model.step(x[t]) for t in range(len(x))])
    assert rel_error(steps, logp) < tol


def test_gradcheck_through_the_whole_model():
    model = _model(np.float64, layers=1)
    for p in model.params.values():
        p *= 3  # larger weights: gradients far from zero everywhere
    x, y = _batch(np.random.default_rng(4), T=4, N=3)

    def f():
        return model.loss(x, y)[0]

    model.zero_grad()
    _, dout, _ = model.loss(x, y)
    model.backward(dout)
    gradcheck(f, model.params, model.grads, tol=1e-7)


def test_nll_is_the_exact_log_probability_of_each_target():
    model = _model(np.float64).eval()
    x, y = _batch(np.random.default_rng(5))
    logp, _ = model.forward(x)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-13)  # a distribution over all V words
    picked = np.take_along_axis(logp, y[..., None], -1)[..., 0]
    total, state = model.nll(x, y)
    assert total == pytest.approx(-picked.sum(), rel=1e-13)
    mask = np.random.default_rng(6).random(y.shape) < 0.5
    assert model.nll(x, y, mask=mask)[0] == pytest.approx(-picked[mask].sum(), rel=1e-13)
    # the state carried on equals forward's
    assert rel_error(state[0], model.forward(x)[1][0]) == 0.0
    # and the training loss is their mean
    assert model.loss(x, y)[0] == pytest.approx(total / y.size, rel=1e-13)


def test_config_round_trip_old_configs_and_checks():
    model = _model()
    d = model.config.to_dict()
    assert d["adaptive_softmax"] is True and d["cutoffs"] == CUTOFFS and d["div_value"] == 2.0
    again = CharLM(config_from_dict(d), rng=1)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())
    assert sorted(model.state_dict()) == ["decoder.head.bias", "decoder.head.weight", "decoder.tail.0.0.weight",
                                          "decoder.tail.0.1.weight", "decoder.tail.1.0.weight",
                                          "decoder.tail.1.1.weight", "embed.weight", "rnn.bias_hh_l0",
                                          "rnn.bias_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    # a config saved before the adaptive softmax existed: the full softmax
    old = {k: v for k, v in d.items() if k not in ("adaptive_softmax", "cutoffs", "div_value")}
    plain = CharLM(config_from_dict(old), rng=0)
    assert not plain.config.adaptive_softmax and plain.state_dict()["decoder.weight"].shape == (V, H)
    for bad, match in [({"cutoffs": [5, 40]}, r"cutoffs must be increasing whole numbers in \[1, V - 1\] = \[1, 39\]"),
                       ({"cutoffs": [15, 5]}, "cutoffs must be increasing"), ({"cutoffs": []}, "cutoffs must be"),
                       ({"div_value": 0.0}, "div_value must be a finite number > 0"),
                       ({"tie_weights": True, "embedding": H}, "tie_weights and adaptive_softmax do not combine"),
                       ({"adaptive_softmax": False}, "apply to an adaptive softmax only")]:
        with pytest.raises(ValueError, match=match):
            config_from_dict(d | bad)


@pytest.mark.parametrize("V_, expected", [(30000, [2000, 10000]), (10000, [666, 3333]), (63, [4, 21]),
                                          (15, [1, 5]), (4, [1]), (3, [1])])
def test_default_cutoffs(V_, expected):
    assert default_cutoffs(V_) == expected


def test_word_ids_are_numbered_by_frequency():
    """The adaptive softmax's cutoffs assume it: after <unk> and <eos>, id order is count order."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    p = 1.0 / np.arange(1, 201)
    text = "".join(" ".join(rng.choice(words, 9, p=p / p.sum())) + "\n" for _ in range(400))
    counts = Counter(t for t in tokenize(text) if t != "<eos>")
    for units in (WordUnits.fit(text), WordUnits.fit(text, vocab_size=50)):
        c = [counts[w] for w in units.tokens[2:]]
        assert c == sorted(c, reverse=True) and c[0] == max(counts.values())
