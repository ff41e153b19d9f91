"""Checkpoints: one safetensors file per checkpoint, replaced atomically.

Layout of a checkpoint file
---------------------------
* tensors, namespaced ``<namespace>.<name>``: ``model.encoder.weight_ih_l0``,
  ``optim.m.decoder.bias``, ... (the namespace is everything before the first dot);
* one safetensors metadata key, ``"bptt"``, holding a JSON object: the caller's
  ``meta`` (kind, config, vocab, step, optimizer settings, RNG state, ...) plus
  ``"format_version"``;
* a second metadata key, ``"bptt_sha256"``, holding ``"sha256:<64 hex digits>"``,
  the digest of the contents (below).  Files written before the digest existed
  have no such key: they still load, with an :class:`UnverifiedCheckpointWarning`.

The digest
----------
SHA-256 over a canonical serialisation, not over the raw bytes after the header::

    b"bptt-checkpoint-sha256-v1\0"
    u64 len(meta) | meta                   the "bptt" metadata string, UTF-8
    for every tensor, in sorted name order:
        u64 len(name) | name               UTF-8
        u64 len(dtype) | dtype             NumPy's little-endian type string, e.g. "<f4", "|b1"
        u64 ndim | u64 shape[0] ...
        u64 nbytes | the data              C order, little-endian

(every u64 little-endian).  Why per tensor rather than the bytes after the
header: it also covers what the header says about the bytes (names, dtypes,
shapes, offsets: two same-shaped tensors whose names were swapped, or a
flipped digit in the step count, change the digest, while the data bytes
would not), it does not depend on the order and padding in which the
safetensors library lays the tensors out (another writer, or a future version,
may lay them out differently), and it is computed from the very arrays that
are handed back to the caller.  The cost is one SHA-256 pass over the tensors
on save and on load (0.06-0.11 s for 100 MB of float32 on the
2-core VM, a noisy measurement).  Adding the key did not change
``format_version``: a reader that does not know the key ignores it.

Nothing is pickled, so loading a checkpoint never executes code.  A JSON
sidecar with the same meta is written next to the checkpoint for people to read;
it is never read back.

Saving writes a temporary file in the same directory, fsyncs it, renames it
over the old checkpoint and fsyncs the directory: a kill (or power loss) at any
moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "CheckpointError",
    "UnverifiedCheckpointWarning",
    "content_digest",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "sidecar_path",
    "rng_state",
    "restore_rng",
    "upgrade_meta",
    "set_default_verify",
    "load_checkpoint_of_kind",
    "checkpoints_in",
]

#: Version of the layout above; bump it when an old reader could misread a new file.
FORMAT_VERSION = 1

_META_KEY = "bptt"
_DIGEST_KEY = "bptt_sha256"
_DIGEST_PREFIX = "sha256:"
_DIGEST_DOMAIN = b"bptt-checkpoint-sha256-v1\0"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read (one-line message)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before digests existed: loaded, but nothing vouches for its bytes."""


# ---------------------------------------------------------------------------- helpers
def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the human-readable JSON for ``path`` goes: ``x.safetensors`` -> ``x.json``."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p.with_suffix(".json")
    return p.with_name(p.name + ".json")  # never the checkpoint itself, even for 'x.json'


