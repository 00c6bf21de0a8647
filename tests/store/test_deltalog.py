"""The plain Delta log reader (attnstore.store.deltalog) agrees with delta-rs, or steps aside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

import attnstore
from attnstore.compact import compact
from attnstore.storage import open_storage
from attnstore.store.delta import open_table, table_log
from attnstore.store.deltalog import LogNotUnderstood, read_log
from tests.helpers import GOLDEN
from tests.synthetic import write_synthetic_store


def _append(path: Path, ids: list[int], app: str | None = None, version: int = 0) -> None:
    props = CommitProperties(app_transactions=[Transaction(app, version)]) if app else None
    table = pa.table({"doc_id": pa.array(ids, pa.int64()), "x": pa.array([1.0] * len(ids))})
    write_deltalake(str(path), table, mode="append", commit_properties=props)


def _same(root: Path, name: str, apps: list[str]) -> None:
    storage = open_storage(root)
    dt = open_table(storage, name)
    assert dt is not None
    assert read_log(storage, name) == table_log(dt, apps)


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_golden_logs_read_as_delta_rs_reads_them(version: str) -> None:
    storage = open_storage(GOLDEN / f"{version}.attn")
    apps = [n.removesuffix(".json") for n in storage.list("writers") if n.endswith(".json")]
    for name in attnstore.open(str(GOLDEN / f"{version}.attn")).schemas:
        dt = open_table(storage, name)
        assert read_log(storage, name) == (None if dt is None else table_log(dt, apps)), name


def test_commits_checkpoints_and_removes_replay_like_delta_rs(tmp_path: Path) -> None:
    table = tmp_path / "tables" / "docs"
    for i in range(4):  # commits, newest first; one app's transactions overwritten
        _append(table, [2 * i, 2 * i + 1], "shard-0-of-1", i + 1)
    _same(tmp_path, "docs", ["shard-0-of-1", "other"])
    DeltaTable(str(table)).create_checkpoint()
    _append(table, [8], "other", 7)
    _same(tmp_path, "docs", ["shard-0-of-1", "other"])
    DeltaTable(str(table)).optimize.compact()  # removes every part, adds one
    _append(table, [9])
    _same(tmp_path, "docs", ["shard-0-of-1", "other"])
    dt = DeltaTable(str(table))
    dt.create_checkpoint()
    for entry in (table / "_delta_log").glob("*.json"):  # expired: the checkpoint stands in
        if int(entry.name.split(".")[0]) < dt.version():
            entry.unlink()
    _append(table, [10], "shard-0-of-1", 9)
    _same(tmp_path, "docs", ["shard-0-of-1", "other"])
    log = read_log(open_storage(tmp_path), "docs")
    assert log is not None
    assert log.txn_version("shard-0-of-1") == 9
    assert log.txn_version("other") == 7
    assert log.txn_version("nobody") == 0


def test_a_compacted_store_opens_without_delta_rs_and_reads_the_same(tmp_path: Path) -> None:
    out = write_synthetic_store(tmp_path / "s.attn", n_docs=3)
    before = attnstore.open(str(out))
    expected = before.matrices(1), before.table("heads").to_pylist()
    compact(out)
    assert list((out / "tables" / "docs" / "_delta_log").glob("*.checkpoint.parquet"))
    after = attnstore.open(str(out))
    np.testing.assert_array_equal(after.matrices(1), expected[0])
    assert after.table("heads").to_pylist() == expected[1]


def _log_dir(tmp_path: Path) -> Path:
    table = tmp_path / "tables" / "docs"
    _append(table, [0, 1])
    _append(table, [2])
    return table / "_delta_log"


def test_a_gap_is_left_to_delta_rs(tmp_path: Path) -> None:
    log = _log_dir(tmp_path)
    _append(tmp_path / "tables" / "docs", [3])
    (log / f"{1:020d}.json").unlink()
    with pytest.raises(LogNotUnderstood, match="gap"):
        read_log(open_storage(tmp_path), "docs")


@pytest.mark.parametrize(
    "action",
    [
        {"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["x"]}},
        {"add": {"path": "p.parquet", "partitionValues": {}, "size": 1, "modificationTime": 1,
                 "dataChange": True, "deletionVector": {"storageType": "u"}}},
        {"somethingNew": {}},
        "not an action",
    ],
    ids=["reader-protocol-3", "deletion-vector", "unknown-action", "not-an-object"],
)  # fmt: skip
def test_what_it_does_not_implement_is_left_to_delta_rs(tmp_path: Path, action: object) -> None:
    log = _log_dir(tmp_path)
    (log / f"{2:020d}.json").write_text(json.dumps(action) + "\n")
    with pytest.raises(LogNotUnderstood):
        read_log(open_storage(tmp_path), "docs")


def test_a_v2_checkpoint_is_left_to_delta_rs(tmp_path: Path) -> None:
    log = _log_dir(tmp_path)
    (log / f"{1:020d}.checkpoint.80a083e8-7026-4e79-81be-64bd76c43a11.json").write_text("{}")
    with pytest.raises(LogNotUnderstood, match="not a classic checkpoint"):
        read_log(open_storage(tmp_path), "docs")


def test_a_store_whose_log_it_leaves_to_delta_rs_reads_the_same(tmp_path: Path) -> None:
    out = write_synthetic_store(tmp_path / "s.attn", n_docs=2)
    expected = attnstore.open(str(out)).matrix(1, 0, 3)
    log = out / "tables" / "docs" / "_delta_log"
    n = max(int(p.stem) for p in log.glob("*.json")) + 1
    upgrade = {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["timestampNtz"],
               "writerFeatures": ["timestampNtz"]}  # fmt: skip
    (log / f"{n:020d}.json").write_text(json.dumps({"protocol": upgrade}) + "\n")
    code = (
        "import sys, attnstore\n"
        f"store = attnstore.open({str(out)!r})\n"
        "sys.stdout.buffer.write(store.matrix(1, 0, 3).tobytes())\n"
        "sys.stderr.write(str('deltalake' in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stderr.decode().endswith("True")  # delta-rs read the docs table
    got = np.frombuffer(done.stdout, dtype=np.float32).reshape(expected.shape)
    np.testing.assert_array_equal(got, expected)
