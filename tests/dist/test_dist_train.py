"""``bptt train`` and ``bptt seq2seq train`` under ``mpiexec -n K``: the same run as one process.

The one-process runs go through :func:`bptt.cli.main` in this process; the K-rank runs are
``mpiexec -n K python -m bptt.cli ...`` (no extra flag: mpiexec alone makes them data parallel).
Float64 char LM, dropout 0: parameters, optimizer state, carried hidden state and logged losses
agree to 1e-12 relative.  The seq2seq model is float32 (its CLI has no --dtype): 1e-4 after 20 steps.
"""

import importlib.util
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
from bptt.dist import world as world_mod

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("mpi_launch", HERE / "mpi_launch.py")
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

LM_ARGS = ["--hidden", "16", "--layers", "2", "--seq-len", "10", "--batch-size", "7", "--dtype", "float64",
           "--eval-every", "5", "--log-every", "2", "--eval-windows", "3", "--sample-length", "0", "--no-progress",
           "--optimizer", "adam", "--lr", "0.01", "--clip-mode", "norm", "--grad-clip", "1.0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "\n"]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(" ".join(rng.choice(words, size=3000)))
    return path


@pytest.fixture
def mpirun():
    return launch.launcher()


@pytest.fixture(autouse=True)
def one_process_world(monkeypatch):
    """The in-process runs must see no launcher (pytest itself might run under one)."""
    for var in (v for pair in world_mod.LAUNCHER_VARS for v in pair):
        monkeypatch.delenv(var, raising=False)
    world_mod.forget_world()
    yield
    world_mod.forget_world()


def assert_same_checkpoint(a_path, b_path, rtol):
    a, meta_a = load_checkpoint(a_path)
    b, meta_b = load_checkpoint(b_path)
    assert meta_a["step"] == meta_b["step"]
    assert sorted(a) == sorted(b)
    for ns in a:
        assert sorted(a[ns]) == sorted(b[ns]), ns
        for k in a[ns]:
            x, y = a[ns][k], b[ns][k]
            assert x.shape == y.shape, (ns, k)
            rel = np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-300)
            assert rel < rtol, f"{ns}.{k}: relative difference {rel:.2e}"
    return meta_a, meta_b


def train_records(path):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if "train_loss" in r]


