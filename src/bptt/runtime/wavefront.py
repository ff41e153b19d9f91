"""Run a stack of recurrent layers as a wavefront, one thread per layer.

A stacked RNN looks sequential twice over: in time, and in depth.  But layer
k+1 at time t needs only layer k's output up to t, not all of it.  Cut the T
steps into chunks; then chunk j of layer k depends on exactly two things:

    (k − 1, j)   its input: the layer below has produced these steps
    (k, j − 1)   its state: it has run the steps before

so while layer k runs chunk j, layer k+1 can run chunk j − 1.  On a machine with
several cores each layer gets its own thread doing single-threaded matrix
products, where the one-layer-at-a-time order would leave all but one core idle
(a per-step product of a 2×128 LSTM, 50×128 by 128×512, is too small for two
BLAS threads to pay).  The backward pass is the same picture upside down: layer
k's gradient for chunk j comes from layer k+1's chunk j, read from the last chunk.

The chunk tasks are supplied by the caller (:mod:`bptt.nn.rnn`); this module only
orders them.  The numbers do not depend on the schedule: each task does the same
arithmetic whichever thread runs it.  :func:`run_parallel`, which runs the batch slices side by
side, keeps threads of its own that poll for work a while before sleeping (:mod:`bptt.runtime.spin`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from bptt.runtime import policy

__all__ = ["run_wavefront", "run_parallel", "run_row_slices"]

_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    """Threads kept between calls: starting a thread per call measured up to 5 ms on this machine."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=16, thread_name_prefix="bptt-layer"))
    return _POOL[0]


class _Worker:
    """A thread of :func:`run_parallel`'s own: it runs one job at a time, and between jobs polls for the
    next one for ``policy.SPIN_SECONDS`` (:mod:`bptt.runtime.spin`) before it sleeps (a daemon thread:
    an idle worker does not keep the process alive).

    ``posted`` counts the jobs handed to it, ``done`` the jobs it has finished; each side spins on the
    other's counter, then waits on an Event (set after every count, so a sleeper never misses one)."""

    def __init__(self):
        from bptt.runtime import spin  # imports Numba: here, not when the package is imported

        self.spin = spin
        self.posted, self.done = spin.new_cell(), spin.new_cell()
        self.jobs = 0  # handed over so far (posted[0], as the submitting side knows it)
        self.job = self.result = self.error = None
        self.wake, self.finished = threading.Event(), threading.Event()
        threading.Thread(target=self._loop, name="bptt-slice", daemon=True).start()

    def _wait(self, cell, count, event):
        if not self.spin.spin_until(cell, count, policy.SPIN_SECONDS):
            while int(cell[0]) < count:
                event.wait()
                event.clear()

    def _loop(self):
        n = 0
        while True:
            n += 1
            self._wait(self.posted, n, self.wake)
            try:
                self.result, self.error = self.job(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the submitting thread
                self.result, self.error = None, exc
            self.job = None
            self.spin.publish(self.done, n)
            self.finished.set()

    def submit(self, job):
        self.job = job
        self.jobs += 1
        self.spin.publish(self.posted, self.jobs)
        self.wake.set()

    def outcome(self):
        """Wait for the job submitted last → (its result, the exception it raised or None).  The worker
        lets go of both: a forward slice's result holds its caches, which the backward frees as it goes."""
        self._wait(self.done, self.jobs, self.finished)
        outcome, self.result, self.error = (self.result, self.error), None, None
        return outcome


_IDLE: list[_Worker] = []  # workers not running a job (taken and given back under _IDLE_LOCK)
_IDLE_LOCK = threading.Lock()


def _forget_workers_in_child():
    """A forked child has none of its parent's threads: it starts with no workers, no layer pool and a
    fresh lock (a ThreadPoolExecutor copied from the parent would count the parent's idle threads)."""
    global _IDLE_LOCK
    _IDLE.clear()
    _IDLE_LOCK = threading.Lock()
    _POOL.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_in_child)


