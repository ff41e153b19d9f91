"""Launching small jobs with mpiexec from a test (loaded by the test files of this folder)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bptt
from bptt.dist import world as world_mod

HERE = Path(__file__).resolve().parent
LAUNCHER_VARS = [v for pair in world_mod.LAUNCHER_VARS for v in pair]


def require_mpi() -> str:
    """The mpiexec next to this Python (the mpich wheel's) or on PATH; skip or (in CI) fail without it."""
    mpiexec = Path(sys.executable).with_name("mpiexec")
    found = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401

        missing = None if found else "mpiexec not found"
    except ImportError:
        missing = "mpi4py not installed"
    if missing:
        if os.environ.get("BPTT_REQUIRE_TORCH") == "1":
            pytest.fail(f"{missing}: CI must install bptt[mpi]")
        pytest.skip(missing)
    return found


def launch_env() -> dict:
    """This environment without any launcher's variables, with the bptt under test first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    src = str(Path(bptt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def launcher():
    """run(K, script, *args, timeout=120, extra_env=None) → CompletedProcess of ``mpiexec -n K python script``.

    ``script`` is a file of this folder, or ``-m module``.  Every rank imports the bptt under test.
    """
    mpiexec = require_mpi()
    env = launch_env()

    def run(k, script, *args, timeout=120, extra_env=None):
        target = [script] if script == "-m" else [str(HERE / script)]
        cmd = [mpiexec, "-n", str(k), sys.executable, *target, *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env, **(extra_env or {})})

    return run
