"""The deployment commands end to end, through ``bptt`` itself: train, export, then sample / eval /
translate from the ONNX files in ONNX Runtime, against the same commands on the safetensors checkpoint."""

import json

import pytest
from onnx_support import require_onnx

require_onnx()

from bptt.cli import main  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40


@pytest.fixture
def charlm_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--hidden", "16", "--layers", "2",
                 "--seq-len", "10", "--batch-size", "4", "--max-iters", "20", "--eval-every", "20",
                 "--sample-length", "0", "--no-progress"]) == 0
    return corpus, out / "best.safetensors"


def test_export_then_sample_and_eval_in_onnx_runtime(charlm_run, tmp_path, capsys):
    corpus, ckpt = charlm_run
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--out", str(onnx_path), "--graph", "step"]) == 0
    capsys.readouterr()
    outputs = {}
    for path in (ckpt, onnx_path):
        assert main(["sample", str(path), "--seed", "7", "--length", "120", "--prime", "the ", "--temperature", "0.8"]) == 0
        outputs[path.suffix] = capsys.readouterr().out
    assert len(outputs[".onnx"]) > 100 and outputs[".onnx"] == outputs[".safetensors"]

    seq_path = tmp_path / "model_seq.onnx"
    assert main(["export", str(ckpt), "-o", str(seq_path)]) == 0  # the full-sequence graph scores text
    capsys.readouterr()
    scores = {}
    for path in (ckpt, seq_path):
        assert main(["eval", str(path), "--data", str(corpus), "--json"]) == 0
        scores[path.suffix] = json.loads(capsys.readouterr().out)
    assert scores[".onnx"]["characters"] == scores[".safetensors"]["characters"] == len(TEXT) - 1
    assert scores[".onnx"]["loss"] == pytest.approx(scores[".safetensors"]["loss"], rel=1e-5)


def test_export_refuses_bad_input_with_one_line(charlm_run, tmp_path, capsys):
    corpus, ckpt = charlm_run
    assert main(["export", str(corpus), "--out", str(tmp_path / "x.onnx")]) == 2  # not a checkpoint
    err = capsys.readouterr().err
    assert err.startswith("bptt: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
    truncated = tmp_path / "cut.onnx"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "ok.onnx")]) == 0
    truncated.write_bytes((tmp_path / "ok.onnx").read_bytes()[:500])
    capsys.readouterr()
    assert main(["sample", str(truncated), "--length", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bptt: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("arch", [["--hidden", "16", "--embedding", "8", "--attention", "general", "--bidirectional"],
                                  ["--arch", "transformer", "--d-model", "16", "--heads", "2", "--ff", "32", "--lr", "1e-2"]],
                         ids=["rnn", "transformer"])
def test_seq2seq_export_then_translate_from_the_folder(tmp_path, capsys, arch):
    out = tmp_path / "s2s"
    steps = "300" if "transformer" in arch else "150"  # the Transformer's first outputs come later
    assert main(["seq2seq", "train", "--task", "reverse", "--batch-size", "16", "--max-steps", steps, "--eval-every",
                 steps, "--eval-size", "20", *arch, "--out", str(out), "--quiet"]) == 0
    ckpt = out / "model.safetensors"
    folder = tmp_path / "s2s_onnx"
    assert main(["export", str(ckpt), "--out", str(folder)]) == 0
    assert (folder / "encoder.onnx").exists() and (folder / "decoder_step.onnx").exists()
    capsys.readouterr()
    for beam in ("1", "3"):
        results = []
        for model in (ckpt, folder):
            assert main(["seq2seq", "translate", str(model), "abcde", "--beam", beam]) == 0
            results.append(capsys.readouterr().out)
        assert results[0] == results[1] and results[0].strip()
    assert main(["seq2seq", "translate", str(out), "abcde"]) == 2  # the run's folder, not the export's
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.strip().endswith(f"give a checkpoint file instead: {ckpt}")
    assert main(["seq2seq", "eval", str(folder), "--json"]) == 0
    onnx_res = json.loads(capsys.readouterr().out)
    assert main(["seq2seq", "eval", str(ckpt), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert onnx_res["exact_match"] == ref["exact_match"] and onnx_res["n"] == ref["n"]


@pytest.mark.parametrize("unit", ["byte", "word"])
def test_byte_and_word_models_export_too(tmp_path, capsys, unit):
    """The units (bytes, or words with <unk> and <eos>) go into the file's metadata as the checkpoint holds
    them, so sampling and scoring from the ONNX file give the checkpoint's text and loss."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--unit", unit, "--hidden", "16", "--seq-len", "10",
                 "--batch-size", "4", "--max-iters", "20", "--eval-every", "20", "--sample-length", "0",
                 "--no-progress"]) == 0
    ckpt, path = out / "best.safetensors", tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--out", str(path)]) == 0
    capsys.readouterr()
    texts, scores = [], []
    for model in (ckpt, path):
        assert main(["sample", str(model), "--seed", "3", "--length", "40", "--prime", "the "]) == 0
        texts.append(capsys.readouterr().out)
        assert main(["eval", str(model), "--data", str(corpus), "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert texts[0] == texts[1] and len(texts[0]) > 40
    assert scores[1]["unit"] == scores[0]["unit"] == ("byte" if unit == "byte" else "word")
    assert scores[1]["loss"] == pytest.approx(scores[0]["loss"], rel=1e-5) and scores[1]["count"] == scores[0]["count"]
