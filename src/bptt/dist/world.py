"""The world a training loop runs in: one process, or K ranks launched by ``mpiexec``.

Legend: K ranks, r this rank, N rows of the global batch (streams, pairs), N_r this rank's rows,
θ parameters, g gradients, w_r this rank's weight.

Data parallelism, in one picture::

    rank r:  rows shard(N)  →  forward, loss ℓ_r = mean over its N_r rows  →  backward: g_r = ∂ℓ_r/∂θ
    all:     g = Σ_r w_r g_r,   w_r = N_r / N          (one Allreduce of one flat buffer)
    all:     clip(g), θ ← optimizer(θ, g)              (the same update on every rank)

With w_r = N_r / N the sum is exactly the gradient of the mean loss over all N
rows, ``Σ_r (N_r/N)·(1/N_r) Σ_{i∈r} ∂ℓ_i/∂θ = (1/N) Σ_i ∂ℓ_i/∂θ``, so a batch that
does not divide by K needs no special case: the first N mod K ranks take one
row more and weigh their gradient accordingly.  Where the loss is a mean over
something else than rows (the target tokens of padded sequences), w_r is this
rank's count over the global count: known locally when every rank draws the
same global batch, else summed with :meth:`World.allreduce_sum`.

Every rank starts from rank 0's parameters and optimizer state
(:meth:`MPIWorld.broadcast_model`) and applies the same update to the same
reduced gradient, so the ranks stay identical without further communication
(this relies on the Allreduce handing every rank the same bits, which MPICH
does and the MPI standard recommends), and K ranks reproduce one process's run
up to the rounding of the summation order (~1e-16 relative per step in float64).

Failure behaviour (measured with MPICH 5.0.2's hydra ``mpiexec``, 2 ranks on one host):

* a rank killed by a signal (SIGKILL included): hydra kills the other ranks at
  once (the job ended 25 ms after the kill) and ``mpiexec`` exits non-zero (9);
* a rank that raises an uncaught exception, or calls ``sys.exit``, while the
  other is inside a collective: without safeguards the job never ends (the
  leaving rank waits in ``MPI_Finalize``, the other in its collective; killed
  by a 30 s timeout in the experiment).  So :class:`MPIWorld` adds three: an
  uncaught exception calls ``MPI_Abort`` (as ``python -m mpi4py`` does); a rank
  that leaves Python waits at most the timeout for the others to leave too, then
  calls ``MPI_Abort``; and a watchdog thread aborts the job when one collective
  call waits longer than ``BPTT_MPI_TIMEOUT`` seconds (default 600; 0: off).
  ``MPI_Abort`` ends every rank (measured: the job ended within 0.2 s).
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np

from bptt.dist.threads import apply_thread_budget, thread_budget

__all__ = [
    "DistError",
    "World",
    "SingleProcess",
    "MPIWorld",
    "current_world",
    "launch_info",
    "shard_sizes",
    "INSTALL_HINT",
    "LAUNCHER_VARS",
    "forget_world",
    "mark_all_ranks",
    "raised_on_all_ranks",
    "report_failure",
]

INSTALL_HINT = 'pip install "bptt[mpi]"'

# (size, rank) variables each launcher exports to every process it starts:
# MPICH/Intel MPI hydra (and Slurm's PMI-1/PMI-2 plugins) PMI_*, Open MPI OMPI_COMM_WORLD_*,
# MVAPICH MV2_COMM_WORLD_*.
LAUNCHER_VARS = (
    ("PMI_SIZE", "PMI_RANK"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),
)

ABORT_GRACE = 0.25  # seconds between printing an abort's line and MPI_Abort (see MPIWorld.abort)
DEFAULT_TIMEOUT = 600.0  # seconds one collective may wait before the job is aborted (BPTT_MPI_TIMEOUT)


class DistError(ValueError):
    """The distributed setup cannot work (mpi4py missing under mpiexec, a batch too small to share...)."""


def launch_info(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(size, rank)`` if this process was started by an MPI launcher, else None (read from the environment only)."""
    env = os.environ if environ is None else environ
    for size_var, rank_var in LAUNCHER_VARS:
        if size_var in env:
            try:
                return int(env[size_var]), int(env.get(rank_var, "0"))
            except ValueError:
                continue
    return None


