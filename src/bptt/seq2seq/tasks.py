"""Sequence-to-sequence data: built-in tasks generated on the fly, TSV pairs, token vocabularies.

Shape legend: S source length, T target length (tokens), N batch.

Built-in tasks (no download; every example comes from a seeded generator):

* ``dates``    human date formats → ISO:  "saturday 9 may 2018", "9/5/18", "May 9, 2018",
               "2018.05.09", "09 May 18" → "2018-05-09".  Dates span 1950-01-01..2049-12-31;
               two-digit years pivot at 50 (18 → 2018, 72 → 1972); numeric formats are day-first.
* ``addition`` "123+4567" → "4690", operands of 1 to 4 digits.
* ``reverse``  "hello" → "olleh", 1 to 20 lowercase letters.

Each task has a held-out test set drawn with a fixed seed; the training stream
rejects every source string that occurs in it, so train and test are disjoint.
All built-in tasks are character-level.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from bptt.lm.data import DataError

__all__ = [
    "PAD",
    "BOS",
    "EOS",
    "SPECIALS",
    "TokenVocab",
    "tokenize",
    "detokenize",
    "Task",
    "DatesTask",
    "AdditionTask",
    "ReverseTask",
    "TASKS",
    "get_task",
    "load_pairs",
    "TEST_SEED",
]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")
TEST_SEED = 1234  # the held-out sets are drawn from this seed, never from the training seed
LEVELS = ("char", "word")


# ============================================================================ tokens and vocabularies
def tokenize(text: str, level: str) -> list[str]:
    """Characters, or whitespace-separated words."""
    if level == "char":
        return list(text)
    if level == "word":
        return text.split()
    raise ValueError(f"unknown level {level!r}; expected char or word")


def detokenize(tokens: Iterable[str], level: str) -> str:
    return ("" if level == "char" else " ").join(tokens)


class TokenVocab:
    """Tokens ↔ ids, with ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2 before the data's tokens."""

    def __init__(self, tokens: Iterable[str]) -> None:
        toks = list(tokens)
        if list(toks[: len(SPECIALS)]) != list(SPECIALS):
            toks = list(SPECIALS) + [t for t in toks if t not in SPECIALS]
        if len(set(toks)) != len(toks):
            raise DataError("a vocabulary must not contain the same token twice")
        self.tokens = toks
        self.index = {t: i for i, t in enumerate(toks)}

    @classmethod
    def build(cls, sequences: Iterable[Iterable[str]]) -> TokenVocab:
        """The sorted set of tokens occurring in ``sequences`` (deterministic order)."""
        seen: set[str] = set()
        for seq in sequences:
            seen.update(seq)
        return cls(sorted(seen - set(SPECIALS)))

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenVocab) and other.tokens == self.tokens

    def unknown(self, tokens: Iterable[str]) -> list[str]:
        """Tokens not in the vocabulary, in order of first appearance."""
        out: list[str] = []
        for t in tokens:
            if t not in self.index and t not in out:
                out.append(t)
        return out

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """(len,) int64 ids; DataError naming every token outside the vocabulary."""
        tokens = list(tokens)
        bad = self.unknown(tokens)
        if bad:
            shown = ", ".join(repr(t) for t in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise DataError(f"{len(bad)} token(s) not in the model's vocabulary: {shown}")
        return np.array([self.index[t] for t in tokens], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to (not including) the first ``</s>``; ``<pad>`` and ``<s>`` dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i > EOS:
                out.append(self.tokens[i])
        return out

    def to_json(self) -> list[str]:
        return list(self.tokens)

    @classmethod
    def from_json(cls, tokens) -> TokenVocab:
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError("a saved vocabulary must be a list of strings")
        return cls(tokens)


# ============================================================================ built-in tasks
class Task:
    """A generator of (source, target) string pairs, char-level, with a disjoint held-out set."""

    name = ""
    level = "char"
    test_size = 2000
    src_alphabet = ""
    tgt_alphabet = ""
    max_src_len = 0
    max_tgt_len = 0

    def sample(self, rng: np.random.Generator) -> tuple[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def vocabs(self) -> tuple[TokenVocab, TokenVocab]:
        return TokenVocab(sorted(self.src_alphabet)), TokenVocab(sorted(self.tgt_alphabet))

    def test_set(self, n: int | None = None) -> list[tuple[str, str]]:
        """The held-out pairs: distinct sources drawn from :data:`TEST_SEED`."""
        n = self.test_size if n is None else n
        rng = np.random.default_rng(TEST_SEED)
        seen: dict[str, str] = {}
        while len(seen) < n:
            s, t = self.sample(rng)
            seen.setdefault(s, t)
        return list(seen.items())

    def train_stream(self, rng: np.random.Generator) -> Iterator[tuple[str, str]]:
        """Endless fresh training pairs, never one whose source is in the test set."""
        held_out = {s for s, _ in self.test_set()}
        while True:
            s, t = self.sample(rng)
            if s not in held_out:
                yield s, t


_MONTHS = [_dt.date(2000, m, 1).strftime("%B").lower() for m in range(1, 13)]
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def _date_formats(d: _dt.date) -> list[str]:
    """Human renderings of ``d`` (day-first for the numeric ones)."""
    day, mon, year = d.day, d.month, d.year
    month, wd = _MONTHS[mon - 1], _WEEKDAYS[d.weekday()]
    yy = f"{year % 100:02d}"
    return [
        f"{wd} {day} {month} {year}",  # saturday 9 may 2018
        f"{day}/{mon}/{yy}",  # 9/5/18
        f"{month.capitalize()} {day}, {year}",  # May 9, 2018
        f"{year}.{mon:02d}.{day:02d}",  # 2018.05.09
        f"{day:02d} {month[:3].capitalize()} {yy}",  # 09 May 18
        f"{day} {month} {year}",  # 9 may 2018
        f"{day:02d}/{mon:02d}/{year}",  # 09/05/2018
        f"{wd.capitalize()}, {month.capitalize()} {day}, {year}",  # Saturday, May 9, 2018
        f"{day}-{month[:3]}-{year}",  # 9-may-2018
        f"{day:02d}.{mon:02d}.{year}",  # 09.05.2018
        f"{month.upper()} {day} {year}",  # MAY 9 2018
        f"{wd[:3]} {month[:3]} {day} {year}",  # sat may 9 2018
    ]


class DatesTask(Task):
    name = "dates"
    first, last = _dt.date(1950, 1, 1), _dt.date(2049, 12, 31)
    tgt_alphabet = "0123456789-"

    def __init__(self) -> None:
        alphabet: set[str] = set()
        self.max_src_len = 0
        for d in (_dt.date(2000 + k % 28, 1 + k % 12, 1 + k % 28) for k in range(400)):
            for f in _date_formats(d):
                alphabet.update(f)
        for m in range(12):  # every month and weekday name, longest renderings
            for s in _date_formats(_dt.date(2017, m + 1, 28)):
                alphabet.update(s)
        for s in _date_formats(_dt.date(2018, 9, 26)):  # wednesday 26 september: the longest
            self.max_src_len = max(self.max_src_len, len(s))
        self.src_alphabet = "".join(sorted(alphabet))
        self.max_tgt_len = 10
        self._span = (self.last - self.first).days + 1
        self._nformats = len(_date_formats(self.first))

    def sample(self, rng):
        d = self.first + _dt.timedelta(days=int(rng.integers(self._span)))
        return _date_formats(d)[int(rng.integers(self._nformats))], d.isoformat()


class AdditionTask(Task):
    name = "addition"
    src_alphabet = "0123456789+"
    tgt_alphabet = "0123456789"
    max_digits = 4
    max_src_len = 2 * max_digits + 1
    max_tgt_len = max_digits + 1

    def _operand(self, rng):
        k = int(rng.integers(1, self.max_digits + 1))  # uniform digit count, so short numbers are common too
        return int(rng.integers(0 if k == 1 else 10 ** (k - 1), 10**k))

    def sample(self, rng):
        a, b = self._operand(rng), self._operand(rng)
        return f"{a}+{b}", str(a + b)


class ReverseTask(Task):
    name = "reverse"
    src_alphabet = tgt_alphabet = "abcdefghijklmnopqrstuvwxyz"
    max_len = 20
    max_src_len = max_tgt_len = max_len

    def sample(self, rng):
        k = int(rng.integers(1, self.max_len + 1))
        s = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, k))
        return s, s[::-1]


TASKS = {"dates": DatesTask, "addition": AdditionTask, "reverse": ReverseTask}


def get_task(name: str) -> Task:
    cls = TASKS.get(name)
    if cls is None:
        raise DataError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return cls()


# ============================================================================ user data
def load_pairs(path: str | os.PathLike, level: str = "char") -> tuple[list[tuple[list[str], list[str]]], int]:
    """Read ``source<TAB>target`` lines; returns (token pairs, number of empty lines skipped).

    DataError (one line) for a missing/unreadable file, a line without a tab
    (naming its line number), an empty side, or a file with no pairs at all.
    """
    if level not in LEVELS:
        raise DataError(f"unknown level {level!r}; expected char or word")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; expected a TSV file of source<TAB>target lines")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte offset {e.start}); expected a UTF-8 text file") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    pairs, skipped = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            skipped += 1
            continue
        if "\t" not in line:
            raise DataError(f"{p}:{lineno}: no tab; expected 'source<TAB>target'")
        src, tgt = line.split("\t", 1)
        if "\t" in tgt:
            raise DataError(f"{p}:{lineno}: more than one tab; expected exactly one between source and target")
        s, t = tokenize(src, level), tokenize(tgt, level)
        if not s or not t:
            raise DataError(f"{p}:{lineno}: empty {'source' if not s else 'target'}; expected text on both sides of the tab")
        pairs.append((s, t))
    if not pairs:
        raise DataError(f"{p}: no source<TAB>target pairs found ({skipped} empty lines)")
    return pairs, skipped
