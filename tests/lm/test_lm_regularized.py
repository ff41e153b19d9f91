"""The char LM's regularisers: embedding dropout, tied weights, the recurrent layer's options
(gradients, errors, checkpoints), and `bptt train` / `bptt sample` with every option on."""

import json

import numpy as np
import pytest

from bptt.checkpoint import load_checkpoint
from bptt.cli import main
from bptt.lm.model import CharLM, CharLMConfig, load_model
from bptt.nn.gradcheck import gradcheck
from bptt.nn.losses import cross_entropy

ALL = dict(recurrent_dropout=0.2, weight_drop=0.3, zoneout=0.2, layer_norm=True, embedding_dropout=0.3,
           tie_weights=True)


@pytest.mark.parametrize("model,extra", [("lstm", dict(peephole=True)), ("gru", {}), ("rnn", {})])
def test_charlm_gradcheck_with_every_option(model, extra):
    cfg = CharLMConfig(vocab_size=6, model=model, hidden=5, layers=2, embedding=5, dropout=0.2, dtype="float64",
                       **ALL, **extra)
    lm = CharLM(cfg, rng=0)
    assert "decoder.weight" not in lm.params and lm.rnn.regularizer is not None
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, (4, 3)), rng.integers(0, 6, (4, 3))
    seed_state = lm.rng.bit_generator.state

    def forward_loss():  # the same masks on every call
        lm.rng.bit_generator.state = seed_state
        lm.rnn.regularizer.reset_masks()
        return lm.loss(x, y)

    def loss():
        return forward_loss()[0]

    _, dlogits, _ = forward_loss()
    lm.zero_grad()
    lm.backward(dlogits)
    errors = gradcheck(loss, lm.params, lm.grads, eps=1e-5, tol=1e-7)
    assert max(errors.values()) < 1e-7


def test_tied_weights_sum_both_gradients():
    """∂L/∂W_e is the embedding's scatter plus the decoder's product: each use checked alone."""
    cfg = CharLMConfig(vocab_size=5, hidden=4, layers=1, embedding=4, tie_weights=True, dtype="float64")
    lm = CharLM(cfg, rng=0)
    x, y = np.array([[0, 1], [2, 3]]), np.array([[1, 2], [3, 4]])
    _, dlogits, _ = lm.loss(x, y)
    lm.zero_grad()
    lm.backward(dlogits)
    total = lm.grads["embed.weight"].copy()
    h, _ = lm.rnn(lm.embed(x))  # the decoder's input (no dropout: off)
    logits, _ = lm.forward(x)
    _, dz = cross_entropy(logits, y)
    decoder_part = dz.reshape(-1, 5).T @ h.reshape(-1, 4)
    assert np.abs(total - decoder_part).max() > 1e-6  # the embedding's rows add to it ...
    lm.zero_grad()
    lm.decoder.backward(dz)
    np.testing.assert_allclose(lm.grads["embed.weight"], decoder_part, rtol=1e-12)


def test_config_errors_are_one_clear_line():
    with pytest.raises(ValueError, match=r"^tie_weights needs embedding == hidden .*got embedding 8 and hidden 16$"):
        CharLMConfig(vocab_size=5, hidden=16, embedding=8, tie_weights=True).validate()
    with pytest.raises(ValueError, match=r"^embedding_dropout needs a learned embedding"):
        CharLMConfig(vocab_size=5, embedding_dropout=0.1).validate()
    with pytest.raises(ValueError, match=r"^peepholes apply to the LSTM's cell state; a GRU has none$"):
        CharLMConfig(vocab_size=5, model="gru", peephole=True).validate()
    with pytest.raises(ValueError, match=r"^zoneout must be a number in \[0, 1\), got 1.0$"):
        CharLMConfig(vocab_size=5, zoneout=1.0).validate()


def test_embedding_dropout_and_everything_off_in_eval():
    cfg = CharLMConfig(vocab_size=6, hidden=4, layers=1, embedding=4, dtype="float64", **ALL)
    lm = CharLM(cfg, rng=0).eval()
    x = np.random.default_rng(1).integers(0, 6, (5, 2))
    a, _ = lm.forward(x)
    b, _ = lm.forward(x)
    np.testing.assert_array_equal(a, b)
    lm.train()
    c, _ = lm.forward(x)
    assert np.abs(c - a).max() > 1e-6


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to be", "or not", "that is", "the question"]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(100)), encoding="utf-8")
    return path


