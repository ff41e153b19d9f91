"""Waiting for another thread without sleeping: a bounded, compiled spin on a counter.

No shapes here: a *cell* is an int64 array of one element (a counter), raised by one thread and
watched by another.

Why: on a virtual machine a thread that sleeps (a futex wait, as in ``Event.wait``) gives its vCPU
back to the hypervisor, and the work it resumes runs slower for a while.  Two batch slices of a
2×128 LSTM's inference forward, run in lockstep in two processes, took 5.1 ms a call when each
waited for the other by spinning and 5.8–6.7 ms when it slept (benchmarks/history.md, "2026-12-04 late").
OpenMP runtimes spin for a while before sleeping for the same reason (libgomp's ``GOMP_SPINCOUNT``).

:func:`spin_until` polls a cell with the GIL released (compiled with Numba, ``nogil``) for at most a
given time, and reports whether the count was reached; the caller then falls back to a blocking
wait, so a spin bounds the time a core is kept busy and never replaces the sleep.  Every 64 polls
it calls ``sched_yield`` so a thread waiting for this core (BLAS's worker, another process) gets it.

:func:`available` is False without Numba or off x86-64 (``pause``, the spin-loop hint, is x86's); the
callers then wait as before.  Importing this module imports Numba (slow): :mod:`bptt.runtime.wavefront`
imports it on first use.  :func:`publish` raises a cell with release ordering, so what the
publishing thread wrote before is visible to the thread that sees the count.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from bptt.runtime.memory import aligned_empty

__all__ = ["available", "new_cell", "publish", "spin_until", "ticks_per_second"]

try:  # Numba is a dependency, but the package works without it (then nothing spins)
    from llvmlite import ir as _ir
    from numba import njit, types
    from numba.extending import intrinsic
except Exception:  # pragma: no cover - exercised only without numba
    njit = None

_AVAILABLE = njit is not None and platform.machine().lower() in ("x86_64", "amd64")


def available() -> bool:
    """Whether spinning is possible here: Numba imports and the CPU is x86-64 (``pause`` is x86's)."""
    return _AVAILABLE


def new_cell() -> np.ndarray:
    """A counter cell at 0, alone on its 64-byte cache line (a neighbour's writes do not evict it from
    the spinning core): cell[0] is the counter, the rest of the line is padding."""
    cell = aligned_empty(8, np.int64, min_bytes=0)
    cell[:] = 0
    return cell


if _AVAILABLE:
    def _declare(builder, name, return_type, arg_types):
        return builder.module.globals.get(name) or _ir.Function(builder.module, _ir.FunctionType(return_type, arg_types),
                                                                name)

    @intrinsic
    def _load_acquire(typingctx, cell):
        """cell[0], read atomically with acquire ordering (never hoisted out of a loop)."""

        def codegen(context, builder, signature, args):
            ptr = context.make_array(signature.args[0])(context, builder, args[0]).data
            return builder.load_atomic(ptr, "acquire", 8)

        return types.int64(cell), codegen

    @intrinsic
    def _store_release(typingctx, cell, value):
        """cell[0] = value, atomically with release ordering."""

        def codegen(context, builder, signature, args):
            ptr = context.make_array(signature.args[0])(context, builder, args[0]).data
            builder.store_atomic(args[1], ptr, "release", 8)
            return context.get_dummy_value()

        return types.void(cell, types.int64), codegen

    @intrinsic
    def _pause(typingctx):
        """x86's ``pause``: tells the core this is a spin loop (saves power, frees the sibling thread)."""

        def codegen(context, builder, signature, args):
            builder.call(_declare(builder, "llvm.x86.sse2.pause", _ir.VoidType(), []), [])
            return context.get_dummy_value()

        return types.void(), codegen

    @intrinsic
    def _ticks(typingctx):
        """The CPU's time-stamp counter (``llvm.readcyclecounter``: rdtsc)."""

        def codegen(context, builder, signature, args):
            return builder.call(_declare(builder, "llvm.readcyclecounter", _ir.IntType(64), []), [])

        return types.int64(), codegen

    @intrinsic
    def _sched_yield(typingctx):
        """libc's ``sched_yield()`` (declared, resolved in the process: the function stays cacheable)."""

        def codegen(context, builder, signature, args):
            builder.call(_declare(builder, "sched_yield", _ir.IntType(32), []), [])
            return context.get_dummy_value()

        return types.void(), codegen

    @njit(nogil=True, cache=True)
    def _spin_until(cell, count, max_ticks):
        """Poll cell[0] until ≥ count (8 ``pause`` between looks); every 64 looks yield the core once and
        give up after max_ticks of the time-stamp counter → whether the count was reached."""
        t0 = _ticks()
        polls = 0
        while _load_acquire(cell) < count:
            for _ in range(8):
                _pause()
            polls += 1
            if polls % 64 == 0:
                _sched_yield()
                if _ticks() - t0 > max_ticks:
                    return False
        return True

    @njit(nogil=True, cache=True)
    def _publish(cell, value):
        _store_release(cell, value)

    @njit(nogil=True, cache=True)
    def _read_ticks():
        return _ticks()


_TICKS_PER_SECOND: list[float] = []


def ticks_per_second() -> float:
    """The time-stamp counter's rate, measured once on first use, over a 5 ms sleep (current x86 CPUs
    count at a constant rate, asleep or not; a wrong rate would only change how long a wait spins)."""
    if not _TICKS_PER_SECOND and _AVAILABLE:
        _read_ticks()  # compile (or load) first
        t0, c0 = time.perf_counter(), _read_ticks()
        time.sleep(0.005)
        _TICKS_PER_SECOND.append((_read_ticks() - c0) / (time.perf_counter() - t0))
    return _TICKS_PER_SECOND[0]


def spin_until(cell: np.ndarray, count: int, seconds: float) -> bool:
    """Poll until cell[0] ≥ count, for at most ``seconds`` (GIL released); → whether it got there.
    Where spinning is not :func:`available`, or with seconds ≤ 0: a single look."""
    if seconds <= 0 or not _AVAILABLE:
        return int(cell[0]) >= count
    return _spin_until(cell, count, int(seconds * ticks_per_second()))


def publish(cell: np.ndarray, value: int) -> None:
    """cell[0] = value, seen by :func:`spin_until` in other threads after this thread's earlier writes."""
    if _AVAILABLE:
        _publish(cell, value)
    else:
        cell[0] = value