def test_two_ranks_train_the_char_lm_as_one_process(mpirun, corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--data", str(corpus), *LM_ARGS, "--max-iters", "12", "--out", str(one)]) == 0
    proc = mpirun(2, "-m", "bptt.cli", "train", "--data", corpus, *LM_ARGS, "--max-iters", "12", "--out", two)
    assert proc.returncode == 0, proc.stderr
    assert "data parallel over MPI: 2 ranks" in proc.stderr
    assert proc.stderr.count("corpus:") == 1 and proc.stderr.count("step 10: val loss") == 1  # rank 0 speaks

    meta1, meta2 = assert_same_checkpoint(one / "last.safetensors", two / "last.safetensors", 1e-12)
    assert load_checkpoint(two / "last.safetensors")[0]["state"]["h"].shape == (2, 7, 16)  # all 7 streams
    assert meta1["eval"]["val_loss"] == pytest.approx(meta2["eval"]["val_loss"], rel=1e-12)
    r1, r2 = train_records(one / "log.jsonl"), train_records(two / "log.jsonl")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [2, 4, 6, 8, 10, 12]
    for a, b in zip(r1, r2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12)  # the global loss, not rank 0's


def test_a_checkpoint_resumes_exactly_with_another_number_of_ranks(mpirun, corpus, tmp_path):
    """12 steps on 2 ranks, then to 20 on 1; and 12 on 1, then to 20 on 3: both equal 20 steps on 1."""
    ref, a, b = tmp_path / "ref", tmp_path / "a", tmp_path / "b"
    assert main(["train", "--data", str(corpus), *LM_ARGS, "--max-iters", "20", "--out", str(ref)]) == 0
    proc = mpirun(2, "-m", "bptt.cli", "train", "--data", corpus, *LM_ARGS, "--max-iters", "12", "--out", a)
    assert proc.returncode == 0, proc.stderr
    assert main(["train", "--out", str(a), "--resume", "--max-iters", "20"]) == 0
    assert_same_checkpoint(ref / "last.safetensors", a / "last.safetensors", 1e-12)

    assert main(["train", "--data", str(corpus), *LM_ARGS, "--max-iters", "12", "--out", str(b)]) == 0
    proc = mpirun(3, "-m", "bptt.cli", "train", "--out", b, "--resume", "--max-iters", "20")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr
    assert_same_checkpoint(ref / "last.safetensors", b / "last.safetensors", 1e-12)


def test_three_ranks_train_seq2seq_as_one_process(mpirun, tmp_path, capsys):
    """9 pairs a batch on 3 ranks (3 each, different token counts: weighted); evaluation pairs shared out."""
    args = ["--task", "reverse", "--hidden", "24", "--embedding", "8", "--batch-size", "9", "--max-steps", "20",
            "--eval-every", "10", "--eval-size", "23", "--log-every", "5", "--lr", "0.02", "--quiet"]
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(["seq2seq", "train", *args, "--out", str(one)]) == 0
    printed_one = json.loads(capsys.readouterr().out)
    proc = mpirun(3, "-m", "bptt.cli", "seq2seq", "train", *args, "--out", three)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1  # the summary, once
    printed = json.loads(lines[0])
    assert printed["token_accuracy"] == printed_one["token_accuracy"] > 0
    assert printed["exact_match"] == printed_one["exact_match"]
    assert_same_checkpoint(one / "model.safetensors", three / "model.safetensors", 1e-4)


def test_a_bad_input_on_one_rank_stops_every_rank_with_one_line(mpirun, corpus, tmp_path):
    proc = mpirun(2, "dist_cli_job.py", "--fail-on-rank", "1", "--fail-at-step", "3", "--",
                  "train", "--data", corpus, *LM_ARGS, "--max-iters", "50", "--out", tmp_path / "run", timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bptt:")]
    assert errors == ["bptt: error: a bad input seen by rank 1 at step 3"]
    assert not (tmp_path / "run" / "last.safetensors").exists()


@pytest.mark.parametrize("args, says", [
    (["--batch-size", "1"], "bptt: error: a batch of 1 rows cannot be shared by 2 ranks"),
    (["--data", "/nonexistent/corpus.txt"], "bptt: error: /nonexistent/corpus.txt: no such file"),
])
def test_a_setup_error_is_said_once(mpirun, corpus, tmp_path, args, says):
    proc = mpirun(2, "-m", "bptt.cli", "train", "--data", corpus, *LM_ARGS, "--max-iters", "5",
                  "--out", tmp_path / "run", *args, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bptt:")]
    assert len(errors) == 1 and errors[0].startswith(says), proc.stderr


def test_under_mpiexec_without_mpi4py_one_line_says_what_to_install(mpirun, corpus, tmp_path):
    proc = mpirun(2, "dist_cli_job.py", "--hide-mpi4py", "--", "train", "--data", corpus, *LM_ARGS,
                  "--max-iters", "5", "--out", tmp_path / "run", timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bptt:")]
    assert errors == ['bptt: error: launched by mpiexec with 2 ranks but mpi4py is not installed: '
                      'pip install "bptt[mpi]"']
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.safetensors"))


def test_ctrl_c_stops_every_rank_at_one_step_and_saves_once(corpus, tmp_path):
    """SIGINT to mpiexec (hydra passes it to the ranks): one checkpoint, one message, status 130, and it resumes."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [launch.require_mpi(), "-n", "2", sys.executable, "-m", "bptt.cli", "train", "--data", str(corpus), *LM_ARGS,
         "--max-iters", "1000000", "--eval-every", "1000000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch.launch_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored, even if pytest's was
    try:
        log = out / "log.jsonl"
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.exists(), "training did not start within 60 s"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.count("interrupted: saved") == 1 and stderr.count("bptt: interrupted") == 1
    _, meta = load_checkpoint(out / "last.safetensors")
    step = meta["step"]
    assert step >= 6
    assert main(["train", "--out", str(out), "--resume", "--max-iters", str(step + 2)]) == 0
    assert load_checkpoint(out / "last.safetensors")[1]["step"] == step + 2


def test_the_time_limit_stops_every_rank_at_the_same_step(mpirun, corpus, tmp_path):
    """Each rank's clock differs; the stop is agreed in the step's reduction, so no rank waits for another.

    Frequent evaluations make the last one and the time limit fall on the same step now and then
    (the "saved already?" decision must agree too).
    """
    out = tmp_path / "run"
    proc = mpirun(2, "-m", "bptt.cli", "train", "--data", corpus, *LM_ARGS, "--max-time", "0.03",
                  "--eval-every", "3", "--out", out, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("time limit: saved") == 1
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] >= 1 and f"at step {meta['step']}" in proc.stderr


def test_two_ranks_train_the_transformer_lm_as_one_process(mpirun, corpus, tmp_path):
    """The Transformer carries no state between windows; same sharding by streams, same weighting.

    1e-10: Adam divides by √v, which magnifies the summation-order rounding of the
    smallest gradients more than in the LSTM run (1.2e-12 measured).
    """
    args = ["--data", str(corpus), "--model", "transformer", "--layers", "2", "--d-model", "16", "--heads", "2",
            "--context", "10", "--seq-len", "10", "--batch-size", "7", "--dtype", "float64", "--max-iters", "8",
            "--eval-every", "4", "--sample-length", "0", "--no-progress", "--optimizer", "adam", "--lr", "0.01"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *args, "--out", str(one)]) == 0
    proc = mpirun(2, "-m", "bptt.cli", "train", *args, "--out", two)
    assert proc.returncode == 0, proc.stderr
    assert_same_checkpoint(one / "last.safetensors", two / "last.safetensors", 1e-10)


def test_a_second_run_into_the_same_directory_is_refused_once(mpirun, corpus, tmp_path):
    """Rank 0 alone claims the run directory; its verdict stops every rank with one line."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), *LM_ARGS, "--max-iters", "2", "--out", str(out)]) == 0
    proc = mpirun(2, "-m", "bptt.cli", "train", "--data", corpus, *LM_ARGS, "--max-iters", "2", "--out", out)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bptt:")]
    assert len(errors) == 1 and "already holds a run" in errors[0], proc.stderr


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_preset_times_the_data_parallel_step_and_every_rank_runs_its_plan(mpirun, corpus, tmp_path, ranks):
    """Under mpiexec every rank times its share of the streams with the gradients' Allreduce (the step it
    will run, not rank 0's whole batch on one thread while the other waits); the ranks agree on the
    times, fit one plan, and run it to the end together."""
    out = tmp_path / "run"
    proc = mpirun(ranks, "-m", "bptt.cli", "train", "--data", corpus, "--out", out, "--preset", "small",
                  "--batch-size", "8", "--seq-len", "10", "--max-time", "0.05", "--sample-length", "0",
                  "--no-progress", timeout=120)
    assert proc.returncode == 0, proc.stderr
    plans = [line for line in proc.stderr.splitlines() if line.startswith("preset small (5-minute budget):")]
    assert len(plans) == 1  # rank 0 speaks for all
    assert f"data parallel over MPI: {ranks} ranks" in proc.stderr
    _, meta = load_checkpoint(out / "last.safetensors")
    assert f"--max-iters {meta['train']['max_iters']}" in plans[0]
    assert meta["train"]["hidden"] in (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 1024)
