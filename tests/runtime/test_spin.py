"""run_parallel's worker threads (bptt.runtime.wavefront) and the spin they wait with (bptt.runtime.spin):
results in order, errors re-raised after every job has returned, callers at once, jobs longer than the
spin, and the spin's counter itself."""

import platform
import threading
import time
import weakref

import numpy as np
import pytest

from conftest import require_numba

from bptt.runtime import policy, spin
from bptt.runtime.wavefront import run_parallel, run_wavefront

require_numba()


@pytest.fixture(params=[0.0, 0.002], ids=["sleep", "spin"])
def spin_seconds(request, monkeypatch):
    monkeypatch.setattr(policy, "SPIN_SECONDS", request.param)
    return request.param


def test_spin_is_compiled_here():
    """With Numba on x86-64 (CI's machine) the spin must really run, not fall back silently to sleeping."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the spin (x86's pause) is compiled on x86-64 only; elsewhere threads sleep at once")
    assert spin.available()


def test_cell_has_its_cache_line():
    for _ in range(20):
        cell = spin.new_cell()
        assert cell.ctypes.data % 64 == 0 and cell.nbytes == 64 and cell[0] == 0


def test_spin_until_sees_a_count_published_before_and_during():
    cell = spin.new_cell()
    assert not spin.spin_until(cell, 1, 0.001)  # nobody publishes: gives up
    spin.publish(cell, 3)
    assert spin.spin_until(cell, 3, 0.001) and spin.spin_until(cell, 2, 0.0) and not spin.spin_until(cell, 4, 0.0)
    late = threading.Timer(0.01, spin.publish, (cell, 4))
    late.start()
    assert spin.spin_until(cell, 4, 60.0)  # returns when the other thread publishes, not after a minute
    late.join()


def test_results_in_order_and_each_job_once(spin_seconds):
    calls, lock = [], threading.Lock()

    def job(i):
        with lock:
            calls.append(i)
        return i * i

    for n in (1, 2, 3, 5):
        calls.clear()
        assert run_parallel([lambda i=i: job(i) for i in range(n)]) == [i * i for i in range(n)]
        assert sorted(calls) == list(range(n))


def test_jobs_run_in_other_threads_at_once(spin_seconds):
    """Each job waits until all have started: this returns only if they run side by side."""
    started = threading.Barrier(3, timeout=30)
    idents = run_parallel([lambda: (started.wait(), threading.get_ident())[1] for _ in range(3)])
    assert len(set(idents)) == 3 and idents[0] == threading.get_ident()


def test_a_job_longer_than_the_spin_still_returns(monkeypatch):
    monkeypatch.setattr(policy, "SPIN_SECONDS", 0.0005)
    assert run_parallel([lambda: 1, lambda: (time.sleep(0.02), 2)[1]]) == [1, 2]
    time.sleep(0.01)  # the worker has given up spinning and sleeps: the next job must wake it
    assert run_parallel([lambda: 3, lambda: 4]) == [3, 4]


def test_first_error_reraised_after_all_returned(spin_seconds):
    finished = []

    def slow_ok():
        time.sleep(0.02)
        finished.append("slow")
        return 1

    def fails():
        raise KeyError("worker")

    with pytest.raises(KeyError, match="worker"):
        run_parallel([slow_ok, fails, slow_ok])
    assert finished == ["slow", "slow"]
    with pytest.raises(ValueError, match="caller"):
        run_parallel([lambda: (_ for _ in ()).throw(ValueError("caller")), fails])
    assert run_parallel([lambda: 5, lambda: 6]) == [5, 6]  # the workers are usable after errors


def test_several_callers_at_once_and_workers_reused(spin_seconds):
    """Callers in several threads at once each get their own workers; afterwards the workers are kept
    for the next calls rather than started anew."""
    def caller(k, out):
        for r in range(20):
            out.append(run_parallel([lambda j=j: (k, r, j) for j in range(3)]) == [(k, r, j) for j in range(3)])

    outs = [[] for _ in range(4)]
    threads = [threading.Thread(target=caller, args=(k, outs[k])) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o == [True] * 20 for o in outs)
    before = sum(t.name == "bptt-slice" for t in threading.enumerate())
    for _ in range(10):
        run_parallel([lambda: 0, lambda: 1])
    assert sum(t.name == "bptt-slice" for t in threading.enumerate()) == before


def test_workers_keep_no_result(spin_seconds):
    """Once run_parallel has returned, a job's result is the caller's alone: a forward slice's result holds
    its caches, and a worker keeping it would keep them alive through the backward that frees them."""
    class Box:
        pass

    refs = []

    def make():
        box = Box()
        refs.append(weakref.ref(box))
        return box

    out = run_parallel([make, make, make])
    assert all(r() is not None for r in refs)
    del out
    assert all(r() is None for r in refs)


def test_workers_share_arrays_written_before_publishing(spin_seconds):
    """What a job writes is visible to the caller once run_parallel returns (release/acquire)."""
    out = np.zeros((3, 1000))

    def fill(i):
        out[i] = np.arange(1000) * (i + 1)

    for _ in range(50):
        out[:] = 0
        run_parallel([lambda i=i: fill(i) for i in range(3)])
        assert (out == np.arange(1000) * np.arange(1, 4)[:, None]).all()


def _child_runs_parallel(queue):
    log = []
    run_wavefront(2, 3, lambda k, j: log.append((k, j)), threads=2)  # the layer pool too
    queue.put((run_parallel([lambda: "a", lambda: "b"]), sorted(log)))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX's")
def test_a_forked_child_starts_its_own_workers():
    """The parent's idle workers (and layer pool) are threads the child does not have: the child must not hand
    them jobs."""
    import multiprocessing

    assert run_parallel([lambda: 1, lambda: 2]) == [1, 2]  # the parent now keeps an idle worker
    run_wavefront(2, 3, lambda k, j: None, threads=2)  # and an idle thread of its layer pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_runs_parallel, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) == (["a", "b"], [(k, j) for k in range(2) for j in range(3)])