def test_train_and_sample_with_every_option(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(out), "--hidden", "12", "--layers", "2", "--embedding", "12",
            "--seq-len", "8", "--batch-size", "4", "--max-iters", "6", "--eval-every", "3", "--eval-windows", "2",
            "--sample-length", "10", "--no-progress", "--log-every", "1", "--recurrent-dropout", "0.2",
            "--weight-drop", "0.3", "--zoneout", "0.1", "--layer-norm", "--peephole", "--embedding-dropout", "0.1",
            "--tie-weights"]
    assert main(args) == 0
    tensors, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == 6
    for key in ("recurrent_dropout", "weight_drop", "zoneout", "layer_norm", "peephole", "embedding_dropout",
                "tie_weights"):
        assert meta["config"][key] == meta["train"][key] and meta["config"][key]
    assert "rnn.ln_c_weight_l1" in tensors["model"] and "rnn.weight_co_l0" in tensors["model"]
    assert "decoder.weight" not in tensors["model"]
    losses = [r["train_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    model, _, _ = load_model(out / "last.safetensors")
    assert model.config.layer_norm and model.config.tie_weights and not model.training
    capsys.readouterr()
    assert main(["sample", str(out / "last.safetensors"), "--length", "30", "--prime", "to", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("to") and len(text) == 2 + 30 + 1
    assert main(["eval", str(out / "last.safetensors"), "--data", str(corpus), "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["loss"])
    # bptt inspect reads the plain layers' caches: it refuses these models in one line
    assert main(["inspect", "units", str(out / "last.safetensors"), "--text", str(corpus), "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "does not support models with regularised or normalised cells" in err[0]


def test_train_flag_errors(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--tie-weights", "--embedding", "8",
                 "--hidden", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bptt: error: ") and "tie_weights needs embedding == hidden" in err[0]


def test_embedding_dropout_drops_whole_rows():
    """A dropped character is zero at every position of the window: its embedding row gets no gradient."""
    cfg = CharLMConfig(vocab_size=8, hidden=4, layers=1, embedding=3, embedding_dropout=0.5, dtype="float64")
    lm = CharLM(cfg, rng=3)
    x = np.tile(np.arange(8), (6, 1))  # every character at every position
    y = np.roll(x, 1, axis=1)
    _, dlogits, _ = lm.loss(x, y)
    lm.zero_grad()
    lm.backward(dlogits)
    row_norms = np.abs(lm.grads["embed.weight"]).sum(axis=1)
    assert (row_norms == 0).sum() >= 1 and (row_norms > 0).sum() >= 1


def test_resume_with_every_option_equals_uninterrupted(tmp_path, corpus):
    """The streams' locked masks are saved with the carried state, so a resumed run is bit for bit
    the uninterrupted one."""
    common = ["--data", str(corpus), "--hidden", "8", "--layers", "2", "--embedding", "8", "--seq-len", "6",
              "--batch-size", "3", "--eval-every", "5", "--eval-windows", "1", "--sample-length", "0", "--no-progress",
              "--log-every", "1", "--recurrent-dropout", "0.3", "--weight-drop", "0.3", "--zoneout", "0.2",
              "--layer-norm", "--peephole", "--embedding-dropout", "0.2", "--tie-weights", "--dropout", "0.2"]
    assert main(["train", "--out", str(tmp_path / "a"), "--max-iters", "12", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--max-iters", "5", *common]) == 0
    tensors, _ = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert set(tensors["masks"]) == {"h_l0", "h_l1"}
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--max-iters", "12", "--no-progress"]) == 0
    ta, _ = load_checkpoint(tmp_path / "a" / "last.safetensors")
    tb, _ = load_checkpoint(tmp_path / "b" / "last.safetensors")
    for k, v in ta["model"].items():
        np.testing.assert_array_equal(tb["model"][k], v)


def test_charlm_gradcheck_one_hot_input_with_layer_options():
    cfg = CharLMConfig(vocab_size=6, model="lstm", hidden=5, layers=2, embedding=0, dropout=0.2, dtype="float64",
                       recurrent_dropout=0.2, weight_drop=0.3, zoneout=0.2, layer_norm=True, peephole=True)
    lm = CharLM(cfg, rng=0)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, (4, 3)), rng.integers(0, 6, (4, 3))
    seed_state = lm.rng.bit_generator.state

    def forward_loss():
        lm.rng.bit_generator.state = seed_state
        lm.rnn.regularizer.reset_masks()
        return lm.loss(x, y)

    def loss():
        return forward_loss()[0]

    _, dlogits, _ = forward_loss()
    lm.zero_grad()
    lm.backward(dlogits)
    errors = gradcheck(loss, lm.params, lm.grads, eps=1e-5, tol=1e-7)
    assert max(errors.values()) < 1e-7


def test_recurrent_options_are_refused_for_the_transformer(tmp_path, corpus, capsys):
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "t"), "--model", "transformer",
                 "--zoneout", "0.1", "--layer-norm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bptt: error: --zoneout, --layer-norm: options of the recurrent models, not of --model transformer"]


def test_forget_bias_with_layer_norm_shifts_the_normalised_forget_gate():
    plain = CharLM(CharLMConfig(vocab_size=5, hidden=4, layers=2, layer_norm=True), rng=0)
    shifted = CharLM(CharLMConfig(vocab_size=5, hidden=4, layers=2, layer_norm=True, forget_bias=1.0), rng=0)
    for k in range(2):
        d = shifted.params[f"rnn.ln_ih_bias_l{k}"] - plain.params[f"rnn.ln_ih_bias_l{k}"]
        np.testing.assert_array_equal(d, np.r_[np.zeros(4), np.ones(4), np.zeros(8)])  # gates i f g o: f only
        np.testing.assert_array_equal(shifted.params[f"rnn.bias_ih_l{k}"], plain.params[f"rnn.bias_ih_l{k}"])


OUTSIDE_FLAGS = ["--weight-drop", "0.3", "--input-dropout", "0.2", "--output-dropout", "0.25"]


@pytest.mark.parametrize("embedding,extra", [(5, dict(embedding_dropout=0.3, tie_weights=True)), (0, {})],
                         ids=["embedding", "one-hot"])
def test_charlm_on_the_plain_path_equals_the_reference_loop(embedding, extra):
    """The char LM with weight drop and input/output dropout (plus embedding dropout and tied weights, which
    are the model's): the layer's compiled path and the NumPy loop give the same loss and gradients."""
    cfg = CharLMConfig(vocab_size=6, hidden=5, layers=2, embedding=embedding, dropout=0.2, dtype="float64",
                       weight_drop=0.3, input_dropout=0.2, output_dropout=0.25, **extra)
    lm = CharLM(cfg, rng=0)
    assert lm.rnn.regularizer.plain_path
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 6, (7, 3)), rng.integers(0, 6, (7, 3))
    seed_state = lm.rng.bit_generator.state
    results = []
    for reference in (True, False):
        lm.rnn.regularizer.force_reference = reference
        lm.rng.bit_generator.state = seed_state
        lm.rnn.regularizer.reset_masks()
        loss, dlogits, state = lm.loss(x, y)
        lm.zero_grad()
        lm.backward(dlogits)
        results.append((loss, {k: g.copy() for k, g in lm.grads.items()}, lm.rng.bit_generator.state))
    (la, ga, ra), (lb, gb, rb) = results
    assert abs(la - lb) < 1e-13 and ra == rb
    for k in ga:
        assert np.abs(ga[k] - gb[k]).max() <= 1e-12 * max(np.abs(ga[k]).max(), 1e-300), k


def test_train_flags_reach_the_plain_path(tmp_path, corpus):
    """--weight-drop, --input-dropout and --output-dropout: saved in the config, run on the compiled path,
    and a resumed run (stream masks saved with the state) is bit for bit the uninterrupted one."""
    from bptt.lm.train import TrainConfig

    cfg = TrainConfig(hidden=8, weight_drop=0.3, input_dropout=0.2, output_dropout=0.25)
    lm = CharLM(cfg.model_config(7), rng=0)
    assert lm.rnn.regularizer.plain_path and lm.rnn.regularizer.opts.input_dropout == 0.2
    common = ["--data", str(corpus), "--hidden", "8", "--layers", "2", "--seq-len", "6", "--batch-size", "3",
              "--eval-every", "5", "--eval-windows", "1", "--sample-length", "0", "--no-progress", "--log-every", "1",
              "--dropout", "0.2", *OUTSIDE_FLAGS]
    assert main(["train", "--out", str(tmp_path / "a"), "--max-iters", "12", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--max-iters", "5", *common]) == 0
    tensors, meta = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert set(tensors["masks"]) == {"x_l0", "x_l1", "y"}
    assert meta["config"]["input_dropout"] == 0.2 and meta["config"]["output_dropout"] == 0.25
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--max-iters", "12", "--no-progress"]) == 0
    ta, _ = load_checkpoint(tmp_path / "a" / "last.safetensors")
    tb, _ = load_checkpoint(tmp_path / "b" / "last.safetensors")
    for k, v in ta["model"].items():
        np.testing.assert_array_equal(tb["model"][k], v)
    model, _, _ = load_model(tmp_path / "a" / "best.safetensors")
    assert model.config.input_dropout == 0.2 and model.rnn.regularizer.plain_path