def _json_default(obj):
    """Let NumPy scalars and arrays in ``meta`` serialise as plain JSON values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"checkpoint meta holds a {type(obj).__name__}, which is not JSON-serialisable")


def _flatten(tensors: Mapping) -> dict[str, np.ndarray]:
    """``{namespace: {name: array}}`` (or a flat ``{name: array}``, taken as ``model``) -> ``{"ns.name": array}``."""
    values = list(tensors.values())
    if all(isinstance(v, Mapping) for v in values):
        nested = tensors
    elif not any(isinstance(v, Mapping) for v in values):
        nested = {"model": tensors}
    else:
        raise TypeError("tensors must be either {namespace: {name: array}} or a flat {name: array}, not a mix")
    flat = {}
    for ns, group in nested.items():
        if not isinstance(ns, str) or not ns or "." in ns:
            raise TypeError(f"tensor namespace must be a nonempty string without dots, got {ns!r}")
        for name, arr in group.items():
            if hasattr(arr, "detach"):  # a torch tensor, without importing torch
                arr = arr.detach().cpu().numpy()
            arr = np.ascontiguousarray(arr)
            if arr.dtype == object:
                raise TypeError(f"tensor {ns}.{name} has dtype object; expected a numeric array")
            flat[f"{ns}.{name}"] = arr
    return flat


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def content_digest(flat: Mapping[str, np.ndarray], meta_json: str) -> str:
    """``"sha256:<hex>"`` of the ``bptt`` metadata string and the ``{"ns.name": array}`` tensors.

    The canonical serialisation is described in the module docstring; it is the
    same for the arrays given to :func:`save_checkpoint` and those read back.
    """
    h = hashlib.sha256(_DIGEST_DOMAIN)
    meta_bytes = meta_json.encode("utf-8", "surrogatepass")
    h.update(_u64(len(meta_bytes)))
    h.update(meta_bytes)
    for name in sorted(flat):
        arr = np.asarray(flat[name])
        le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))  # one byte order on every machine
        name_b, dtype_b = name.encode("utf-8", "surrogatepass"), le.dtype.str.encode("ascii")
        h.update(_u64(len(name_b)) + name_b + _u64(len(dtype_b)) + dtype_b + _u64(le.ndim))
        h.update(b"".join(_u64(d) for d in le.shape))
        h.update(_u64(le.nbytes))
        h.update(le.data if le.nbytes else b"")  # the buffer itself, no copy
    return _DIGEST_PREFIX + h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(final: Path) -> None:
    """Delete temporary files of ``final`` left by writers that were killed mid-save.

    Only names this module creates (``.<name>.<pid>.<hex>.tmp``) whose pid is no
    longer running; a recycled pid merely keeps a stale file.  POSIX only, since
    ``os.kill(pid, 0)`` is a liveness probe there but not on Windows.
    """
    if os.name != "posix":
        return
    prefix = f".{final.name}."
    try:
        names = os.listdir(final.parent)
    except OSError:
        return
    for name in names:
        parts = name[len(prefix) :].split(".")
        if not (name.startswith(prefix) and len(parts) == 3 and parts[2] == "tmp" and parts[0].isdigit()):
            continue
        pid = int(parts[0])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running: possibly saving right now
        except ProcessLookupError:
            pass
        except OSError:
            continue  # exists but not ours to signal
        try:
            os.unlink(final.parent / name)
        except OSError:
            pass


def _atomic_write(final: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``final``, fsync, rename, fsync the directory.

    The temporary file is on the same filesystem, so the rename is atomic: a kill
    at any moment leaves either the old or the new file at ``final``.
    """
    directory = final.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoint {final}: cannot create directory {directory} ({e.strerror or e}); "
            "expected a writable directory"
        ) from None
    _remove_stale_temps(final)
    while True:
        tmp = directory / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            # 0o666 minus the umask, the permissions of an ordinary new file (mkstemp would give 0600)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise CheckpointError(
                f"cannot write checkpoint {final}: directory {directory} is not writable ({e.strerror or e}); "
                "expected a writable directory"
            ) from None
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, final)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
    finally:
        if tmp.exists():  # only when something failed before the rename
            try:
                tmp.unlink()
            except OSError:
                pass
    _fsync_dir(directory)  # the rename itself survives a power loss


