"""What a language model predicts: characters, bytes or words, behind one interface.

Shape legend
------------
    L   length of an encoded text, in units (= ids)
    V   number of distinct ids (vocabulary size), ``len(units)``

Three kinds of unit, interchangeable for the training loop::

    CharUnits   one id per Unicode character of the training text; optionally a
                final ``<unk>`` id that every unseen character maps to
    ByteUnits   one id per byte, V = 256: any file in any encoding (or none),
                nothing is ever unknown; decoding shows invalid UTF-8 as \\xNN
    WordUnits   whitespace/punctuation tokens, the V - 2 most frequent words of
                the training text plus ``<unk>`` (id 0) and ``<eos>`` (id 1, one
                at the end of every line)

Every unit object has

    kind, unit_name               "char"/"byte"/"word", "character"/"byte"/"word"
    len(u), u.dtype               V and the smallest unsigned dtype holding every id
    u.unk_id                      id of <unk>, or None (no unknowns possible, or an error)
    u.read(path, encoding)        the file as the unit wants it (str, or bytes for ByteUnits)
    u.encode(data)                (L,) ids; unknown units -> unk_id, or DataError without one
    u.encode_counted(data)        Encoded(ids, unknown, unknown_units): the same, with the count
    u.decode(ids)                 readable text (never raises for ids in range)
    u.decoder()                   a streaming decoder: call(ids, final=False) -> str
    u.unknown(data)               sorted distinct units of ``data`` outside the vocabulary
    u.to_json()                   a JSON object for the checkpoint; :func:`units_from_json` inverts it

and :func:`make_units` builds one from training data, :func:`lm_metrics` turns a
summed loss into per-unit figures (nats, bits, perplexity).  Problems a user can
cause are :class:`bptt.lm.data.DataError` with a one-line message.
"""

from __future__ import annotations

import codecs
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from bptt.lm.data import DataError, Vocab, check_file, read_text, show_chars

__all__ = [
    "UNIT_KINDS",
    "UNK",
    "EOS",
    "UNK_CHAR",
    "Encoded",
    "CharUnits",
    "ByteUnits",
    "WordUnits",
    "make_units",
    "units_from_json",
    "read_bytes",
    "map_bytes",
    "tokenize",
    "detokenize",
    "lm_metrics",
    "as_units",
    "encode_prime",
]

UNIT_KINDS = ("char", "byte", "word")
UNK, EOS = "<unk>", "<eos>"
#: How CharUnits shows its <unk> id when decoding: U+FFFD REPLACEMENT CHARACTER.
UNK_CHAR = "\ufffd"


class Encoded(NamedTuple):
    ids: np.ndarray  # (L,) in the units' dtype
    unknown: int  # how many units of the data were outside the vocabulary (mapped to <unk>)
    unknown_units: list  # their distinct values, sorted


