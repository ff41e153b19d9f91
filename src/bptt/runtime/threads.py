"""Thread control: how many threads NumPy's BLAS runs, and the process's malloc setting.

No shapes here; sizes are in multiply-adds (macs) and bytes.

bptt runs its own threads (:mod:`bptt.runtime.wavefront`: a thread per layer, or per
slice of the batch), and each of them calls BLAS.  Two threads of bptt plus BLAS's
own workers oversubscribe the cores, so while bptt's threads run, BLAS is held to
one thread (:func:`single_thread_blas`), and :func:`blas_threads` still reports the
cores that were there before (the budget bptt's schedulers divide).  The thresholds
that decide when this happens are in :mod:`bptt.runtime.policy`.

Readers look the names up on this module at run time (``threads.blas_threads()``,
``threads.OUTER_THREADS``), so a test can monkeypatch them here.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["blas_threads", "single_thread_blas", "inside_single_thread_blas", "cores_each", "keep_freed_memory",
           "blas_controllers", "OUTER_THREADS"]

_BLAS: dict = {}  # "libs" -> threadpoolctl's controller of NumPy's BLAS, or None

# BLAS thread counts in force before single_thread_blas() limited them (a stack: the blocks nest)
OUTER_THREADS: list[int] = []


def blas_controllers():
    """threadpoolctl's controller of NumPy's BLAS, or None (threadpoolctl missing or failing)."""
    if "libs" not in _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS["libs"] = ThreadpoolController().select(user_api="blas")
        except Exception:  # leave the threads alone
            _BLAS["libs"] = None
    return _BLAS["libs"]


def blas_threads() -> int:
    """The cores bptt may keep busy: how many threads NumPy's BLAS may use (1 if unknown),
    counted outside :func:`single_thread_blas` (which lowers BLAS's count, not the budget)."""
    if OUTER_THREADS:
        return OUTER_THREADS[-1]
    libs = blas_controllers()
    if libs is None or not libs.lib_controllers:
        return 1
    return max(1, max(c.num_threads for c in libs.lib_controllers))


def inside_single_thread_blas() -> bool:
    """Whether a :func:`single_thread_blas` block that lowered BLAS's threads is active."""
    return bool(OUTER_THREADS)


@contextlib.contextmanager
def single_thread_blas(when: bool = True):
    """Limit BLAS to one thread inside the block (a no-op when it already is, or when ``when`` is false:
    ``with single_thread_blas(threads > 1):``).

    Why bptt does this: OpenBLAS's idle worker threads busy-wait for a while
    (~0.1 s) after each multi-threaded product.  While bptt runs one thread
    per layer (:mod:`bptt.runtime.wavefront`), a spinning worker takes a core from
    them: measured 2.2 ms chunks taking 6-7 ms.  So every product of a
    wavefront step, and of a model step around it, is single-threaded.
    """
    if not when:
        yield
        return
    libs = blas_controllers()
    before = [] if libs is None else [c.num_threads for c in libs.lib_controllers]
    if all(n == 1 for n in before):
        yield
        return
    OUTER_THREADS.append(blas_threads())
    # each library's own set_num_threads, not threadpoolctl's limit(): 4.7 against 10.4 µs
    # an entry and exit of this block, which sampling pays on every character
    try:
        for c in libs.lib_controllers:
            c.set_num_threads(1)
        yield
    finally:
        for c, n in zip(libs.lib_controllers, before):
            c.set_num_threads(n)
        OUTER_THREADS.pop()


@contextlib.contextmanager
def cores_each(n: int):
    """Inside the block :func:`blas_threads` reports ``n``: the cores each of several threads that
    the caller runs side by side may keep busy (BLAS held to one thread meanwhile, as in
    :func:`single_thread_blas`).  A model step run in batch slices, one thread each, gives each
    ``cores_each(1)``, so that its recurrent layers neither slice the batch again nor start a
    wavefront (:mod:`bptt.runtime.policy`)."""
    with single_thread_blas():
        OUTER_THREADS.append(n)
        try:
            yield
        finally:
            OUTER_THREADS.pop()


# glibc malloc options (mallopt): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3
_MALLOPT = {-3: 32 << 20, -1: 128 << 20}
_MALLOC_TUNED: list[bool] = []


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (once per process; True if it took).

    A training step allocates its caches (gates, states: 15 MB at 2×128, N = 50) and
    frees them at the end of the backward pass.  By default glibc hands large freed
    blocks back to the system, and when a layer runs in threads (arrays allocated
    in a worker thread) it did so on every step: the next forward touched those
    pages anew, 7,300 page faults a step, and a 2×128 training step of the
    character model took 43 ms against 26 ms with this setting.  Blocks up to
    32 MB are then taken from the heap (the largest mmap threshold glibc allows),
    and up to 128 MB of free heap is kept instead of trimmed.  A process-wide
    setting, so it is made only when bptt runs batch slices in threads (the
    wavefront did not need it, and its peak memory grew with it: GRU 2×512 102 →
    120 MB), on glibc, and not at all with BPTT_KEEP_FREED_MEMORY=0.
    """
    if not _MALLOC_TUNED:
        ok = False
        if os.environ.get("BPTT_KEEP_FREED_MEMORY", "1") != "0":
            try:
                import ctypes

                libc = ctypes.CDLL(None)
                mallopt = getattr(libc, "mallopt", None)
                if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):  # glibc's meaning of the options
                    ok = all(mallopt(option, value) == 1 for option, value in _MALLOPT.items())
            except (OSError, AttributeError):  # no C library to ask: leave malloc alone
                pass
        _MALLOC_TUNED.append(ok)
    return _MALLOC_TUNED[0]
