"""Write the Python standard library's source text to a file: a second corpus, besides tinyshakespeare,
for checking what ``bptt train --preset`` chooses and reaches on a text of another kind.

    python benchmarks/stdlib_corpus.py OUT.txt [--mb 4]

The text is ``bptt.lm.data.default_corpus`` (what ``bptt train`` reads when no ``--data`` is given): the
``.py`` files of the running interpreter's standard library, test suites and a few generated folders
left out, in a fixed shuffled order, cut at ``--mb`` megabytes (UTF-8).  The same interpreter always
writes the same file; it is not shipped (PSF licence), only rebuilt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bptt.lm.data import default_corpus


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the text file to write")
    ap.add_argument("--mb", type=float, default=4.0, help="megabytes of source to take (default: 4)")
    args = ap.parse_args()
    text, description = default_corpus(int(args.mb * 1_000_000))
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {description}")


if __name__ == "__main__":
    main()