def shard_sizes(n: int, size: int, allow_empty: bool = False) -> list[int]:
    """Rows per rank for a global batch of ``n``: as even as possible, the first ``n mod size`` ranks one more.

    A batch smaller than the world is an error (a rank would have nothing to train on) unless
    ``allow_empty`` (evaluation sets, the short last batch of an epoch: those ranks weigh 0).
    """
    if size < 1:
        raise ValueError(f"world size must be >= 1, got {size}")
    if n < size and not allow_empty:
        raise DistError(f"a batch of {n} rows cannot be shared by {size} ranks: use a batch of at least {size} "
                        "(--batch-size is the global batch) or fewer ranks")
    q, r = divmod(n, size)
    return [q + (1 if k < r else 0) for k in range(size)]


def _params_of(model) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, param, grad)`` triples of a Module (anything with ``named_parameters()``) or an iterable of them."""
    if hasattr(model, "named_parameters"):
        return list(model.named_parameters())
    return list(model)


# ============================================================================ the interface
class World:
    """What a training loop needs from its world; :class:`SingleProcess` and :class:`MPIWorld` implement it.

    Attributes: ``size`` ranks, this process's ``rank``, ``is_main`` (rank 0: the one that writes files
    and prints), ``hosts`` (distinct host names, in rank order), ``rank_hosts`` (the host of each rank),
    ``threads`` (BLAS threads each rank uses).
    """

    size: int = 1
    rank: int = 0
    hosts: tuple[str, ...] = ()
    rank_hosts: tuple[str, ...] = ()
    threads: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ---------------------------------------------------------------- sharding
    def shard(self, n: int, allow_empty: bool = False) -> slice:
        """This rank's rows of a global batch of ``n`` rows (contiguous; see :func:`shard_sizes`)."""
        sizes = shard_sizes(n, self.size, allow_empty)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def weight(self, n: int) -> float:
        """w_r = n_r / n: the factor that turns this rank's mean gradient into its share of the global mean."""
        return shard_sizes(n, self.size)[self.rank] / n

    # ---------------------------------------------------------------- agreeing on failures
    def agree(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on every rank; if it raised on any rank, every rank raises the first one.

        For setup code (arguments, files, checkpoints) that each rank runs on its
        own: either all ranks go on, or all stop at the same point with the same
        error, which :func:`report_failure` then prints once (rank 0).
        """
        try:
            result, error = fn(*args, **kwargs), None
        except Exception as e:  # noqa: BLE001 - handed to every rank, then re-raised
            result, error = None, e
        first = self._first_exception(error)
        if first is not None:
            raise mark_all_ranks(first)
        return result

    def _first_exception(self, error):
        return error

    @contextmanager
    def interrupts_as_flag(self):
        """Inside: Ctrl-C sets ``self.interrupted`` instead of raising (data parallel: the ranks must stop
        at the same step, which they agree on through the step's reduction).  One process: unchanged."""
        yield

    # ---------------------------------------------------------------- collectives
    def allreduce_grads(self, model, weight: float = 1.0, extra=None):
        """Every gradient of ``model`` ← Σ_ranks weight·gradient, in place.

        ``extra``: a few floats summed over ranks in the same call (the step's
        weighted loss, its item count, a stop flag); returned as a float64 array.
        """
        raise NotImplementedError

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        raise NotImplementedError

    def allreduce_sum(self, values):
        """Σ over ranks of a float, a sequence of floats (→ list) or an array (→ float64 array)."""
        raise NotImplementedError

    def broadcast_model(self, model, optimizer=None) -> None:
        """Rank 0's parameters (and the optimizer's state, step count, hyperparameters) on every rank."""
        raise NotImplementedError

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (any picklable object) on every rank."""
        raise NotImplementedError

    def first_error(self, message: str | None) -> str | None:
        """The first non-None ``message`` over the ranks (by rank), the same on every rank.

        A collective: for checks that each rank makes on its own data, so that a
        bad input seen by one rank stops all of them at the same point, with one line.
        """
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, message: str, code: int = 1):
        """Print ``bptt: error: message`` (one line, stderr) and end every rank of the job."""
        raise NotImplementedError

    def layout_line(self) -> str:
        raise NotImplementedError


def _error_line(message: str) -> str:
    message = " ".join(str(message).split())  # one line, whatever the message held
    return message if message.startswith("bptt:") else f"bptt: error: {message}"


# ============================================================================ one process
class SingleProcess(World):
    """Size 1, rank 0: every collective is the identity (a weight ≠ 1 still scales the gradients)."""

    def __init__(self) -> None:
        import socket

        self.hosts = self.rank_hosts = (socket.gethostname(),)
        self.threads = 0  # not managed: bptt's own defaults apply

    def allreduce_grads(self, model, weight: float = 1.0, extra=None):
        if weight != 1.0:
            for _, _, g in _params_of(model):
                g *= weight
        return None if extra is None else np.asarray(extra, dtype=np.float64).copy()

    def allreduce_sum(self, values):
        if isinstance(values, np.ndarray):
            return values.astype(np.float64)
        if isinstance(values, (list, tuple)):
            return [float(v) for v in values]
        return float(values)

    def broadcast_model(self, model, optimizer=None) -> None:
        return None

    def broadcast_object(self, obj):
        return obj

    def gather(self, obj) -> list:
        return [obj]

    def first_error(self, message):
        return message

    def barrier(self) -> None:
        return None

    def abort(self, message: str, code: int = 1):
        print(_error_line(message), file=sys.stderr, flush=True)
        os._exit(code)

    def layout_line(self) -> str:
        return f"1 process on {self.hosts[0]}"


# ============================================================================ K ranks
class _FlatLayout:
    """Where each array of a list lives in one flat buffer: computed once, reused every step."""

    def __init__(self, named_arrays: list[tuple[str, np.ndarray]]):
        self.names = [n for n, _ in named_arrays]
        self.shapes = [a.shape for _, a in named_arrays]
        self.offsets = np.cumsum([0] + [a.size for _, a in named_arrays]).tolist()
        dtypes = {a.dtype for _, a in named_arrays}
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
        self._storage = np.empty(self.offsets[-1] + 8, self.dtype)  # + room for a few extra values
        self.buffer = self._storage[: self.offsets[-1]]

    def with_tail(self, k: int) -> np.ndarray:
        """The buffer followed by ``k`` more slots (k ≤ 8), one contiguous array."""
        if k > 8:
            raise ValueError(f"at most 8 extra values ride with the gradients, got {k}")
        return self._storage[: self.offsets[-1] + k]

    def signature(self) -> str:
        return f"{self.dtype}|" + ";".join(f"{n}{tuple(s)}" for n, s in zip(self.names, self.shapes, strict=True))

    def fits(self, named_arrays) -> bool:
        return [n for n, _ in named_arrays] == self.names and [a.shape for _, a in named_arrays] == self.shapes

    def pack(self, arrays, scale: float = 1.0) -> np.ndarray:
        o = self.offsets
        for k, a in enumerate(arrays):
            dst = self.buffer[o[k] : o[k + 1]]
            if scale == 1.0:
                dst[...] = a.reshape(-1)
            else:
                np.multiply(a.reshape(-1), scale, out=dst, casting="unsafe")
        return self.buffer

    def unpack(self, arrays) -> None:
        o = self.offsets
        for k, a in enumerate(arrays):
            a[...] = self.buffer[o[k] : o[k + 1]].reshape(a.shape)


class MPIWorld(World):
    """K ranks of an MPI job (``mpi4py``'s ``COMM_WORLD``); see the module docstring.

    Created by :func:`current_world`.  On creation it limits each rank's BLAS
    threads to its share of its node's cores (:mod:`bptt.dist.threads`), installs
    the safeguards against hangs, and learns every rank's host.
    """

    def __init__(self, comm=None, timeout: float | None = None, manage_threads: bool = True) -> None:
        from mpi4py import MPI  # imported here: mpi4py is an optional extra

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.size = self.comm.Get_size()
        self.rank = self.comm.Get_rank()
        host = MPI.Get_processor_name()
        self.rank_hosts = tuple(self.comm.allgather(host))
        self.hosts = tuple(dict.fromkeys(self.rank_hosts))
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size, self.local_rank = local.Get_size(), local.Get_rank()
        local.Free()
        self.threads = thread_budget(self.local_size)
        if manage_threads:
            apply_thread_budget(self.threads)
        self._grad_layout: _FlatLayout | None = None
        if timeout is None:
            timeout = float(os.environ.get("BPTT_MPI_TIMEOUT", DEFAULT_TIMEOUT))
        self.timeout = timeout
        self.interrupted = False  # set by Ctrl-C inside interrupts_as_flag()
        self._waiting_since: float | None = None
        self._waiting_in = ""
        if self.size > 1:
            self._install_safeguards()

    # ---------------------------------------------------------------- safeguards
    def _install_safeguards(self) -> None:
        def abort_on_exception(kind, value, tb):
            # another rank may be waiting in a collective for this one: end them all
            if issubclass(kind, KeyboardInterrupt):
                self.abort("bptt: interrupted", code=130)
            traceback.print_exception(kind, value, tb)
            self.abort(f"rank {self.rank} stopped on an uncaught {kind.__name__}; ending all ranks")

        sys.excepthook = abort_on_exception
        atexit.register(self._exit_together)  # runs before mpi4py's MPI_Finalize (registered earlier)
        if self.timeout > 0:
            threading.Thread(target=self._watch, name="bptt-mpi-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """Abort the job if one collective call waits longer than ``self.timeout`` seconds."""
        poll = min(1.0, self.timeout / 10)
        while True:
            time.sleep(poll)
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.abort(f"rank {self.rank} waited more than {self.timeout:g} s in {self._waiting_in}: another "
                           f"rank has stopped or hangs (BPTT_MPI_TIMEOUT sets the limit); ending all ranks")

    @contextmanager
    def _collective(self, what: str):
        self._waiting_in, self._waiting_since = what, time.monotonic()
        try:
            yield
        finally:
            self._waiting_since = None

    def _exit_together(self) -> None:
        """At interpreter exit: wait (bounded) until every rank is exiting, else abort the job.

        A rank that leaves while another still expects it in a collective would
        leave that one (and MPI_Finalize here) waiting forever.
        """
        if self.MPI.Is_finalized():
            return
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + (self.timeout if self.timeout > 0 else DEFAULT_TIMEOUT)
        while not request.Test():
            if time.monotonic() > deadline:
                self.abort(f"rank {self.rank} is exiting but another rank did not reach its end; ending all ranks")
            time.sleep(0.01)

    # ---------------------------------------------------------------- collectives
    def allreduce_grads(self, model, weight: float = 1.0, extra=None):
        """g ← Σ_ranks weight·g for every gradient: one in-place ``Allreduce`` of one flat buffer.

        The buffer's layout (an offset per parameter, in ``named_parameters()``
        order) is built on the first call, after checking that every rank has
        the same parameter names and shapes; later calls reuse it.  ``extra``
        floats ride at the end of the same buffer (in the gradients' dtype: a
        float32 model sums its losses in float32).
        """
        triples = _params_of(model)
        named = [(n, g) for n, _, g in triples]
        layout = self._grad_layout
        if layout is None or not layout.fits(named):
            layout = _FlatLayout(named)
            self._check_same(layout.signature(), "parameters")
            self._grad_layout = layout
        grads = [g for _, g in named]
        layout.pack(grads, weight)
        k = 0 if extra is None else len(extra)
        buf = layout.with_tail(k)
        if k:
            buf[-k:] = extra
        with self._collective("allreduce_grads"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        layout.unpack(grads)
        return None if extra is None else buf[-k:].astype(np.float64)

    def allreduce_sum(self, values):
        scalar = np.isscalar(values) or (isinstance(values, np.ndarray) and values.ndim == 0)
        is_array = isinstance(values, np.ndarray) and not scalar
        buf = np.array(values, dtype=np.float64, copy=True).reshape(-1)
        with self._collective("allreduce_sum"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if scalar:
            return float(buf[0])
        if is_array:
            return buf.reshape(np.shape(values))
        return buf.tolist()

    def broadcast_model(self, model, optimizer=None) -> None:
        """Rank 0's parameters, then (if given) its optimizer state, copied into every rank's arrays in place."""
        params = [(n, p) for n, p, _ in _params_of(model)]
        self._bcast_arrays(params, "parameters")
        if optimizer is not None:
            state = [(f"{buf}.{name}", a) for buf, per in optimizer.state.items() for name, a in per.items()]
            self._bcast_arrays(state, "optimizer state")
            _, meta = optimizer.state_dict() if self.is_main else (None, None)
            meta = self.broadcast_object(meta)
            if not self.is_main:
                arrays = {name: a for name, a in state}
                optimizer.load_state_dict(arrays, meta)  # step count and hyperparameters; arrays already in place

    def _bcast_arrays(self, named: list[tuple[str, np.ndarray]], what: str) -> None:
        layout = _FlatLayout(named)
        self._check_same(layout.signature(), what)
        arrays = [a for _, a in named]
        if self.is_main:
            layout.pack(arrays)
        with self._collective(f"broadcast of the {what}"):
            self.comm.Bcast(layout.buffer, root=0)
        if not self.is_main:
            layout.unpack(arrays)

    def _check_same(self, signature: str, what: str) -> None:
        """Abort (one line) unless every rank has the same names and shapes: a mismatch would sum garbage."""
        with self._collective(f"check of the {what}"):
            sigs = self.comm.allgather(signature)
        if any(s != sigs[0] for s in sigs):
            if not self.is_main:  # rank 0 says it, once, and ends the job; the others wait to be ended
                with self._collective(f"check of the {what}"):
                    self.comm.Barrier()
            bad = next(r for r, s in enumerate(sigs) if s != sigs[0])
            self.abort(f"rank {bad}'s {what} differ from rank 0's (names, shapes or dtype): every rank must build "
                       "the same model")

    def broadcast_object(self, obj):
        with self._collective("broadcast_object"):
            return self.comm.bcast(obj if self.is_main else None, root=0)

    def gather(self, obj) -> list:
        with self._collective("gather"):
            return self.comm.allgather(obj)

    def _first_exception(self, error):
        mine = None
        if error is not None:
            try:
                mine = (pickle.dumps(error), str(error))
            except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its message
                mine = (None, str(error))
        with self._collective("agreement on errors"):
            everyone = self.comm.allgather(mine)
        r, first = next(((r, m) for r, m in enumerate(everyone) if m is not None), (None, None))
        if first is None:
            return None
        if r == self.rank:
            return error
        try:
            return pickle.loads(first[0])
        except Exception:  # noqa: BLE001 - a class that cannot be rebuilt here: its message is what matters
            return DistError(first[1])

    @contextmanager
    def interrupts_as_flag(self):
        self.interrupted = False

        def note(signum, frame):
            self.interrupted = True

        try:
            previous = signal.signal(signal.SIGINT, note)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def first_error(self, message):
        with self._collective("first_error"):
            messages = self.comm.allgather(None if message is None else str(message))
        return next((m for m in messages if m is not None), None)

    def barrier(self) -> None:
        with self._collective("barrier"):
            self.comm.Barrier()

    def abort(self, message: str, code: int = 1):
        print(_error_line(message), file=sys.stderr, flush=True)
        # hydra forwards each rank's stderr through a pipe; MPI_Abort tears the job down at once and
        # the line was lost in 2 of 12 runs (measured): give the forwarder a moment to pass it on
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)
        # MPICH's MPI_Abort returned (measured) when two ranks aborted at once; a rank that
        # exits without finalizing is still seen by hydra as failed, which ends the job
        os._exit(code)

    def layout_line(self) -> str:
        per_host = {h: self.rank_hosts.count(h) for h in self.hosts}
        where = ", ".join(f"{h}: {k}" for h, k in per_host.items())
        return (f"data parallel over MPI: {self.size} ranks on {len(self.hosts)} host"
                f"{'s' if len(self.hosts) != 1 else ''} ({where}), {self.threads} BLAS thread"
                f"{'s' if self.threads != 1 else ''} per rank")


# ============================================================================ which world
_WORLD: World | None = None


def current_world(require: bool = False) -> World:
    """The world this process runs in (created once, then the same object).

    Not launched by an MPI launcher (no ``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``...),
    or launched as a single rank: :class:`SingleProcess`.  Launched with K > 1
    ranks: :class:`MPIWorld`; if mpi4py is missing that is a :class:`DistError`
    saying what to install (K independent copies of the run, each overwriting
    the others' files, is never what was meant).  ``require=True`` (a
    ``--distributed`` flag) makes it an error not to be under an MPI launcher.
    """
    global _WORLD
    if _WORLD is not None:
        if require and not isinstance(_WORLD, MPIWorld):
            raise DistError(_not_launched_message())
        return _WORLD
    info = launch_info()
    if info is None:
        if require:
            raise DistError(_not_launched_message())
        _WORLD = SingleProcess()
        return _WORLD
    size, _ = info
    if size <= 1 and not require:
        _WORLD = SingleProcess()
        return _WORLD
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise DistError(f"launched by mpiexec with {size} ranks but mpi4py is not installed: "
                        f"{INSTALL_HINT}") from None
    _WORLD = MPIWorld()
    return _WORLD


def _not_launched_message() -> str:
    return ("distributed training asked for, but this process was not started by mpiexec: run "
            f"`mpiexec -n K bptt ...` (needs {INSTALL_HINT})")


def forget_world() -> None:
    """Let the next :func:`current_world` look at the environment again (for tests; never under mpiexec)."""
    global _WORLD
    _WORLD = None


# ============================================================================ failures, once
def mark_all_ranks(error: BaseException) -> BaseException:
    """Note on ``error`` that every rank raised it at the same point (so rank 0 alone reports it)."""
    error.bptt_all_ranks = True
    return error


def raised_on_all_ranks(error: BaseException) -> bool:
    return bool(getattr(error, "bptt_all_ranks", False))


def report_failure(line: str, code: int, error: BaseException) -> None:
    """Print a command's one-line failure once, and make sure no rank is left waiting.

    One process (or no world yet): print it (under a launcher, rank 0 alone:
    every rank failed the same way before MPI started).  Data parallel: an
    error every rank raised at the same point (:meth:`World.agree`, the loop's
    checks on reduced values, an agreed Ctrl-C) is printed by rank 0 and every
    rank returns ``code``; an error of one rank only ends the whole job from
    that rank with :meth:`MPIWorld.abort` (``code`` is mpiexec's exit status).
    """
    world = _WORLD
    if not isinstance(world, MPIWorld) or world.size == 1:
        info = launch_info()
        if info is None or info[1] == 0 or not isinstance(error, DistError):
            print(line, file=sys.stderr, flush=True)
        return
    if raised_on_all_ranks(error):
        if world.is_main:
            print(line, file=sys.stderr, flush=True)
        return
    world.abort(line, code)
