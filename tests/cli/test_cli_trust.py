"""Checkpoints a user can trust and runs that cannot overwrite each other, through ``bptt`` itself."""

import json
import os
import subprocess
import sys

import pytest

from bptt.checkpoint import load_checkpoint
from bptt.cli import main
from bptt.rundir import claim_run_dir

SMALL = ["--hidden", "12", "--layers", "1", "--seq-len", "10", "--batch-size", "4", "--eval-every", "10",
         "--sample-length", "0", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("to be or not to be, that is the question.\n" * 60, encoding="utf-8")
    return path


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bptt: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def flip_a_tensor_byte(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 37] ^= 0x01  # inside the tensor data, past the JSON header
    path.write_bytes(bytes(data))


def test_fresh_run_into_an_occupied_directory_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "20", *SMALL]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".safetensors", ".jsonl")}
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "5", *SMALL]) == 2
    one_line_error(capsys, "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before  # nothing touched
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "5", *SMALL, "--overwrite"]) == 0
    assert load_checkpoint(out / "last.safetensors")[1]["step"] == 5  # the old run is gone, the new one is there


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, corpus):
    out = tmp_path / "run"
    with claim_run_dir(out, resume=False, overwrite=False):  # this process holds the directory
        r = subprocess.run([sys.executable, "-m", "bptt.cli", "train", "--data", str(corpus), "--out", str(out),
                            "--max-iters", "3", *SMALL], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "in use by another bptt run" in r.stderr and str(os.getpid()) in r.stderr
    assert not (out / "last.safetensors").exists()


@pytest.mark.parametrize("command", [["sample", "{ckpt}", "--length", "5"], ["eval", "{ckpt}", "--data", "{corpus}"]])
def test_a_flipped_byte_is_refused_naming_the_file(tmp_path, corpus, capsys, command):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "10", *SMALL]) == 0
    ckpt = out / "best.safetensors"
    flip_a_tensor_byte(ckpt)
    capsys.readouterr()
    args = [a.format(ckpt=ckpt, corpus=corpus) for a in command]
    assert main(args) == 2
    one_line_error(capsys, str(ckpt), "corrupted", "--no-verify")
    assert main(["--no-verify", *args]) == 0  # for forensics: loads anyway
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "new"), "--init-from", str(ckpt), *SMALL]) == 2
    one_line_error(capsys, "corrupted")


def test_a_checkpoint_without_digest_loads_with_a_note(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--max-iters", "10", *SMALL]) == 0
    tensors, meta = load_checkpoint(out / "best.safetensors")
    from safetensors.numpy import save_file

    old = tmp_path / "old.safetensors"  # as bptt wrote them before digests: the same tensors and meta, no digest
    save_file({f"{ns}.{k}": v for ns, d in tensors.items() for k, v in d.items()}, str(old),
              metadata={"bptt": json.dumps(meta)})
    capsys.readouterr()
    assert main(["sample", str(old), "--length", "20", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("bptt: note:")]
    assert len(notes) == 1 and "no content digest" in notes[0] and str(old) in notes[0]
    assert len(captured.out) >= 20
