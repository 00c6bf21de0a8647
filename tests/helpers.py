"""Helpers shared by the store tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

import attnstore

#: The tests folder, its committed golden stores (tests/golden) and the repository root.
TESTS: Final = Path(__file__).resolve().parent
GOLDEN: Final = TESTS / "golden"
ROOT: Final = TESTS.parent


def store_content(path: Path) -> dict[str, Any]:
    """Everything a user can read from a store, independent of how batches were committed."""
    store = attnstore.open(str(path))
    docs = store.sql('SELECT * EXCLUDE (segment, "offset") FROM docs ORDER BY doc_id').to_pylist()
    tokens = store.sql("SELECT * FROM tokens ORDER BY doc_id, pos").to_pylist()
    heads = store.sql("SELECT * FROM heads ORDER BY doc_id, layer, head").to_pylist()
    matrices = {d["doc_id"]: store.matrices(d["doc_id"]) for d in docs if d["skipped"] is None}
    return {"docs": docs, "tokens": tokens, "heads": heads, "matrices": matrices}


def assert_same_content(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["docs"] == b["docs"]
    assert a["tokens"] == b["tokens"]
    assert a["heads"] == b["heads"]
    assert a["matrices"].keys() == b["matrices"].keys()
    for k in a["matrices"]:
        np.testing.assert_array_equal(a["matrices"][k], b["matrices"][k])


def extract_command(out: Path, model: Path, corpus: Path, *extra: str) -> list[str]:
    """``attnstore extract`` as a subprocess command line (for kill and many-writer tests)."""
    import sys

    return [sys.executable, "-m", "attnstore", "extract", "--out", str(out), "-m", str(model),
            "-c", str(corpus), "-q", *extra]  # fmt: skip
