"""End to end: bptt train / sample / eval on a tiny corpus in a temporary folder."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bptt.checkpoint import load_checkpoint
from bptt.cli import main

SMALL = ["--hidden", "16", "--layers", "2", "--seq-len", "10", "--batch-size", "4", "--eval-every", "10",
         "--sample-length", "20", "--no-progress", "--log-every", "1"]


@pytest.fixture
def corpus(tmp_path):
    words = ["to be", "or not", "that is", "the question", "whether 'tis", "nobler", "in the mind"]
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(words, 6)) for _ in range(200))
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


def train_losses(out):
    return [r["train_loss"] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())
            if "train_loss" in r]


def test_train_sample_eval(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "30", *SMALL]) == 0
    for name in ("last.safetensors", "best.safetensors", "last.json", "log.jsonl", "loss.png"):
        assert (out / name).exists(), name
    tensors, meta = load_checkpoint(out / "best.safetensors")
    assert meta["kind"] == "charlm" and meta["step"] == 30 and "rnn.weight_hh_l1" in tensors["model"]
    losses = train_losses(out)
    assert len(losses) == 30 and losses[-1] < losses[0]
    capsys.readouterr()

    assert main(["sample", str(out / "best.safetensors"), "--length", "50", "--prime", "to be", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("to be") and len(text) == len("to be") + 50 + 1

    assert main(["eval", str(out / "best.safetensors"), "--data", str(corpus), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["bits_per_char"] - result["loss"] / np.log(2)) < 1e-12
    assert result["characters"] == len(corpus.read_text()) - 1 and result["loss"] < np.log(len(set(corpus.read_text())))


def test_time_limit_before_the_first_evaluation_still_evaluates(tmp_path, corpus):
    """A run cut short by --max-time ends with an evaluation of the steps since the last one,
    so best.safetensors exists even when the limit came before --eval-every steps."""
    out = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(out), *SMALL, "--eval-every", "1000000", "--max-time", "0.03"]
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in log)
    assert 0 < steps < 1000000
    evals = [r for r in log if "val_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == steps
    _, meta = load_checkpoint(out / "best.safetensors")
    assert meta["step"] == steps
    _, last = load_checkpoint(out / "last.safetensors")  # written once, by that evaluation, with its loss
    assert last["step"] == steps and last["eval"]["val_loss"] == evals[0]["val_loss"]


@pytest.mark.parametrize("dropout", ["0.0", "0.3"])
def test_resume_equals_uninterrupted(tmp_path, corpus, dropout):
    common = ["--data", str(corpus), *SMALL, "--dropout", dropout, "--optimizer", "adam", "--lr", "3e-3"]
    assert main(["train", "--out", str(tmp_path / "a"), "--max-iters", "40", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--max-iters", "20", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--max-iters", "40", "--no-progress"]) == 0
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(a) == len(b) == 40
    assert a == b  # bit for bit
    ta, _ = load_checkpoint(tmp_path / "a" / "last.safetensors")
    tb, _ = load_checkpoint(tmp_path / "b" / "last.safetensors")
    for k, v in ta["model"].items():
        np.testing.assert_array_equal(tb["model"][k], v)


def _spawn_train(out, corpus, *extra):
    cmd = [sys.executable, "-m", "bptt.cli", "train", "--data", str(corpus), "--out", str(out), *SMALL,
           "--eval-every", "1", "--max-iters", "100000", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, seconds=60):
    """Until ``path`` exists and has content (the process must stay alive meanwhile)."""
    deadline = time.time() + seconds
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


def test_kill_during_training_leaves_a_loadable_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    proc = _spawn_train(out, corpus)
    _wait_for(out / "last.safetensors", proc)
    time.sleep(1.0)  # checkpoints are being rewritten every step now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] >= 1
    assert main(["train", "--out", str(out), "--resume", "--max-iters", str(meta["step"] + 3)]) == 0


def test_ctrl_c_saves_and_exits_130(tmp_path, corpus):
    out = tmp_path / "run"
    proc = _spawn_train(out, corpus, "--eval-every", "1000")
    _wait_for(out / "log.jsonl", proc)  # one step logged (--log-every 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: saved" in err
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] >= 1


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bptt.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("make,args,message", [
    (None, ["train", "--data", "missing.txt"], "no such file"),
    ("", ["train", "--data", "f.txt"], "empty"),
    (b"\x00\x01binary", ["train", "--data", "f.txt"], "binary"),
    (b"caf\xe9 au lait", ["train", "--data", "f.txt"], "--encoding"),
    ("short text", ["train", "--data", "f.txt"], "too short"),
    ("x" * 5000, ["train", "--data", "f.txt", "--lr", "-1"], "--lr"),
    ("x" * 5000, ["train", "--data", "f.txt", "--model", "lstm", "--hidden", "0"], "hidden"),
    ("x" * 5000, ["train", "--data", "f.txt", "--val-frac", "1.5"], "val_frac"),
    ("x" * 5000, ["train", "--data", "f.txt", "--out", "f.txt/sub"], "cannot write"),
    ("not a checkpoint", ["sample", "f.txt"], "not a valid checkpoint"),
    (None, ["sample", "nothere.safetensors"], "not found"),
    (None, ["eval", "nothere.safetensors", "--data", "x"], "not found"),
])
def test_bad_input_one_line_error(tmp_path, make, args, message):
    if make is not None:
        p = tmp_path / "f.txt"
        p.write_bytes(make) if isinstance(make, bytes) else p.write_text(make)
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and message in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bptt: error:")
    assert not (tmp_path / "runs").exists()  # a run that stops on bad input leaves no run directory behind


def test_bad_checkpoint_version_and_prime(tmp_path, corpus):
    from safetensors.numpy import save_file

    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "10", *SMALL]) == 0
    tensors, meta = load_checkpoint(out / "last.safetensors")
    before = (out / "last.safetensors").read_bytes()
    flat = {f"model.{k}": v for k, v in tensors["model"].items()}
    save_file(flat, str(tmp_path / "future.safetensors"), metadata={"bptt": json.dumps({**meta, "format_version": 99})})
    r = run_cli("sample", str(tmp_path / "future.safetensors"))
    assert r.returncode == 2 and "newer bptt" in r.stderr
    r = run_cli("sample", str(out / "last.safetensors"), "--prime", "to be Ω")
    assert r.returncode == 2 and "'Ω'" in r.stderr and r.stdout == ""
    r = run_cli("train", "--out", str(out), "--resume", "--lr", "nan")
    assert r.returncode == 2 and "--lr" in r.stderr
    assert (out / "last.safetensors").read_bytes() == before  # nothing overwritten


def test_exploding_loss_stops_and_keeps_last_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "10", *SMALL]) == 0
    before = (out / "last.safetensors").read_bytes()
    r = run_cli("train", "--out", str(out), "--resume", "--optimizer", "sgd")
    assert r.returncode == 2 and "--resume cannot change --optimizer rmsprop -> sgd" in r.stderr, r.stderr
    r = run_cli("train", "--out", str(out), "--resume", "--max-iters", "200", "--lr", "10", "--grad-clip", "0",
                "--eval-every", "1000")
    assert r.returncode == 1 and ("exploding" in r.stderr or "loss is nan" in r.stderr), r.stderr
    assert "Traceback" not in r.stderr and "the last checkpoint is kept" in r.stderr
    assert (out / "last.safetensors").read_bytes() == before


def test_log_hidden_stats(tmp_path, corpus):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "10", *SMALL,
                 "--log-hidden-stats", "5"]) == 0
    stats = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "h_var_l1" in r]
    assert [r["step"] for r in stats] == [5, 10]
    assert all(r["h_var_l0"] > 0 and -1 < r["h_mean_l1"] < 1 for r in stats)


def test_default_corpus_run_is_described(tmp_path):
    r = run_cli("train", "--out", str(tmp_path / "run"), "--max-iters", "2", "--hidden", "8", "--layers", "1",
                "--no-progress", "--sample-length", "0", "--eval-windows", "2")
    assert r.returncode == 0, r.stderr
    assert "built-in default" in r.stderr and "standard library" in r.stderr


def test_cli_main_module_runs_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout
