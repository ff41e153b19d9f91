"""How many threads each rank may use: its share of its node's cores.

K ranks on a node of C cores, each running BLAS with C threads, would ask for
K·C threads on C cores; OpenBLAS's waiting threads spin, so oversubscription
costs far more than the idle share (bptt.kernels measured a 5x stall with two
BLAS threads on a loaded 2-core machine).  So each rank gets

    threads = max(1, cores_on_node // ranks_on_node)

threads, unless the user chose: ``BPTT_THREADS`` (bptt's own setting), or
``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` exported
before the run (these are read by the BLAS library when NumPy loads it, so they
already took effect and are left alone).

bptt's own threads follow the BLAS setting: :func:`bptt.kernels.blas_threads`
reads it and sizes the wavefront and the batch split from it.  Numba's thread
count is set too when Numba is not imported yet (bptt's kernels are serial).
"""

from __future__ import annotations

import os
import sys

__all__ = ["node_cores", "thread_budget", "apply_thread_budget", "USER_THREAD_VARS"]

USER_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def node_cores() -> int:
    """Cores of this node (the CPU count; the affinity mask if a launcher bound the process tighter)."""
    count = os.cpu_count() or 1
    try:
        return max(1, min(count, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):  # not on Linux
        return count


def _user_threads() -> int | None:
    for var in ("BPTT_THREADS", *USER_THREAD_VARS):
        value = os.environ.get(var, "")
        if value.strip().isdigit() and int(value) > 0:
            return int(value)
    return None


def thread_budget(ranks_on_node: int, cores: int | None = None) -> int:
    """Threads per rank: the user's setting if any, else ``max(1, cores // ranks_on_node)``."""
    user = _user_threads()
    if user is not None:
        return user
    cores = node_cores() if cores is None else cores
    return max(1, cores // max(1, ranks_on_node))


def apply_thread_budget(threads: int) -> None:
    """Limit BLAS (through threadpoolctl, for the rest of the process) and Numba to ``threads``.

    Environment variables are set as well (if not set already), for libraries
    not loaded yet and for child processes.  Numba reads ``NUMBA_NUM_THREADS``
    when it is imported and re-reads it before every compilation, refusing a
    value different from the one its threads started with; so the variable is
    set only while Numba is not imported yet, and an imported Numba is left
    alone (bptt's kernels are serial: its thread count costs nothing).
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")  # not used as a context: stays in force
    except Exception:  # threadpoolctl missing or a BLAS it cannot drive: the env vars are all we can do
        pass
