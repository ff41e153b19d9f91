"""Run-directory ownership: refusal of a fresh run over an old one, overwrite, resume, one writer at a time."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from bptt.checkpoint import save_checkpoint
from bptt.rundir import (LOCK_NAME, RunDirBusy, RunDirError, RunDirOccupied, claim_run_dir, existing_run, held_locks,
                         missing_dirs)

_HOLDER = r"""
import sys, time
from bptt.rundir import claim_run_dir
lock = claim_run_dir(sys.argv[1], resume=True, overwrite=False)
print("held", flush=True)
time.sleep(600)
"""


def _one_line(exc):
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _old_run(d):
    save_checkpoint(d / "last.safetensors", {"model": {"w": np.ones(2)}}, {"step": 7})
    (d / "log.jsonl").write_text('{"step": 7}\n')
    (d / "loss.png").write_bytes(b"png")
    (d / "notes.txt").write_text("mine, not the run's")
    (d / "data").mkdir()


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding the lock on tmp_path/run; yields the Popen."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "held", "holder failed to start"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_fresh_directory_is_created_locked_and_released(tmp_path):
    d = tmp_path / "a" / "run"
    lock = claim_run_dir(d, resume=False, overwrite=False)
    assert d.is_dir() and lock.locked and not lock.resumed and lock.removed == []
    assert (d / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunDirBusy) as exc:  # a second claim, even from this process
        claim_run_dir(d, resume=True, overwrite=False)
    assert f"pid {os.getpid()}" in _one_line(exc) and exc.value.pid == os.getpid()
    lock.release()
    lock.release()  # idempotent
    assert not lock.locked and (d / LOCK_NAME).read_text() == ""
    with claim_run_dir(d, resume=False, overwrite=False) as again:  # no run was written: still fresh
        assert again.locked
    assert not again.locked


def test_a_dropped_lock_object_still_holds(tmp_path):
    import gc

    claim_run_dir(tmp_path, resume=False, overwrite=False)  # the result is not kept
    gc.collect()
    with pytest.raises(RunDirBusy):
        claim_run_dir(tmp_path, resume=False, overwrite=False)
    [held] = [lk for lk in held_locks() if lk.out_dir == tmp_path]
    held.release()
    with claim_run_dir(tmp_path, resume=False, overwrite=False):
        pass


def test_fresh_run_refused_in_occupied_directory(tmp_path):
    _old_run(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunDirOccupied, match="already holds a run") as exc:
        claim_run_dir(tmp_path, resume=False, overwrite=False)
    assert "last.safetensors" in _one_line(exc) and isinstance(exc.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, LOCK_NAME])  # nothing else touched
    # the refusal released the lock
    with claim_run_dir(tmp_path, resume=True, overwrite=False):
        pass


@pytest.mark.parametrize("marker", ["best.safetensors", "log.jsonl"])
def test_either_marker_makes_a_run(tmp_path, marker):
    (tmp_path / marker).write_bytes(b"x")
    assert existing_run(tmp_path) == [marker]
    with pytest.raises(RunDirOccupied):
        claim_run_dir(tmp_path, resume=False, overwrite=False)


def test_unrelated_files_do_not_make_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.safetensors").mkdir()  # a directory, not a checkpoint
    assert existing_run(tmp_path) == []
    with claim_run_dir(tmp_path, resume=False, overwrite=False) as lock:
        assert lock.locked


def test_overwrite_removes_only_the_runs_files(tmp_path):
    _old_run(tmp_path)
    (tmp_path / ".last.safetensors.999999.abcd1234.tmp").write_bytes(b"torn")
    with claim_run_dir(tmp_path, resume=False, overwrite=True) as lock:
        assert sorted(lock.removed) == [".last.safetensors.999999.abcd1234.tmp", "last.json", "last.safetensors",
                                        "log.jsonl", "loss.png"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "data", "notes.txt"]
        assert existing_run(tmp_path) == []


def test_overwrite_waits_for_the_lock(tmp_path, holder):
    d = tmp_path / "run"
    _old_run(d)
    with pytest.raises(RunDirBusy):
        claim_run_dir(d, resume=False, overwrite=True)
    assert (d / "last.safetensors").exists() and (d / "log.jsonl").exists()  # nothing removed under a live run


def test_resume_allowed(tmp_path):
    _old_run(tmp_path)
    with claim_run_dir(tmp_path, resume=True, overwrite=False) as lock:
        assert lock.resumed and lock.removed == []
    assert (tmp_path / "last.safetensors").exists()
    with claim_run_dir(tmp_path / "empty", resume=True, overwrite=False) as lock:
        assert not lock.resumed  # nothing to resume: the training loop says so


def test_resume_and_overwrite_together(tmp_path):
    with pytest.raises(RunDirError, match="exclude") as exc:
        claim_run_dir(tmp_path, resume=True, overwrite=True)
    _one_line(exc)


def test_out_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        claim_run_dir(f, resume=False, overwrite=False)


def test_second_holder_refused_with_the_pid(tmp_path, holder):
    d = tmp_path / "run"
    assert (d / LOCK_NAME).read_text().strip() == str(holder.pid)
    for resume, overwrite in ((False, False), (True, False), (False, True)):
        with pytest.raises(RunDirBusy) as exc:
            claim_run_dir(d, resume=resume, overwrite=overwrite)
        assert f"pid {holder.pid}" in _one_line(exc)
        assert exc.value.pid == holder.pid
    assert holder.poll() is None


def test_stale_lock_after_sigkill_is_taken_over(tmp_path, holder):
    d = tmp_path / "run"
    with pytest.raises(RunDirBusy):
        claim_run_dir(d, resume=True, overwrite=False)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    assert (d / LOCK_NAME).read_text().strip() == str(holder.pid)  # the stale file, with the dead pid
    with claim_run_dir(d, resume=True, overwrite=False) as lock:
        assert lock.locked
        assert (d / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_discard_removes_what_the_run_made_and_nothing_else(tmp_path):
    """A run that stops on bad input removes its own files, the lock and the directories it made (its
    run directory and new parents), while still locked, then releases.  A file of the user's keeps the
    directory (and the user's file); a directory the user made is not removed."""
    out = tmp_path / "runs" / "fresh"
    made = missing_dirs(out)
    assert made == [out.absolute(), (tmp_path / "runs").absolute()]
    lock = claim_run_dir(out, resume=False, overwrite=False)
    (out / "corpus.npy").write_bytes(b"encoded")
    assert lock.discard(made) and not (tmp_path / "runs").exists() and not lock.locked
    kept = tmp_path / "kept"
    made = missing_dirs(kept)
    lock = claim_run_dir(kept, resume=False, overwrite=False)
    (kept / "notes.txt").write_text("mine")
    (kept / "corpus.npy").write_bytes(b"encoded")
    assert not lock.discard(made) and not lock.locked
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    users = tmp_path / "users"
    users.mkdir()
    lock = claim_run_dir(users, resume=False, overwrite=False)
    assert not lock.discard(missing_dirs(users)) and users.is_dir()  # made nothing: nothing to remove
    with claim_run_dir(users, resume=False, overwrite=False):  # released: the next run takes it
        pass
