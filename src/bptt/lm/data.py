"""Text corpora for character language models: vocabulary, encoding, splits, batches.

Shape legend
------------
    L   length of a corpus or split, in characters (= ids)
    V   vocabulary size
    N   batch size = number of parallel streams
    T   time steps per window (truncated-BPTT length)
    S   stream length, (L - 1) // N

A corpus is a 1-D array of character ids, either in memory (:func:`encode_text`)
or memory-mapped from a ``.npy`` file (:func:`encode_file`), so a corpus larger
than RAM trains in a memory footprint that depends on ``N`` and ``T`` only.
Batches are time-major ``(T, N)`` int64 arrays.

Every problem a user can cause (a wrong path, a binary file, a wrong encoding, a
corpus too short for the batch shape) is a :class:`DataError` with a one-line
message.  Nothing here imports torch.
"""

from __future__ import annotations

import codecs
import math
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Vocab",
    "read_text",
    "check_file",
    "default_corpus",
    "encode_text",
    "encode_file",
    "split_corpus",
    "TBPTTBatches",
    "show_chars",
]

#: Characters per chunk when streaming a file (a few MB of temporaries per chunk).
DEFAULT_CHUNK_CHARS = 1 << 20

# Enough to see whether a file is binary: text files essentially never contain NUL.
_SNIFF_BYTES = 8192


class DataError(ValueError):
    """A corpus, vocabulary or batch shape that cannot be used (one-line message)."""


# ---------------------------------------------------------------------------- vocabulary
def _codepoints(text: str) -> np.ndarray:
    """(L,) uint32 code points of ``text``; surrogatepass keeps lone surrogates representable."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def show_chars(chars: Iterable[str], limit: int = 10) -> str:
    """Characters for an error message: their reprs, the first ``limit`` of them."""
    chars = list(chars)
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f", ... ({len(chars)} in all)" if len(chars) > limit else "")


class Vocab:
    """A bijection between characters and ids ``0 .. V-1``.

    ``Vocab(text)`` (any iterable of characters) takes the sorted set of distinct
    characters, so the same text always gives the same ids.  :meth:`from_json`
    restores a saved vocabulary in exactly its saved order.
    """

    def __init__(self, chars: Iterable[str] = ()) -> None:
        self._set_chars(sorted(set(chars)))

    def _set_chars(self, chars: list[str]) -> None:
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(f"a vocabulary holds single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise DataError("a vocabulary must not contain the same character twice")
        self._chars = list(chars)
        self._cp = _codepoints("".join(chars))  # (V,) code point of each id
        # dense code point -> id table (-1: not in the vocabulary); the extra last -1 catches
        # every larger code point via np.take(mode="clip").  At most 4.5 MB, usually a few KB.
        size = int(self._cp.max()) + 2 if len(chars) else 1
        self._table = np.full(size, -1, dtype=np.int32)
        self._table[self._cp] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def from_json(cls, chars: object) -> Vocab:
        """The inverse of :meth:`to_json`: ids follow the order of the list."""
        if not isinstance(chars, list):
            raise DataError(f"a saved vocabulary must be a list of characters, got {type(chars).__name__}")
        vocab = cls.__new__(cls)
        vocab._set_chars(chars)
        return vocab

    def to_json(self) -> list[str]:
        """The characters in id order (JSON-serialisable)."""
        return list(self._chars)

    @property
    def chars(self) -> list[str]:
        return list(self._chars)

    def __len__(self) -> int:
        return len(self._chars)

    def __contains__(self, ch: object) -> bool:
        return isinstance(ch, str) and len(ch) == 1 and bool(self._lookup(_codepoints(ch))[0] >= 0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._chars == other._chars

    def __repr__(self) -> str:
        return f"Vocab({len(self)} characters)"

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer dtype that holds every id."""
        for dt in (np.uint8, np.uint16, np.uint32):
            if len(self) <= np.iinfo(dt).max + 1:
                return np.dtype(dt)
        raise AssertionError("unreachable: Unicode has fewer than 2**32 characters")

    def _lookup(self, cp: np.ndarray) -> np.ndarray:
        """Ids of an array of code points, -1 where a character is not in the vocabulary."""
        return np.take(self._table, cp, mode="clip")

    def encode(self, text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> np.ndarray:
        """(L,) ids of ``text`` in :attr:`dtype`; DataError for characters outside the vocabulary.

        Works in chunks so that the temporaries stay a few MB however long the text is.
        """
        out = np.empty(len(text), dtype=self.dtype)
        for start in range(0, len(text), chunk_chars):
            piece = text[start : start + chunk_chars]
            ids = self._lookup(_codepoints(piece))
            if (ids < 0).any():
                self.require_known(text)
            out[start : start + len(piece)] = ids
        return out

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of a 1-D sequence of ids (inverse of :meth:`encode`)."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"decode expects a 1-D sequence of integer ids, got shape {ids.shape} dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= len(self))
        if bad.any():
            raise DataError(f"id {int(ids[bad][0])} is out of range for a vocabulary of {len(self)} characters")
        return self._cp[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def unknown(self, text: str) -> list[str]:
        """Sorted list of the distinct characters of ``text`` that are not in the vocabulary."""
        return sorted(c for c in set(text) if c not in self)

    def require_known(self, text: str, what: str = "the text", model: str = "the model") -> None:
        """The one rule for characters outside the vocabulary where they cannot be left out (training text,
        a priming text, text to inspect): a DataError that counts and names them."""
        unknown = self.unknown(text)
        if unknown:
            count = sum(text.count(c) for c in unknown)
            raise DataError(f"{what} has {count} characters outside the vocabulary of {model} "
                            f"({len(unknown)} distinct: {show_chars(unknown)})")


def encode_text(text: str, vocab: Vocab) -> np.ndarray:
    """(L,) ids of in-memory ``text`` in ``vocab.dtype`` (same result as :func:`encode_file`)."""
    return vocab.encode(text)


# ---------------------------------------------------------------------------- reading files
def _check_encoding(encoding: str) -> codecs.CodecInfo:
    try:
        return codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}; expected a Python codec name such as utf-8 or latin-1") from None


