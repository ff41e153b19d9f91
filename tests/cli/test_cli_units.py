"""bptt train / sample / eval with --unit char|byte|word, --val-data/--test-data and --truncation (issue 22)."""

import json
from pathlib import Path

import numpy as np
import pytest

from bptt.checkpoint import load_checkpoint, save_checkpoint
from bptt.cli import main
from bptt.lm.model import load_model
from bptt.lm.units import ByteUnits, CharUnits, WordUnits

TINY = ["--hidden", "12", "--layers", "1", "--seq-len", "8", "--batch-size", "3", "--eval-every", "10",
        "--sample-length", "12", "--no-progress", "--log-every", "1"]
WORDS = "the cat dog sat on a mat and ran to big red house".split()


def _lines(rng, n, words):
    return "".join(" ".join(rng.choice(words, 7)) + " .\n" for _ in range(n))


@pytest.fixture
def split_files(tmp_path):
    """train/valid/test files; valid and test hold words (and so characters) the training file lacks."""
    rng = np.random.default_rng(0)
    files = {"train": _lines(rng, 120, WORDS),
             "valid": _lines(rng, 20, WORDS) + "zebra quokka the cat .\n",
             "test": _lines(rng, 20, WORDS) + "the yak sat on a mat .\n"}
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_char_units_with_split_files_count_unknown_characters(tmp_path, split_files, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(split_files["train"]), "--val-data", str(split_files["valid"]),
                 "--test-data", str(split_files["test"]), "--out", str(out), "--max-iters", "20", *TINY]) == 0
    err = capsys.readouterr().err
    valid = split_files["valid"].read_text()
    train_chars = set(split_files["train"].read_text())
    unseen = sorted(set(valid) - train_chars)  # z, q, k
    n_unseen = sum(valid.count(c) for c in unseen)
    assert unseen and f"validation: {len(valid):,} characters, {n_unseen} unknown (<unk>)" in err, err
    assert "test (best.safetensors, step" in err and "unknown (<unk>)" in err
    _, meta = load_checkpoint(out / "best.safetensors")
    assert meta["units"] == {"kind": "char", "chars": sorted(train_chars), "unk": True} and "vocab" not in meta
    assert [r["val_unknown"] for r in _log(out) if "val_loss" in r] == [n_unseen, n_unseen]

    assert main(["eval", str(out / "best.safetensors"), "--data", str(split_files["valid"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["unknown_count"] == n_unseen and res["unknown"] == unseen and res["characters"] == len(valid) - 1
    assert main(["eval", str(out / "best.safetensors"), "--data", str(split_files["valid"])]) == 0
    assert f"{n_unseen} unknown (<unk>)" in capsys.readouterr().out


def test_word_units_perplexity_equals_numpy_on_the_models_logits(tmp_path, split_files, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(split_files["train"]), "--val-data", str(split_files["valid"]),
                 "--test-data", str(split_files["test"]), "--unit", "word", "--vocab-size", "10", "--dtype", "float64",
                 "--out", str(out), "--max-iters", "20", *TINY]) == 0
    err = capsys.readouterr().err
    assert "--embedding 256" in err and "perplexity" in err and "test (best.safetensors" in err
    model, units, meta = load_model(out / "best.safetensors")
    assert isinstance(units, WordUnits) and len(units) == 10 and model.config.embedding == 256
    assert meta["units"]["kind"] == "word"

    text = split_files["test"].read_text()  # < 400 tokens: bptt eval reads it as one stream
    assert main(["eval", str(out / "best.safetensors"), "--data", str(split_files["test"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    # independently: the tokens, the model's logits over the whole text, a log-softmax in NumPy
    tokens = text.replace(".", " . ").replace("\n", " <eos> ").split()
    kept = set(units.tokens)
    ids = np.array([units.index.get(t, 0) for t in tokens])
    logits, _ = model.forward(ids[:-1, None])
    z = logits[:, 0, :] - logits[:, 0, :].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert res["words"] == len(tokens) - 1
    assert res["unknown_count"] == sum(t not in kept for t in tokens) > 0
    assert res["perplexity"] == pytest.approx(np.exp(nll), rel=1e-10)
    assert main(["eval", str(out / "best.safetensors"), "--data", str(split_files["test"])]) == 0
    assert f"perplexity {np.exp(nll):.3f} per word" in capsys.readouterr().out

    prime = f"{units.tokens[2]} {units.tokens[3]}"  # the two most frequent words
    assert main(["sample", str(out / "best.safetensors"), "--length", "15", "--seed", "0", "--prime", prime]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith(prime) and all(w in kept or w in ".," for w in sample.split())


def test_byte_units_train_on_a_file_that_is_not_utf8(tmp_path, capsys):
    data = tmp_path / "mixed.bin"
    rng = np.random.default_rng(1)
    data.write_bytes(b"".join(("caf\xe9 na\xefve " * 3).encode("latin-1") + bytes(rng.integers(0, 256, 8, dtype=np.uint8))
                              for _ in range(60)))
    with pytest.raises(UnicodeDecodeError):
        data.read_bytes().decode("utf-8")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--unit", "byte", "--out", str(out), "--max-iters", "20", *TINY]) == 0
    model, units, _ = load_model(out / "best.safetensors")
    assert isinstance(units, ByteUnits) and model.config.vocab_size == 256
    capsys.readouterr()
    assert main(["sample", str(out / "best.safetensors"), "--length", "60", "--seed", "3", "--prime", "caf"]) == 0
    assert capsys.readouterr().out.startswith("caf")  # whatever bytes come, the decoding shows them
    assert main(["eval", str(out / "best.safetensors"), "--data", str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    n = data.stat().st_size
    assert res["bytes"] == n - 1 and res["unknown_count"] == 0
    chars = len(data.read_bytes().decode("utf-8", "replace"))
    assert res["nats_per_char"] == pytest.approx(res["loss"] * (n - 1) / (chars - 1), rel=1e-12)
    assert main(["eval", str(out / "best.safetensors"), "--data", str(data)]) == 0
    assert "nats/byte" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--truncation", "variable"], ["--truncation", "randomized"],
                                   ["--unit", "word", "--embedding", "8"],
                                   ["--model", "transformer", "--d-model", "8", "--heads", "2", "--truncation", "variable"]],
                         ids=["variable", "randomized", "word", "transformer-variable"])
def test_resume_equals_uninterrupted(tmp_path, split_files, extra):
    """Across epoch boundaries (about 12 windows an epoch here): the windows of every epoch, the carried state
    and the learning rate come back exactly."""
    common = ["--data", str(split_files["train"]), "--val-data", str(split_files["valid"]), *TINY, *extra,
              "--dtype", "float64", "--batch-size", "32", "--seq-len", "12"]
    if "word" in extra:
        common += ["--seq-len", "4"]
    assert main(["train", "--out", str(tmp_path / "a"), "--max-iters", "30", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--max-iters", "20", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--max-iters", "30", "--no-progress"]) == 0
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    a = [(r["train_loss"], r["lr"], r["epoch"]) for r in la if "train_loss" in r]
    b = [(r["train_loss"], r["lr"], r["epoch"]) for r in lb if "train_loss" in r]
    assert len(a) == 30 and a == b  # bit for bit
    ta, ma = load_checkpoint(tmp_path / "a" / "last.safetensors")
    tb, mb = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert ma["data"] == mb["data"]
    assert a[-1][2] > 1.5  # crossed epochs
    if "variable" in extra:
        assert len({r[1] for r in a}) > 3  # lr scaled by T_k / T
    if "transformer" in extra:  # variable windows, but none longer than the context (= --seq-len)
        assert ma["train"]["truncation"] == "variable"
    for k, v in ta["model"].items():
        np.testing.assert_array_equal(tb["model"][k], v)


def test_old_checkpoint_with_a_vocab_loads_as_char_units(tmp_path, split_files, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(split_files["train"]), "--out", str(out), "--max-iters", "5", *TINY]) == 0
    tensors, meta = load_checkpoint(out / "last.safetensors")
    units = meta.pop("units")
    meta["vocab"] = units["chars"]
    save_checkpoint(tmp_path / "old.safetensors", tensors, meta)
    _, loaded, _ = load_model(tmp_path / "old.safetensors")
    assert loaded == CharUnits(units["chars"])
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "old.safetensors"), "--length", "10", "--seed", "0", "--prime", "the"]) == 0
    assert len(capsys.readouterr().out) == len("the") + 10 + 1


# ---------------------------------------------------------------------------- bad input: one line, exit 2
def _one_line_error(capsys, argv, expect):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("bptt: error:")]
    assert len(lines) == 1 and expect in lines[0], captured.err
    return captured


@pytest.mark.parametrize("case", ["empty-valid", "latin1-test", "vocab-0", "vocab-too-big", "transformer-randomized",
                                  "randomized-layer-norm"])
def test_bad_training_input(tmp_path, split_files, capsys, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 .\n".encode("latin-1") * 10)
    extra, expect = {
        "empty-valid": (["--val-data", str(empty)], "--val-data: " + str(empty) + ": file is empty"),
        "latin1-test": (["--test-data", str(latin)], "--test-data: " + str(latin) + ": cannot decode byte 0xe9"),
        "vocab-0": (["--unit", "word", "--vocab-size", "0"], "--vocab-size must be >= 3"),
        "vocab-too-big": (["--unit", "word", "--vocab-size", "50"], "--vocab-size 50 is larger than the training text"),
        "transformer-randomized": (["--model", "transformer", "--truncation", "randomized"], "no recurrence"),
        "randomized-layer-norm": (["--truncation", "randomized", "--layer-norm"], "does not combine with --layer-norm"),
    }[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(capsys, ["train", "--data", str(split_files["train"]), "--out", str(out), "--max-iters", "5",
                             *TINY, *extra], expect)
    # no checkpoint, log or plot: nothing of a run written (the lock file is the run directory's own)
    assert {p.name for p in out.iterdir()} <= {"keep.txt", ".lock", "corpus.npy"}
    assert (out / "keep.txt").read_text() == "mine"


def test_byte_model_refuses_a_prime_that_is_not_utf8(tmp_path, split_files, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(split_files["train"]), "--unit", "byte", "--out", str(out),
                 "--max-iters", "3", *TINY]) == 0
    capsys.readouterr()
    before = (out / "best.safetensors").read_bytes()
    bad = b"ab\xff".decode("utf-8", "surrogateescape")  # what Python makes of such a command-line argument
    captured = _one_line_error(capsys, ["sample", str(out / "best.safetensors"), "--prime", bad],
                               "not valid UTF-8 (byte 0xff at character 2)")
    assert captured.out == "" and (out / "best.safetensors").read_bytes() == before


def test_word_model_refuses_unknown_prime_words(tmp_path, split_files, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(split_files["train"]), "--unit", "word", "--embedding", "4", "--out", str(out),
                 "--max-iters", "3", *TINY]) == 0
    capsys.readouterr()
    captured = _one_line_error(capsys, ["sample", str(out / "best.safetensors"), "--prime", "the zebra"],
                               "1 word(s) this model does not know ('zebra')")
    assert captured.out == ""
    # the character-only tools say so in one line
    _one_line_error(capsys, ["inspect", "gates", str(out / "best.safetensors"), "--out", str(tmp_path / "g.png")],
                    "bptt inspect reads character models")
    assert not (tmp_path / "g.png").exists()
