"""Run directories: one writer at a time, and no silent overwrite of a finished run.

A training run owns its output directory for the life of its process::

    with claim_run_dir(out_dir, resume=args.resume, overwrite=args.overwrite) as lock:
        ...train, write checkpoints and log.jsonl into out_dir...

:func:`claim_run_dir`

1. takes an exclusive ``fcntl.flock`` on ``out_dir/.lock`` (non-blocking) and
   writes the holder's pid into it.  A second process claiming the same
   directory stops at once with :class:`RunDirBusy` naming that pid.  The lock
   belongs to the open file, so the kernel drops it when the holder exits in
   any way, SIGKILL and power loss included: a stale ``.lock`` file left
   behind holds no lock and is simply taken over.  The ``.lock`` file itself is
   not deleted (deleting it would let two processes lock two different files
   of the same name), except with the whole directory by
   :meth:`RunDirLock.discard`, while locked, when a run that created the
   directory stops on bad input;
2. with the lock held, looks for a previous run (a ``*.safetensors``
   checkpoint or a ``log.jsonl``).  Starting a fresh run there is refused with
   :class:`RunDirOccupied` unless ``resume`` (continue it) or ``overwrite``
   (discard it) is given;
3. on ``overwrite``, deletes the previous run's files (:data:`RUN_FILES`, and
   only those: the user's own files in the directory are left alone) -- only
   now, after the lock is held, so a run still writing there is never
   pulled from under its feet.

Errors are ValueError subclasses with one-line messages (the CLI prints them
as ``bptt: error: ...``).  POSIX only for the lock: where ``fcntl`` does not
exist (Windows) the occupancy check still runs but nothing is locked.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "RunDirError",
    "RunDirBusy",
    "RunDirOccupied",
    "RunDirLock",
    "claim_run_dir",
    "existing_run",
    "missing_dirs",
    "discarded_on_failure",
    "held_locks",
    "LOCK_NAME",
    "RUN_FILES",
]

LOCK_NAME = ".lock"

#: What a run writes (glob patterns relative to the run directory): what ``overwrite`` removes.
#: Checkpoints and their JSON sidecars, the log, the loss plot, the encoded corpus, and the
#: temporary files a killed save or encode may have left (``.<name>.<pid>...tmp``).
RUN_FILES = (
    "*.safetensors",
    "log.jsonl",
    "loss.png",
    "corpus.npy",
    ".*.safetensors.*.tmp",
    ".*.json.*.tmp",
    ".corpus.npy.*.tmp",
)

#: What marks a directory as holding a run.
_RUN_MARKERS = ("*.safetensors", "log.jsonl")


class RunDirError(ValueError):
    """A run directory that cannot be used (one-line message)."""


class RunDirBusy(RunDirError):
    """Another live process holds the directory's lock."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


class RunDirOccupied(RunDirError):
    """The directory holds a previous run and neither resume nor overwrite was asked for."""


def missing_dirs(path: str | os.PathLike) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first: what creating it makes."""
    missing, p = [], Path(path).absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


@contextlib.contextmanager
def discarded_on_failure(claim: RunDirLock | None, made: Iterable[Path]) -> Iterator[None]:
    """Run the block (a run's preparation: reading its data, building its model); if it raises,
    :meth:`RunDirLock.discard` what the run made before the error goes on.  ``claim`` may be None
    (a rank that holds no lock), and then the block just runs."""
    try:
        yield
    except BaseException:
        if claim is not None:
            claim.discard(made)
        raise


def existing_run(out_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the files in ``out_dir`` that show a run was there (checkpoints, log.jsonl)."""
    return _matching(Path(out_dir), _RUN_MARKERS)


def _matching(directory: Path, patterns: Iterable[str]) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    patterns = tuple(patterns)
    return sorted(
        n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns) and (directory / n).is_file()
    )


def _sidecars(directory: Path, names: Iterable[str]) -> list[str]:
    """The JSON sidecars (``x.json``) of the checkpoints among ``names``, where they exist."""
    out = []
    for n in names:
        if n.endswith(".safetensors"):
            side = n[: -len(".safetensors")] + ".json"
            if (directory / side).is_file():
                out.append(side)
    return out


# Every held lock, so that a lock object the caller drops is not garbage-collected (which would
# close its file and so release the lock): a claim lasts until release() or the end of the process.
_HELD: dict[int, RunDirLock] = {}


