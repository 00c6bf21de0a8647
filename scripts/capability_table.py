"""Regenerate the README's capability table from the architecture matrix.

Runs every architecture of ``attnstore.testing.ARCHITECTURES`` (and the unseen custom attention
modules) under both ``--attention`` modes, exactly as ``tests/capture/test_architectures.py`` does, and
writes the table between the markers in README.md. ``--check`` only compares (exit 1 if stale).

    python scripts/capability_table.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnstore import testing

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args()
    table = testing.capability_table(testing.matrix_results())
    text = README.read_text(encoding="utf-8")
    try:
        start = text.index(testing.TABLE_BEGIN) + len(testing.TABLE_BEGIN)
        end = text.index(testing.TABLE_END)
    except ValueError:
        print(f"README.md lacks the markers {testing.TABLE_BEGIN} … {testing.TABLE_END}")
        return 1
    new = text[:start] + "\n" + table + "\n" + text[end:]
    if args.check:
        stale = new != text
        print("README capability table is stale" if stale else "README capability table is current")
        return int(stale)
    README.write_text(new, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