def check_file(path: str | os.PathLike, what: str = "a text file", content: str = "some text") -> Path:
    """``path`` as a Path, or DataError unless it is an existing, nonempty regular file (the messages name
    ``what`` the file should be and the ``content`` it should hold)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; expected a path to {what}")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; expected a path to {what}")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    if size == 0:
        raise DataError(f"{p}: file is empty; expected {content} to train on")
    return p


def _check_not_binary(p: Path, head: bytes, codec: codecs.CodecInfo) -> None:
    # UTF-16/32 text legitimately contains NUL bytes; every other encoding does not.
    if codec.name.startswith(("utf-16", "utf-32")):
        return
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{p}: looks like a binary file (NUL byte at offset {nul}); expected a text file "
                        "(a byte-level model reads any file: bptt train --unit byte)")


def _decode_error(p: Path, data: bytes, offset: int, encoding: str) -> DataError:
    bad = data[0] if data else None
    what = f"byte 0x{bad:02x}" if bad is not None else "incomplete character"
    hint = " (e.g. --encoding latin-1)" if codecs.lookup(encoding).name != "latin-1" else ""
    return DataError(
        f"{p}: cannot decode {what} at byte offset {offset} as {encoding}; "
        f"pass the file's encoding with --encoding{hint}"
    )


def _open(p: Path):
    try:
        return open(p, "rb")
    except OSError as e:
        raise DataError(f"{p}: cannot open ({e.strerror})") from None


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The whole text of a file, decoded exactly (no newline translation).

    DataError for a missing file, a directory, an empty file, a binary file and
    bytes that do not decode with ``encoding`` (with their byte offset).
    """
    codec = _check_encoding(encoding)
    p = check_file(path)
    with _open(p) as f:
        data = f.read()
    _check_not_binary(p, data[:_SNIFF_BYTES], codec)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise _decode_error(p, e.object[e.start : e.end], e.start, encoding) from None


