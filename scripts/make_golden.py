"""Regenerate tests/golden/ — only on purpose, when the format version changes.

The golden store is what format 1.0 looked like when it was written; tests check that today's code
still reads it exactly. Run: python scripts/make_golden.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

import attnstore
from attnstore.testing import save_tiny_llama

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_llama(Path(tmp) / "model", num_hidden_layers=2, vocab_size=300)
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("The cat sat on the mat.\n\nthe cat, the cat again: the cat\n")
        shutil.rmtree(GOLDEN, ignore_errors=True)
        GOLDEN.mkdir(parents=True)
        store_path = GOLDEN / "v1.0.attn"
        attnstore.extract(str(store_path), model=str(model), corpus=str(corpus), progress=False)
    store = attnstore.open(str(store_path))
    heads = store.sql("SELECT * FROM heads ORDER BY doc_id, layer, head")
    expected = {f"matrix_{d}": store.matrices(d) for d in (0, 2)}
    expected.update(
        {f"heads_{c}": heads[c].to_numpy(zero_copy_only=False) for c in heads.column_names}
    )
    np.savez_compressed(GOLDEN / "v1.0.expected.npz", **expected)
    print(f"wrote {store_path} and its expected values")


if __name__ == "__main__":
    main()