def _smallest_uint(n: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if n <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _check_ids(ids, V: int, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size == 0:
        return ids.reshape(0).astype(np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"decode expects a 1-D sequence of integer ids, got shape {ids.shape} dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        raise DataError(f"id {int(ids[bad][0])} is out of range for {V} {what}")
    return ids.astype(np.int64)


class _Decoder:
    """Streaming decoder for units whose ids decode independently (chars, words)."""

    def __init__(self, decode):
        self._decode = decode

    def __call__(self, ids, final: bool = False) -> str:
        return self._decode(ids)


# ---------------------------------------------------------------------------- characters
def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharUnits:
    """Characters, with an optional ``<unk>`` id (the last one, ``V - 1``).

    The characters take ids ``0 .. C-1`` in the order given (``fit`` sorts them,
    exactly as :class:`bptt.lm.data.Vocab` does, so the ids are the same as a
    Vocab's).  With ``unk=True`` a character outside the vocabulary encodes as
    ``<unk>`` and is counted; without it, it is a DataError (the old behaviour).
    ``<unk>`` decodes as :data:`UNK_CHAR`.
    """

    kind, unit_name = "char", "character"

    def __init__(self, chars: Iterable[str], unk: bool = False) -> None:
        self.vocab = Vocab.from_json(list(chars))  # validates: single characters, no repeats
        self.chars = self.vocab.chars
        self.unk_id = len(self.chars) if unk else None
        cp = _codepoints("".join(self.chars))
        # dense code point -> id table; -1 = unknown, and the extra last entry catches larger code points
        self._table = np.full(int(cp.max()) + 2 if len(cp) else 1, -1, dtype=np.int64)
        self._table[cp] = np.arange(len(cp))
        self._cp = cp

    @classmethod
    def fit(cls, text: str, unk: bool = False) -> CharUnits:
        if not text:
            raise DataError("no training text to build a character vocabulary from")
        return cls(Vocab(text).chars, unk=unk)

    def __len__(self) -> int:
        return len(self.chars) + (self.unk_id is not None)

    def __eq__(self, other) -> bool:
        if isinstance(other, Vocab):  # the same characters, the same ids: a Vocab is CharUnits without <unk>
            return self.unk_id is None and self.chars == other.chars
        return isinstance(other, CharUnits) and (self.chars, self.unk_id) == (other.chars, other.unk_id)

    __hash__ = None

    def __repr__(self) -> str:
        return f"CharUnits({len(self.chars)} characters{' + <unk>' if self.unk_id is not None else ''})"

    @property
    def dtype(self) -> np.dtype:
        return _smallest_uint(len(self))

    def read(self, path: str | os.PathLike, encoding: str = "utf-8") -> str:
        return read_text(path, encoding)

    def unknown(self, text: str) -> list[str]:
        return self.vocab.unknown(text)

    def require_known(self, text: str, what: str = "the text", model: str = "the model") -> None:
        """DataError naming the characters of ``text`` outside the vocabulary (see :meth:`Vocab.require_known`)."""
        self.vocab.require_known(text, what, model)

    def encode_counted(self, text: str, chunk_chars: int = 1 << 20) -> Encoded:
        """(L,) ids; unseen characters -> <unk> (counted), or DataError without <unk>.

        Works in chunks of ``chunk_chars`` so that the temporaries stay a few MB.
        """
        if not isinstance(text, str):
            raise DataError(f"character units encode text (str), got {type(text).__name__}")
        out = np.empty(len(text), dtype=self.dtype)
        unknown = 0
        for start in range(0, len(text), chunk_chars):
            ids = np.take(self._table, _codepoints(text[start : start + chunk_chars]), mode="clip")
            bad = ids < 0
            if bad.any():
                if self.unk_id is None:
                    distinct = self.unknown(text)
                    count = sum(text.count(c) for c in distinct)
                    raise DataError(
                        f"text contains {count} character(s) not in the vocabulary ({show_chars(distinct)}); "
                        f"expected only the {len(self.chars)} characters of the training corpus "
                        "(or a vocabulary with <unk>)"
                    )
                unknown += int(bad.sum())
                ids[bad] = self.unk_id
            out[start : start + len(ids)] = ids
        return Encoded(out, unknown, self.unknown(text) if unknown else [])

    def encode(self, text: str) -> np.ndarray:
        return self.encode_counted(text).ids

    def decode(self, ids) -> str:
        ids = _check_ids(ids, len(self), "character ids")
        cp = np.append(self._cp, np.uint32(ord(UNK_CHAR)))[ids]  # the extra entry is <unk>'s
        return cp.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def decoder(self) -> _Decoder:
        return _Decoder(self.decode)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": list(self.chars), "unk": self.unk_id is not None}


# ---------------------------------------------------------------------------- bytes
def read_bytes(path: str | os.PathLike) -> bytes:
    """The raw bytes of a file, not decoded in any way; DataError if missing, a directory or empty."""
    p = check_file(path, "a file", "some data")
    try:
        return p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None


def map_bytes(path: str | os.PathLike) -> np.memmap:
    """The file as a read-only (L,) uint8 memory map: byte ids of a corpus of any size, no copy."""
    p = check_file(path, "a file", "some data")
    try:
        return np.memmap(p, dtype=np.uint8, mode="r")
    except OSError as e:
        raise DataError(f"{p}: cannot map ({e.strerror or e})") from None


class ByteUnits:
    """Bytes: id = byte value, V = 256.  Reads any file without decoding; nothing is unknown.

    ``encode`` takes bytes (or a str, encoded as UTF-8, for prompts);
    ``decode`` decodes the bytes as UTF-8 with ``errors="backslashreplace"``, so
    a byte sequence that is not valid UTF-8 shows as ``\\xNN`` and never raises;
    :meth:`decode_bytes` gives the raw bytes back.
    """

    kind, unit_name = "byte", "byte"
    unk_id = None
    errors = "backslashreplace"

    def __len__(self) -> int:
        return 256

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteUnits)

    def __repr__(self) -> str:
        return "ByteUnits(256)"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def read(self, path: str | os.PathLike, encoding: str | None = None) -> bytes:
        """The file's bytes; ``encoding`` is accepted for a uniform call and ignored."""
        return read_bytes(path)

    def unknown(self, data) -> list:
        return []

    def encode_counted(self, data) -> Encoded:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DataError(f"byte units encode bytes (or str as UTF-8), got {type(data).__name__}")
        return Encoded(np.frombuffer(bytes(data), dtype=np.uint8).copy(), 0, [])

    def encode(self, data) -> np.ndarray:
        return self.encode_counted(data).ids

    def decode_bytes(self, ids) -> bytes:
        return _check_ids(ids, 256, "byte values").astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", self.errors)

    def decoder(self):
        """Streaming UTF-8 decoder: a character split across calls is held until complete."""
        inc = codecs.getincrementaldecoder("utf-8")(self.errors)

        def decode(ids, final: bool = False) -> str:
            return inc.decode(self.decode_bytes(ids), final=final)

        return decode

    def to_json(self) -> dict:
        return {"kind": "byte"}


# ---------------------------------------------------------------------------- words
# a literal <unk> (as in the Penn Treebank files) | a word, with inner apostrophes | one other non-space
_TOKEN_RE = re.compile(r"<unk>|\w+(?:['’]\w+)*|[^\w\s]")
# no space before closing punctuation and clitics; none after opening brackets
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%…”’»")
_NO_SPACE_AFTER = frozenset("([{“‘«$#")


def tokenize(text: str) -> list[str]:
    """Word tokens of ``text``: runs of word characters (``don't`` stays whole), single punctuation
    marks, and :data:`EOS` after every line that ends with a newline."""
    tokens: list[str] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        tokens.extend(_TOKEN_RE.findall(line))
        if i < len(lines) - 1:
            tokens.append(EOS)
    return tokens


def detokenize(tokens: Iterable[str]) -> str:
    """Tokens joined back readably: spaces between words, none before ``.,;:!?)`` or ``'s``-like
    clitics, none after ``([{``, a newline for every :data:`EOS`.  Not the exact original spacing."""
    out: list[str] = []
    line_start, prev = True, ""
    for tok in tokens:
        if tok == EOS:
            out.append("\n")
            line_start = True
            continue
        glued = tok[0] in _NO_SPACE_BEFORE or tok[0] in "'’" and len(tok) > 1 or prev in _NO_SPACE_AFTER
        if not line_start and not glued:
            out.append(" ")
        out.append(tok)
        line_start, prev = False, tok
    return "".join(out)


class WordUnits:
    """Words: ``<unk>`` = 0, ``<eos>`` = 1, then the vocabulary in id order.

    :meth:`fit` keeps the ``vocab_size - 2`` most frequent words of the
    training text, numbered from the most frequent (what an adaptive softmax's
    cutoffs assume; ties broken by the word's sort order, so the same text
    always gives the same ids); every other word encodes as ``<unk>`` and is
    counted by :meth:`encode_counted`.  A literal ``<unk>`` in the text (as in
    the Penn Treebank files) is the ``<unk>`` token and is not counted as unknown.
    """

    kind, unit_name = "word", "word"
    unk_id, eos_id = 0, 1

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        for w in words:
            if not isinstance(w, str) or not w or w in (UNK, EOS):
                raise DataError(f"a word vocabulary holds nonempty words other than {UNK} and {EOS}, got {w!r}")
        if len(set(words)) != len(words):
            raise DataError("a word vocabulary must not contain the same word twice")
        self.tokens = [UNK, EOS, *words]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def fit(cls, text: str, vocab_size: int | None = None) -> WordUnits:
        """The words of ``text``; ``vocab_size`` (V, including <unk> and <eos>) keeps the most frequent."""
        counts = Counter(t for t in tokenize(text) if t not in (UNK, EOS))
        if not counts:
            raise DataError("no words in the training text to build a word vocabulary from")
        distinct = len(counts)
        if vocab_size is not None:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 3:
                raise DataError(
                    f"vocab_size must be an integer >= 3 (<unk>, <eos> and at least one word), got {vocab_size!r}"
                )
            if vocab_size > distinct + 2:
                raise DataError(
                    f"vocab_size {vocab_size} is larger than the training text allows: it has {distinct} distinct "
                    f"words, so at most {distinct + 2} with <unk> and <eos>; use a smaller vocab_size or omit it"
                )
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        keep = ranked if vocab_size is None else ranked[: vocab_size - 2]
        return cls(keep)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, WordUnits) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"WordUnits({len(self)} = {len(self) - 2} words + <unk>, <eos>)"

    @property
    def dtype(self) -> np.dtype:
        return _smallest_uint(len(self))

    def read(self, path: str | os.PathLike, encoding: str = "utf-8") -> str:
        return read_text(path, encoding)

    def unknown(self, text: str) -> list[str]:
        return sorted({t for t in tokenize(text) if t not in self.index})

    def encode_counted(self, text: str) -> Encoded:
        if not isinstance(text, str):
            raise DataError(f"word units encode text (str), got {type(text).__name__}")
        index, unk = self.index, self.unk_id
        tokens = tokenize(text)
        ids = np.fromiter((index.get(t, unk) for t in tokens), dtype=np.int64, count=len(tokens))
        # a literal <unk> in the text is in the index (id 0): only words outside it are counted
        unknown_words = Counter(t for t in tokens if t not in index)
        return Encoded(ids.astype(self.dtype), sum(unknown_words.values()), sorted(unknown_words))

    def encode(self, text: str) -> np.ndarray:
        return self.encode_counted(text).ids

    def decode(self, ids) -> str:
        ids = _check_ids(ids, len(self), "word ids")
        return detokenize(self.tokens[i] for i in ids.tolist())

    def decoder(self):
        """Streaming: words of consecutive calls are joined with the same spacing rules."""
        state = {"line_start": True, "prev": ""}

        def decode(ids, final: bool = False) -> str:
            toks = [self.tokens[i] for i in _check_ids(ids, len(self), "word ids").tolist()]
            if not toks:
                return ""
            text = detokenize(toks)
            first = toks[0]
            glued = first == EOS or first[0] in _NO_SPACE_BEFORE or (first[0] in "'’" and len(first) > 1) \
                or state["prev"] in _NO_SPACE_AFTER
            if not state["line_start"] and not glued:
                text = " " + text
            state["line_start"] = toks[-1] == EOS
            state["prev"] = "" if toks[-1] == EOS else toks[-1]
            return text

        return decode

    def to_json(self) -> dict:
        return {"kind": "word", "words": self.tokens[2:]}


# ---------------------------------------------------------------------------- building and restoring
def make_units(kind: str, data, *, unk: bool = False, vocab_size: int | None = None):
    """Units of ``kind`` fitted on training ``data`` (str; bytes for "byte", where it is not needed).

    ``unk`` adds <unk> to a character vocabulary (words always have one);
    ``vocab_size`` caps a word vocabulary (V, including <unk> and <eos>).
    """
    if kind == "char":
        if vocab_size is not None:
            raise DataError("vocab_size applies to word units only; a character vocabulary is every character seen")
        return CharUnits.fit(data, unk=unk)
    if kind == "byte":
        if vocab_size is not None:
            raise DataError("vocab_size applies to word units only; bytes always have V = 256")
        return ByteUnits()
    if kind == "word":
        return WordUnits.fit(data, vocab_size=vocab_size)
    raise DataError(f"unknown unit kind {kind!r}; expected one of {', '.join(UNIT_KINDS)}")


def units_from_json(d):
    """The units saved by ``.to_json()``.  A plain list of characters (the ``vocab`` of checkpoints
    written before units existed) is a CharUnits without <unk>."""
    if isinstance(d, list):
        return CharUnits(d)
    if not isinstance(d, dict) or d.get("kind") not in UNIT_KINDS:
        kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise DataError(f"saved units must be an object with kind one of {', '.join(UNIT_KINDS)}, got {kind!r}")
    kind = d["kind"]
    try:
        if kind == "char":
            if not isinstance(d.get("unk", False), bool):
                raise DataError(f"saved character units: 'unk' must be true or false, got {d.get('unk')!r}")
            return CharUnits(d["chars"], unk=d.get("unk", False))
        if kind == "byte":
            return ByteUnits()
        words = d["words"]
        if not isinstance(words, list):
            raise DataError(f"saved word units: 'words' must be a list, got {type(words).__name__}")
        return WordUnits(words)
    except KeyError as e:
        raise DataError(f"saved {kind} units lack the key {e.args[0]!r}") from None


# ---------------------------------------------------------------------------- metrics
def lm_metrics(total_nats: float, count: int, units) -> dict:
    """Per-unit figures from a loss summed over ``count`` predicted units.

    loss = total / count (nats per unit), bits_per_unit = loss / ln 2,
    perplexity = exp(loss).  Bits per character and per byte are the usual
    figures for character and byte models, perplexity for word models; they
    are comparable only between models with the same units (and, for words,
    the same vocabulary: everything outside it is one <unk>).
    """
    if count < 1:
        raise DataError(f"need at least one predicted {units.unit_name} to compute metrics, got {count}")
    loss = float(total_nats) / count
    return {
        "loss": loss,
        "bits_per_unit": loss / math.log(2),
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "unit": units.unit_name,
        "count": int(count),
    }


# ---------------------------------------------------------------------------- priming text
def as_units(vocab):
    """Units for a :class:`bptt.lm.data.Vocab` (character units without <unk>) or units unchanged."""
    if isinstance(vocab, Vocab):
        return CharUnits(vocab.chars)
    return vocab


def encode_prime(units, prime: str) -> np.ndarray:
    """(L,) ids of a priming text given on the command line, or a DataError in one line.

    Characters and words must all be known to the model (a prime is not evaluated, it steers, so an
    <unk> would steer blindly); a byte model takes the text's UTF-8 bytes, so a command-line
    argument that is not valid UTF-8 (Python holds its bytes as lone surrogates) is refused.
    """
    units = as_units(units)
    if units.kind == "byte":
        try:
            data = prime.encode("utf-8")
        except UnicodeEncodeError as e:
            ch = ord(prime[e.start])
            what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"character U+{ch:04X}"
            raise DataError(f"the priming text is not valid UTF-8 ({what} at character {e.start}); "
                            "a byte model is primed with UTF-8 text") from None
        return units.encode(data)
    if units.kind == "word":
        unknown = units.unknown(prime)
        if unknown:
            raise DataError(f"the priming text has {len(unknown)} word(s) this model does not know "
                            f"({show_chars(unknown)}); prime a word model with words of its vocabulary")
        return units.encode(prime)
    units.require_known(prime, "the priming text")
    return units.encode(prime)