def _iter_decoded(p: Path, encoding: str, chunk_chars: int) -> Iterator[str]:
    """Decoded pieces of ``p`` of at most about ``chunk_chars`` characters each.

    An incremental decoder carries a multi-byte character that straddles two
    reads over to the next piece; errors report their absolute byte offset.
    """
    codec = _check_encoding(encoding)
    decoder = codec.incrementaldecoder("strict")
    consumed = 0  # bytes handed to the decoder so far
    with _open(p) as f:
        first = True
        while True:
            raw = f.read(chunk_chars)
            if first:
                _check_not_binary(p, raw[:_SNIFF_BYTES], codec)
                first = False
            pending = len(decoder.getstate()[0])  # bytes buffered from the previous read
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise _decode_error(p, e.object[e.start : e.end], consumed - pending + e.start, encoding) from None
            consumed += len(raw)
            if text:
                yield text
            if not raw:
                return


def encode_file(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    encoding: str = "utf-8",
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> tuple[Vocab, np.memmap]:
    """Encode a text file of any size into a ``.npy`` of ids; return ``(vocab, ids)``.

    Two streaming passes: the first collects the character set (which fixes the
    vocabulary and the id dtype), the second encodes chunk by chunk into
    ``out_path`` (written under a temporary name, then renamed, so an
    interrupted run never leaves a partial file).  Peak memory is a small
    multiple of ``chunk_chars``, independent of the file size.  The returned
    ``(L,)`` array is a read-only memory map of ``out_path``.
    """
    if chunk_chars < 1:
        raise DataError(f"chunk_chars must be positive, got {chunk_chars}")
    p = check_file(path)
    out = Path(out_path)
    if out.exists() and out.resolve() == p.resolve():
        raise DataError(f"{out}: the encoded corpus would overwrite the text file; expected a different output path")

    seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point: faster than a set of str
    total = 0
    for text in _iter_decoded(p, encoding, chunk_chars):
        seen[_codepoints(text)] = True
        total += len(text)
    if total == 0:  # e.g. nothing but a byte-order mark
        raise DataError(f"{p}: no text after decoding as {encoding}; expected some text to train on")
    vocab = Vocab(map(chr, np.flatnonzero(seen).tolist()))

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        ids = np.lib.format.open_memmap(tmp, mode="w+", dtype=vocab.dtype, shape=(total,))
        pos = 0
        for text in _iter_decoded(p, encoding, chunk_chars):
            if pos + len(text) > total:
                raise DataError(f"{p}: file changed while it was being encoded; expected it to stay unchanged")
            try:
                ids[pos : pos + len(text)] = vocab.encode(text, chunk_chars)
            except DataError:  # a character the first pass did not see
                raise DataError(f"{p}: file changed while it was being encoded; expected it to stay unchanged") from None
            pos += len(text)
        if pos != total:
            raise DataError(f"{p}: file changed while it was being encoded; expected it to stay unchanged")
        ids.flush()
        del ids  # close the writable map before renaming (needed on Windows)
        os.replace(tmp, out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the encoded corpus ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return vocab, np.load(out, mmap_mode="r")


# ---------------------------------------------------------------------------- built-in corpus
# test suites, IDLE and lib2to3 are large and repetitive; encodings/ is mostly code-point tables
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "encodings"})


def default_corpus(max_bytes: int = 4_000_000) -> tuple[str, str]:
    """A corpus present on every machine: the ``.py`` sources of Python's standard library.

    Files are taken in a fixed pseudo-random order of their sorted relative
    paths (seed 0; skipping test suites, IDLE, lib2to3, the encoding tables,
    site-packages and anything that is not valid UTF-8) and concatenated until
    ``max_bytes`` UTF-8 bytes; the last file is cut at a character boundary.
    The shuffle spreads the corpus, and so its validation tail, over the whole
    library instead of the modules from ``a`` to ``e``.  The same interpreter
    always gives the same text.
    Returns ``(text, description)``.
    """
    if max_bytes < 1:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(root)
        rel_paths.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    rel_paths.sort()
    rel_paths = [rel_paths[i] for i in np.random.default_rng(0).permutation(len(rel_paths))]

    pieces, used, nfiles = [], 0, 0
    for rel in rel_paths:
        if used >= max_bytes:
            break
        try:
            data = (root / rel).read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        data = data[: max_bytes - used]
        # a cut may split a multi-byte character: drop the partial tail
        text = data.decode("utf-8", "ignore")
        if not text:
            continue
        pieces.append(text)
        used += len(text.encode("utf-8"))
        nfiles += 1
    if not pieces:
        raise DataError(
            f"no Python standard library sources found under {root}; pass a text file to train on instead"
        )
    text = "".join(pieces)
    return text, f"{nfiles} files, {len(text)} characters from {root} (Python {sys.version.split()[0]} standard library)"