# ---------------------------------------------------------------------------- save / load
def save_checkpoint(
    path: str | os.PathLike,
    tensors: Mapping[str, Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
    meta: Mapping,
) -> None:
    """Write ``tensors`` and ``meta`` atomically to ``path`` (plus a JSON sidecar for people).

    ``tensors`` is ``{namespace: {name: array}}``, e.g. ``{"model": ...,
    "optim": ...}``; a flat ``{name: array}`` is stored under ``model``.
    Namespaces with no tensors leave nothing in the file.  ``meta`` must be
    JSON-serialisable (NumPy scalars and arrays are converted); tuples come back
    as lists.  The SHA-256 of the contents goes into the file's metadata (see
    the module docstring).  CheckpointError if the directory is not writable.
    """
    from safetensors.numpy import save

    final = Path(path)
    flat = _flatten(tensors)
    full_meta = {"format_version": FORMAT_VERSION, **{k: v for k, v in meta.items() if k != "format_version"}}
    # ASCII-escaped so that any str (even a lone surrogate in a vocab) survives the UTF-8 header
    meta_json = json.dumps(full_meta, default=_json_default)

    digest = content_digest(flat, meta_json)
    # serialised in memory (one extra copy of the tensors) so that we own the only temporary file
    _atomic_write(final, save(flat, metadata={_META_KEY: meta_json, _DIGEST_KEY: digest}))

    pretty = json.dumps(full_meta, default=_json_default, ensure_ascii=False, indent=2) + "\n"
    _atomic_write(sidecar_path(final), pretty.encode("utf-8", "backslashreplace"))


#: whether :func:`load_checkpoint` verifies digests when its caller does not say; ``bptt --no-verify`` turns it
#: off for one command (every load in it: sample, eval, resume, export, inspect), through
#: :func:`set_default_verify`.
_VERIFY_BY_DEFAULT = [True]


def set_default_verify(enabled: bool) -> None:
    """Make digest verification the default (True) or not (False) for loads that do not pass ``verify``."""
    _VERIFY_BY_DEFAULT[0] = bool(enabled)


def checkpoints_in(directory: str | os.PathLike, limit: int = 4) -> str:
    """The ``*.safetensors`` files in ``directory`` for an error message: "d/best.safetensors,
    d/last.safetensors" (at most ``limit`` named, then "and N more"), or "" for none or no such folder."""
    d = Path(directory)
    found = sorted(str(c) for c in d.glob("*.safetensors")) if d.is_dir() else []
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more


def load_checkpoint(path: str | os.PathLike, verify: bool | None = None) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``(tensors, meta)``: ``tensors`` is ``{namespace: {name: array}}``
    and ``meta`` is the saved meta including ``format_version``.  Every way the
    file can be wrong (missing, not safetensors, truncated, no or invalid
    ``bptt`` metadata, written by a newer bptt) is a one-line CheckpointError.

    With ``verify`` (the default) the contents are hashed and compared with the
    digest stored at save time: a mismatch (a flipped bit anywhere in the
    tensors or the meta) is a one-line CheckpointError naming the file.  A file
    without a digest (written before digests existed) loads, with one
    :class:`UnverifiedCheckpointWarning` naming the file.  ``verify=False``
    skips both (for forensics on a damaged file); the structural checks above
    still apply.  ``verify=None`` takes the default set by :func:`set_default_verify` (on).
    """
    from safetensors import safe_open

    if verify is None:
        verify = _VERIFY_BY_DEFAULT[0]

    p = Path(path)
    if not p.exists():
        near = checkpoints_in(p.parent)
        raise CheckpointError(f"checkpoint not found: {p}" + (f" ({p.parent} holds {near})" if near else ""))
    if p.is_dir():
        inside = checkpoints_in(p)
        raise CheckpointError(f"{p} is a directory; expected a checkpoint file" + (f" (it holds {inside})" if inside else ""))
    try:
        with safe_open(str(p), framework="numpy") as f:
            header_meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own SafetensorError (and others) for bad files
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(
            f"{p} is not a valid checkpoint (not a safetensors file, truncated or corrupted: {reason})"
        ) from None

    if _META_KEY not in header_meta:
        raise CheckpointError(
            f"{p} is a safetensors file without '{_META_KEY}' metadata; expected a checkpoint written by bptt"
        )
    # checked before the meta is parsed, so that damage reads as damage, not as a format problem
    unverified = verify and not _verify_digest(p, flat, header_meta)
    try:
        meta = json.loads(header_meta[_META_KEY])
    except ValueError as e:
        raise CheckpointError(f"{p}: '{_META_KEY}' metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: '{_META_KEY}' metadata must be a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{p}: missing or invalid format_version {version!r}; expected a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} was written by a newer bptt (format_version {version}; this version reads up to "
            f"{FORMAT_VERSION}); upgrade bptt to load it"
        )

    tensors: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in flat.items():
        ns, dot, name = key.partition(".")
        if not dot or not ns or not name:
            raise CheckpointError(f"{p}: tensor name {key!r} has no namespace; expected '<namespace>.<name>'")
        tensors.setdefault(ns, {})[name] = arr
    if unverified:  # only for a file that is otherwise a valid checkpoint
        warnings.warn(
            f"{p} has no content digest (written by an older bptt): loaded without verifying its bytes",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
    return tensors, meta


def _verify_digest(p: Path, flat: Mapping[str, np.ndarray], header_meta: Mapping[str, str]) -> bool:
    """True if the stored digest matches, False if there is none; CheckpointError if it differs."""
    stored = header_meta.get(_DIGEST_KEY)
    if stored is None:
        return False
    if not (stored.startswith(_DIGEST_PREFIX) and len(stored) == len(_DIGEST_PREFIX) + 64):
        raise CheckpointError(f"{p}: invalid content digest {stored[:80]!r}; the file is corrupted")
    if content_digest(flat, header_meta[_META_KEY]) != stored:
        raise CheckpointError(
            f"{p} is corrupted: its contents do not match the SHA-256 digest written with them "
            "(bptt --no-verify ... loads it anyway, for inspection)"
        )
    return True


# ---------------------------------------------------------------------------- RNG state
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _to_json(obj):
    """Bit-generator state -> JSON: arrays become tagged lists; big ints stay ints (JSON has no limit)."""
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


def rng_state(gen: np.random.Generator) -> dict:
    """A JSON-serialisable snapshot of ``gen``; :func:`restore_rng` continues it exactly."""
    if not isinstance(gen, np.random.Generator):
        raise TypeError(f"rng_state expects a numpy.random.Generator, got {type(gen).__name__}")
    return _to_json(gen.bit_generator.state)


def restore_rng(state: Mapping) -> np.random.Generator:
    """A new Generator in exactly the state recorded by :func:`rng_state`."""
    name = state.get("bit_generator") if isinstance(state, Mapping) else None
    if name not in _BIT_GENERATORS:
        raise CheckpointError(
            f"invalid RNG state in checkpoint: bit generator {name!r}; expected one of {', '.join(_BIT_GENERATORS)}"
        )
    bit_gen = getattr(np.random, name)()
    try:
        bit_gen.state = _from_json(dict(state))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"invalid RNG state in checkpoint for {name}: {e}") from None
    return np.random.Generator(bit_gen)


# ---------------------------------------------------------------------------- one metadata schema
# bptt.trainer writes one schema for every kind (kind, step, config, train, optimizer, best, eval,
# first_loss, + the job's keys).  Character-LM checkpoints written before it named three of those
# differently; seq2seq checkpoints already used step/config/train.
_OLD_CHARLM_KEYS = {"iteration": "step", "model_config": "config", "train_config": "train", "best_val": "best"}


def upgrade_meta(meta: Mapping) -> dict:
    """``meta`` in the current schema: old character-LM keys renamed, nothing else changed."""
    out = dict(meta)
    for old, new in _OLD_CHARLM_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def load_checkpoint_of_kind(path: str | os.PathLike, kind: str, what: str) -> tuple[dict, dict]:
    """(tensors, meta in the current schema) of a checkpoint, which must be of ``kind`` (``what``: for the message)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, not {what}")
    return tensors, upgrade_meta(meta)