class RunDirLock:
    """Ownership of a run directory; :meth:`release` (or leaving the ``with`` block) gives it up,
    and so does the end of the process, however it ends.

    Attributes: ``out_dir`` (Path), ``resumed`` (True if a previous run was
    there and ``resume`` was asked), ``removed`` (names deleted by
    ``overwrite``), ``locked`` (False only where fcntl does not exist).
    """

    def __init__(self, out_dir: Path, fd: int | None, resumed: bool, removed: list[str]):
        self.out_dir = out_dir
        self._fd = fd
        self.resumed = resumed
        self.removed = removed

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def discard(self, made: Iterable[Path]) -> bool:
        """After a run stopped on bad input: remove what it wrote and the directories it made, then
        release; True if the run directory is gone.

        ``made``: the directories this run created, the run directory first and then its new parents
        (:func:`missing_dirs`, taken before the claim).  Only a run directory among them is touched (a
        directory the user made is not the run's to remove).  The run's own files in it
        (:data:`RUN_FILES`: the encoded corpus, a partial checkpoint) and the lock file are deleted, then
        each directory in ``made`` that is empty, innermost first.  Done while the lock is still held, so
        no other run can have claimed the directory in between; one that opened the lock file at that
        instant gets RunDirBusy, and one that starts after finds no directory and makes a new one.
        """
        made = [Path(d) for d in made]
        removed = False
        try:
            if self.locked and made and made[0] == self.out_dir.absolute():
                for name in _matching(self.out_dir, RUN_FILES) + [LOCK_NAME]:
                    (self.out_dir / name).unlink(missing_ok=True)
                for d in made:
                    d.rmdir()  # OSError when not empty: stop there
                    removed = True
        except OSError:
            pass
        finally:
            self.release()
        return removed

    def release(self) -> None:
        """Unlock and close; idempotent.  The ``.lock`` file stays (emptied)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(id(self), None)
        try:
            os.ftruncate(fd, 0)  # no pid left behind for someone to report
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.locked else "released"
        return f"RunDirLock({str(self.out_dir)!r}, {state})"


def held_locks() -> list[RunDirLock]:
    """The run directories this process holds right now (e.g. to release them before exec)."""
    return list(_HELD.values())


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0)
    except OSError:
        return None
    text = raw.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _lock(out_dir: Path) -> int | None:
    """The fd of ``out_dir/.lock``, exclusively flock-ed and holding our pid; RunDirBusy if taken."""
    if fcntl is None:
        return None
    path = out_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise RunDirError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = _read_pid(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"pid {pid}" if pid is not None else "a process that has not yet written its pid"
            raise RunDirBusy(
                f"{out_dir} is in use by another bptt run ({who}); wait for it to finish or choose another output directory",
                pid,
            ) from None
        raise RunDirError(f"cannot lock {path}: {e.strerror or e}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError as e:
        os.close(fd)
        raise RunDirError(f"cannot write the lock file {path}: {e.strerror or e}") from None
    return fd


def claim_run_dir(
    out_dir: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    run_files: Iterable[str] = RUN_FILES,
) -> RunDirLock:
    """Create ``out_dir`` if needed, lock it for this process, and check or clear a previous run.

    * a fresh run (neither flag) in a directory holding a run -> RunDirOccupied;
    * ``resume`` -> allowed whether or not a run is there (whether there is a
      checkpoint to resume from is the training loop's check);
    * ``overwrite`` -> the files matching ``run_files`` (and checkpoint sidecars)
      are deleted once the lock is held; other files stay;
    * ``resume`` and ``overwrite`` together -> RunDirError;
    * another live process holding the lock -> RunDirBusy (``.pid`` = its pid).

    Returns the held :class:`RunDirLock`; keep it (or use it as a context
    manager) for as long as the run writes into the directory.
    """
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: resume continues the run that overwrite would delete")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory; expected an output directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create output directory {out}: {e.strerror or e}") from None

    fd = _lock(out)
    lock = RunDirLock(out, fd, resumed=False, removed=[])
    if fd is not None:
        _HELD[id(lock)] = lock
    try:
        previous = existing_run(out)
        if previous and not (resume or overwrite):
            shown = ", ".join(previous[:3]) + (", ..." if len(previous) > 3 else "")
            raise RunDirOccupied(
                f"{out} already holds a run ({shown}); continue it with --resume, replace it with --overwrite, "
                f"or choose another --out"
            )
        lock.resumed = bool(previous) and resume
        if overwrite:
            doomed = _matching(out, run_files)
            doomed += [s for s in _sidecars(out, doomed) if s not in doomed]
            for name in doomed:
                try:
                    (out / name).unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise RunDirError(f"cannot remove {out / name} of the previous run: {e.strerror or e}") from None
                lock.removed.append(name)
    except BaseException:
        lock.release()
        raise
    return lock