# ---------------------------------------------------------------------------- splits and batches
def split_corpus(ids: np.ndarray, val_frac: float = 0.1, test_frac: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous ``(train, val, test)`` views of ``ids``: train first, then val, then test.

    With the defaults the last 10% is validation, as nanoGPT splits
    tinyshakespeare.  Boundaries are ``floor(L * (1 - val - test))`` and
    ``floor(L * (1 - test))``, computed exactly on the decimal fractions.  Views, not copies, so a memmap stays a memmap.
    """
    for name, f in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not isinstance(f, (int, float, np.integer, np.floating)) or not np.isfinite(f) or f < 0:
            raise DataError(f"{name} must be a fraction >= 0, got {f!r}")
    if val_frac + test_frac >= 1:
        raise DataError(
            f"val_frac + test_frac must be < 1 to leave training data, got {val_frac} + {test_frac} = {val_frac + test_frac}"
        )
    n = len(ids)
    # exact decimal arithmetic: in floats 1 - 0.05 - 0.15 < 0.8 would shift a boundary by one
    val_q, test_q = Fraction(repr(float(val_frac))), Fraction(repr(float(test_frac)))
    train_end = math.floor(n * (1 - val_q - test_q))
    val_end = math.floor(n * (1 - test_q))
    return ids[:train_end], ids[train_end:val_end], ids[val_end:]


class TBPTTBatches:
    """char-rnn's batch layout for truncated BPTT with a hidden state carried across windows.

    The split of length ``L`` is cut into ``N`` contiguous streams of
    ``S = (L - 1) // N`` characters: stream ``n`` covers ``ids[n*S : (n+1)*S]``
    (its targets reach one character further, hence the ``- 1``).  Window ``k``
    is ``x[t, n] = ids[n*S + k*T + t]`` for ``t < T`` and ``y = x`` shifted by
    one character, so window ``k`` of every stream continues window ``k - 1``
    and the final hidden state of one window is the right initial state for the
    next.  ``len(self) = S // T`` windows per epoch; the last ``S % T``
    characters of each stream (and the final ``L - 1 - N*S`` of the split) are
    not visited as inputs.

    Each batch gathers only ``N * (T + 1)`` ids, so a memory-mapped corpus is
    never read into RAM as a whole.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int) -> None:
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(ids, np.ndarray):
            ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise DataError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        self.ids = ids
        self.batch_size = N = int(batch_size)
        self.seq_len = T = int(seq_len)
        need = N * T + 1
        if len(ids) < need:
            raise DataError(
                f"split too short for one window: needs at least batch_size*seq_len+1 = {N}*{T}+1 = {need} "
                f"characters, has {len(ids)}; use a smaller --batch-size/--seq-len or more text"
            )
        self.stream_len = S = (len(ids) - 1) // N
        self._starts = np.arange(N, dtype=np.int64) * S  # (N,) first id of each stream
        self._offsets = np.arange(T + 1, dtype=np.int64)[:, None]  # (T+1, 1)

    def __len__(self) -> int:
        return self.stream_len // self.seq_len

    @property
    def tokens_per_epoch(self) -> int:
        """Number of (input, target) pairs in one epoch: ``len(self) * T * N``."""
        return len(self) * self.seq_len * self.batch_size

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``k``: ``(x, y)``, both ``(T, N)`` int64, ``y[t] = x[t + 1]`` within a stream."""
        K = len(self)
        if not -K <= k < K:
            raise IndexError(f"window {k} out of range for {K} windows")
        k %= K
        idx = self._starts[None, :] + k * self.seq_len + self._offsets  # (T+1, N)
        chunk = np.asarray(self.ids[idx], dtype=np.int64)  # gathers only these ids
        return chunk[:-1], chunk[1:]

    __getitem__ = batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for k in range(len(self)):
            yield self.batch(k)

    def __repr__(self) -> str:
        return f"TBPTTBatches({len(self)} windows of T={self.seq_len} x N={self.batch_size}, stream length {self.stream_len})"
