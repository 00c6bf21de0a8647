"""Exports read back with h5py / numpy alone (no attnstore reader) and equal the store."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import attnstore
from attnstore.cli import cli


def square(packed: np.ndarray, n: int) -> np.ndarray:
    a = np.zeros((n, n), np.float32)
    a[np.tril_indices(n)] = packed
    return a


def test_hdf5_reads_with_h5py_alone(llama_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel.h5"
    result = CliRunner().invoke(
        cli,
        ["export", str(llama_store), "--where", "layer = 2 AND head < 2", "-o", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["items"] == 12 * 2
    store = attnstore.open(str(llama_store))
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "attnstore-export"
        assert f["packed"].compression == "gzip"
        assert f["packed"].chunks is not None
        idx = {k: f["index"][k][()] for k in f["index"]}
        for i in range(len(idx["doc_id"])):
            n, off, toff = (
                int(idx["n_tokens"][i]),
                int(idx["offset"][i]),
                int(idx["token_offset"][i]),
            )
            a = square(f["packed"][off : off + n * (n + 1) // 2], n)
            np.testing.assert_array_equal(
                a, store.matrix(int(idx["doc_id"][i]), int(idx["layer"][i]), int(idx["head"][i]))
            )
            assert (
                f["token_ids"][toff : toff + n].tolist()
                == store.token_ids(int(idx["doc_id"][i])).tolist()
            )
        heads = store.sql(
            "SELECT induction FROM heads WHERE layer = 2 AND head < 2 ORDER BY doc_id, layer, head"
        )
        np.testing.assert_array_equal(
            np.nan_to_num(idx["induction"], nan=-1),
            np.nan_to_num(heads.column(0).to_numpy(zero_copy_only=False).astype(float), nan=-1),
        )


def test_npz_reads_with_numpy_alone(llama_store: Path, tmp_path: Path) -> None:
    from attnstore.export import export

    out = tmp_path / "sel.npz"
    export(llama_store, out, where="doc_id = 3")
    store = attnstore.open(str(llama_store))
    with np.load(out) as z:
        meta = json.loads(str(z["meta"]))
        assert meta["max_abs_error"] == store.codec.max_abs_error
        assert len(z["index/doc_id"]) == 3 * 4
        i = 7
        n, off = int(z["index/n_tokens"][i]), int(z["index/offset"][i])
        a = square(z["packed"][off : off + n * (n + 1) // 2], n)
        np.testing.assert_array_equal(
            a, store.matrix(3, int(z["index/layer"][i]), int(z["index/head"][i]))
        )


def test_empty_selection_and_bad_format(llama_store: Path, tmp_path: Path) -> None:
    from attnstore.export import export

    with pytest.raises(attnstore.AttnStoreError, match="matches no heads"):
        export(llama_store, tmp_path / "x.h5", where="layer = 99")
    with pytest.raises(attnstore.AttnStoreError, match="hdf5 or npz"):
        export(llama_store, tmp_path / "x.csv")
    assert not list(tmp_path.iterdir())
