"""``bptt train --model transformer``: trained, resumed, sampled and evaluated by the same commands as an LSTM."""

import json

import numpy as np
import pytest

from bptt.checkpoint import load_checkpoint
from bptt.cli import main
from bptt.lm.data import Vocab
from bptt.lm.sample import generate
from bptt.lm.transformer import TransformerLM, TransformerLMConfig

TINY = ["--model", "transformer", "--layers", "2", "--d-model", "16", "--heads", "2", "--seq-len", "12",
        "--batch-size", "4", "--optimizer", "adamw", "--lr", "3e-3", "--eval-every", "10", "--sample-length", "0",
        "--no-progress", "--log-every", "1", "--dtype", "float64"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("the cat sat on the mat. the dog sat on the log.\n" * 50, encoding="utf-8")
    return path


def losses(out):
    return [r["train_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_loss" in r]


def test_resume_equals_uninterrupted(tmp_path, corpus):
    args = ["train", "--data", str(corpus), *TINY, "--dropout", "0.1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--max-iters", "20"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--max-iters", "10"]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--max-iters", "20"]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # float64, same dropout masks: identical
    ta, ma = load_checkpoint(tmp_path / "a" / "last.safetensors")
    tb, mb = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert ma["config"]["model"] == "transformer" and ma["step"] == mb["step"] == 20
    for k, v in ta["model"].items():
        np.testing.assert_array_equal(v, tb["model"][k])


def test_sample_past_the_context_and_eval(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "10"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out / "best.safetensors"), "--length", "100", "--seed", "3", "--prime", "the "]) == 0
    assert len(capsys.readouterr().out) == len("the ") + 100 + 1  # 100 > context 12: generation slides on
    assert main(["eval", str(out / "best.safetensors"), "--data", str(corpus), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["characters"] == corpus.stat().st_size - 1 and 0 < res["loss"] < np.log(20)
    assert main(["sample", str(out / "best.safetensors"), "--prime", "t" * 13]) == 2
    err = capsys.readouterr().err
    assert "reads at most 12" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["--d-model", "18", "--heads", "4"], "divisible by heads"),
    (["--context", "8"], "longer than the transformer's --context 8"),
])
def test_bad_transformer_options(tmp_path, corpus, capsys, args, message):
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "r"), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "last.safetensors").exists()


def test_resume_cannot_switch_architecture(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "10"]) == 0
    before = (out / "last.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--model", "lstm"]) == 2
    assert "--resume cannot change --model transformer -> lstm" in capsys.readouterr().err
    assert (out / "last.safetensors").read_bytes() == before


def test_sliding_generation_reads_the_last_half_context():
    """Once the cache is full, each new character is predicted from the last C/2..C positions, exactly as a
    fresh forward over those positions predicts it."""
    C, V = 8, 5
    model = TransformerLM(TransformerLMConfig(vocab_size=V, layers=2, d_model=8, heads=2, context=C, dtype="float64"),
                          rng=1)
    vocab = Vocab("abcde")
    text = generate(model, vocab, 30, prime="ab", argmax=True)
    ids = list(vocab.encode("ab" + text))
    # replay: the history the stepper keeps, and the argmax of a full forward over it
    history = []
    for pos, nxt in enumerate(ids[1:], start=1):
        cur = ids[pos - 1]
        if len(history) == C:
            history = history[-(C // 2):]
        history.append(cur)
        logits, _ = model.forward(np.array(history)[:, None])
        assert int(np.argmax(logits[-1, 0])) == nxt or pos < 2  # positions of the prime are given, not drawn
