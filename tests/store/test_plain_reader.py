"""A reader that uses only zarr, deltalake, pyarrow and the written spec (schemas/README.md) decodes
a matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr
from deltalake import DeltaTable

import attnstore


def plain_matrix(root: Path, doc_id: int, layer: int, head: int) -> np.ndarray:
    manifest = json.loads((root / "attnstore.json").read_text())
    parts = DeltaTable(str(root / "tables" / "docs")).file_uris()
    row = next(r for f in parts for r in pq.read_table(f).to_pylist() if r["doc_id"] == doc_id)
    t = row["n_tokens"]
    li, hi = manifest["layers"].index(layer), manifest["heads"].index(head)
    arr = zarr.open_array(str(root / "segments" / row["segment"]), mode="r")
    codes = arr[li, hi, row["offset"] : row["offset"] + t * (t + 1) // 2]
    a = np.zeros((t, t), np.float32)
    a[np.tril_indices(t)] = codes.astype(np.float32) / manifest["codec"].get("scale", 1)
    return a


def test_plain_reader_agrees_with_attnstore(llama_store: Path) -> None:
    store = attnstore.open(str(llama_store))
    for doc_id, layer, head in ((0, 0, 0), (5, 2, 3), (11, 1, 1)):
        plain = plain_matrix(llama_store, doc_id, layer, head)
        np.testing.assert_allclose(plain, store.matrix(doc_id, layer, head), atol=1e-7)
        np.testing.assert_allclose(
            plain.sum(1), 1.0, atol=plain.shape[0] * store.codec.max_abs_error
        )