def run_parallel(jobs) -> list:
    """Call every zero-argument job at once, one thread each (the first in the calling
    thread), and return their results in order; the first exception is re-raised
    after all have returned.  :mod:`bptt.nn.rnn` runs batch slices this way.

    The other jobs go to :class:`_Worker` threads kept between calls, which wait for
    work, and the calling thread for their results, by spinning a while before
    sleeping (``policy.SPIN_SECONDS``, where the figures are)."""
    if len(jobs) == 1:
        return [jobs[0]()]
    with _IDLE_LOCK:
        workers = [_IDLE.pop() if _IDLE else None for _ in jobs[1:]]
    workers = [w or _Worker() for w in workers]  # several callers at once: more workers
    for w, job in zip(workers, jobs[1:]):
        w.submit(job)
    results, failed = [], []
    try:
        results.append(jobs[0]())
    except BaseException as exc:  # noqa: BLE001 - wait for the others, then re-raise
        failed.append(exc)
        results.append(None)
    for w in workers:
        result, error = w.outcome()
        results.append(result)
        if error is not None:
            failed.append(error)
    with _IDLE_LOCK:
        _IDLE.extend(workers)
    if failed:
        raise failed[0]
    return results


def run_row_slices(rows: int, macs_per_row: int, job) -> list:
    """``job(s)`` for the slices s of ``rows`` that :func:`bptt.runtime.policy.row_slices` gives (several only
    where BLAS is held to one thread), side by side in :func:`run_parallel`'s threads; their results in order."""
    return run_parallel([lambda s=s: job(s) for s in policy.row_slices(rows, macs_per_row)])


def _tail_jobs(finish, k) -> list:
    """finish(k)'s tail jobs (none without a finish, or when it returns None)."""
    return list((finish(k) if finish is not None else None) or ())


def run_wavefront(num_layers: int, num_chunks: int, task, threads: int = 1, finish=None) -> None:
    """Call ``task(k, j)`` for every layer k < num_layers and chunk j < num_chunks,
    each after ``task(k − 1, j)`` and ``task(k, j − 1)`` have returned; then
    ``finish(k)`` (if given) after layer k's last chunk, without holding up
    layer k + 1.  ``finish(k)`` may return a list of *tail jobs*: zero-argument
    callables that need nothing but layer k's finished chunks (in the backward
    pass: halves of the weight-gradient products).  Each thread whose chunks
    are done takes queued tail jobs until the queue is empty and every layer
    has finished, so a thread that ends its layer early helps with the others'
    tails instead of waiting.

    threads ≤ 1: layer by layer, in order, each layer's tail jobs after it.
    Otherwise layer 0 runs in the calling thread and every other layer in a
    thread of its own, handing over chunk by chunk.  The first exception raised
    by any task or job (or a KeyboardInterrupt in the calling thread) stops all
    layers at their next chunk and is re-raised here.
    """
    if threads <= 1 or num_layers == 1 or num_chunks == 1:
        for k in range(num_layers):
            for j in range(num_chunks):
                task(k, j)
            for job in _tail_jobs(finish, k):
                job()
        return

    done = [0] * num_layers  # chunks finished, per layer
    jobs: list = []  # queued tail jobs
    finished = [0]  # layers whose finish(k) has run
    failed: list[BaseException] = []
    cond = threading.Condition()

    def take_jobs():  # run queued tail jobs until there are none and none can come
        while True:
            with cond:
                cond.wait_for(lambda: jobs or finished[0] == num_layers or failed)
                if failed or not jobs:
                    return
                job = jobs.pop(0)
            job()

    def chain(k):
        try:
            for j in range(num_chunks):
                if k > 0:
                    with cond:
                        cond.wait_for(lambda: done[k - 1] > j or failed)
                if failed:
                    return
                task(k, j)
                with cond:
                    done[k] += 1
                    cond.notify_all()
            tail = _tail_jobs(finish, k)
            with cond:
                jobs.extend(tail)
                finished[0] += 1
                cond.notify_all()
            take_jobs()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            with cond:
                failed.append(exc)
                cond.notify_all()

    workers = [_pool().submit(chain, k) for k in range(1, num_layers)]
    chain(0)
    try:
        for w in workers:
            w.result()
    except BaseException as exc:  # e.g. Ctrl-C while waiting: stop the other layers too
        with cond:
            failed.append(exc)
            cond.notify_all()
        raise
    if failed:
        raise failed[0]
