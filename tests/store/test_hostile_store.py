"""A store is data from elsewhere: its metadata must never make attnstore read outside it (issue 20)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import attnstore
from attnstore import index
from attnstore.errors import DamagedStoreError, UnsafeStorePathError
from attnstore.verify import verify_store
from tests.synthetic import write_synthetic_store


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("hostile") / "s.attn", n_docs=2)


def _copy(clean: Path, tmp_path: Path) -> Path:
    out = tmp_path / "store" / "s.attn"
    shutil.copytree(clean, out)
    return out


def _log(store: Path, table: str) -> list[Path]:
    return sorted((store / "tables" / table / "_delta_log").glob("*.json"))


def _docs_add(store: Path) -> tuple[Path, dict]:
    for entry in reversed(_log(store, "docs")):
        for line in entry.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                return entry, action["add"]
    raise AssertionError("no add action")


def _append_add(store: Path, table: str, path: str) -> None:
    """A new Delta commit adding ``path`` (as the store's own part looks)."""
    _, add = _docs_add(store) if table == "docs" else (None, None)
    assert add is not None
    n = int(_log(store, table)[-1].stem) + 1
    entry = {**add, "path": path}
    log = store / "tables" / table / "_delta_log" / f"{n:020d}.json"
    log.write_text(json.dumps({"add": entry}) + "\n")


def _outside_part(tmp_path: Path, store: Path) -> Path:
    """A Parquet file outside the store: the store's own docs part with a marker text."""
    _, add = _docs_add(store)
    table = pq.read_table(store / "tables" / "docs" / add["path"])
    i = table.schema.get_field_index("text")
    table = table.set_column(i, "text", pa.array(["SECRET"] * table.num_rows, table.field(i).type))
    outside = tmp_path / "outside.parquet"
    index.write_part(table, outside)
    return outside


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "attnstore", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "url", "encoded"])
def test_delta_add_path_leaving_the_store_is_refused(
    clean: Path, tmp_path: Path, kind: str
) -> None:
    store = _copy(clean, tmp_path)
    outside = _outside_part(tmp_path, store)
    rel = os.path.relpath(outside, store / "tables" / "docs")
    path = {
        "dotdot": rel,
        "absolute": str(outside),
        "url": outside.as_uri(),
        "encoded": rel.replace("..", "%2E%2E"),
    }[kind]
    _append_add(store, "docs", path)
    with pytest.raises(UnsafeStorePathError, match=r"tables/docs/_delta_log: add path .* leaves"):
        attnstore.open(str(store))
    report = verify_store(store)
    assert not report.ok
    assert any("leaves the store" in p.message for p in report.problems), report.problems
    # the query command and the viewer refuse with one line, never reading the outside file
    done = _cli("query", str(store), "SELECT text FROM docs")
    assert done.returncode == 1
    assert "SECRET" not in done.stdout
    assert "leaves the store" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    from attnstore.serve import Viewer

    with pytest.raises(UnsafeStorePathError):
        Viewer([store])


def test_segment_leaving_the_store_is_refused(clean: Path, tmp_path: Path) -> None:
    store = _copy(clean, tmp_path)
    entry, add = _docs_add(store)
    part = store / "tables" / "docs" / add["path"]
    docs = pq.read_table(part)
    segment = docs["segment"][0].as_py()
    # a Zarr array outside the store, and a docs row pointing at it with '../'
    shutil.copytree(store / "segments" / segment, tmp_path / "elsewhere")
    evil = os.path.relpath(tmp_path / "elsewhere", store / "segments")
    i = docs.schema.get_field_index("segment")
    docs = docs.set_column(i, "segment", pa.array([evil] * docs.num_rows, docs.field(i).type))
    index.write_part(docs, part)
    size = part.stat().st_size
    entry.write_text(
        "\n".join(
            json.dumps({"add": {**a["add"], "size": size}} if "add" in a else a)
            for a in map(json.loads, entry.read_text().splitlines())
        )
        + "\n"
    )
    shutil.rmtree(store / "segments" / segment)
    s = attnstore.open(str(store))
    with pytest.raises(UnsafeStorePathError, match=r"tables/docs: segment .* leaves the store"):
        s.matrix(0, 0, 0)
    with pytest.raises(UnsafeStorePathError, match=r"tables/docs: segment .* leaves the store"):
        s.info()  # its sizes too
    report = verify_store(store)
    assert any("leaves the store" in p.message for p in report.problems), report.problems
    assert not report.ok


def test_segment_symlink_out_of_the_store_is_refused(clean: Path, tmp_path: Path) -> None:
    store = _copy(clean, tmp_path)
    _, add = _docs_add(store)
    segment = pq.read_table(store / "tables" / "docs" / add["path"])["segment"][0].as_py()
    target = store / "segments" / segment
    shutil.move(target, tmp_path / "moved")
    target.symlink_to(tmp_path / "moved")
    with pytest.raises(UnsafeStorePathError, match="resolves outside the store"):
        attnstore.open(str(store)).matrix(0, 0, 0)


def test_intent_add_path_leaving_the_store_is_never_committed(clean: Path, tmp_path: Path) -> None:
    from attnstore.storage import open_storage
    from attnstore.store import roll_forward_all

    store = _copy(clean, tmp_path)
    writers = store / "writers"
    state = json.loads((writers / "shard-0-of-1.json").read_text())
    state["pending"] = {
        "version": state["version"] + 1,
        "doc_ids": [9],
        "tables": {"docs": [{"path": "../../x.parquet", "size": 1, "modification_time": 0}]},
        "record": {},
    }
    (writers / "shard-0-of-1.json").write_text(json.dumps(state))
    before = len(_log(store, "docs"))
    with pytest.raises(UnsafeStorePathError, match=r"writers/shard-0-of-1.json"):
        roll_forward_all(open_storage(store))
    assert len(_log(store, "docs")) == before


def test_corrupt_zarr_json_is_one_line_naming_the_file(clean: Path, tmp_path: Path) -> None:
    store = _copy(clean, tmp_path)
    _, add = _docs_add(store)
    segment = pq.read_table(store / "tables" / "docs" / add["path"])["segment"][0].as_py()
    (store / "segments" / segment / "zarr.json").write_text('{"zarr_format": 3, "node_type": 7}')
    with pytest.raises(DamagedStoreError, match=rf"segments/{segment}/zarr.json: not a readable"):
        attnstore.open(str(store)).matrix(0, 0, 0)


def _plant_bomb(store: Path, declared_mb: int) -> str:
    """Replace the first chunk of a segment's shard by a Blosc frame of ``declared_mb`` MB of zeros."""
    import google_crc32c
    import numcodecs
    import numpy as np

    _, add = _docs_add(store)
    segment = pq.read_table(store / "tables" / "docs" / add["path"])["segment"][0].as_py()
    shard = store / "segments" / segment / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    meta = json.loads((store / "segments" / segment / "zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
    n = int(np.prod([-(-s // c) for s, c in zip(outer, sharding["chunk_shape"], strict=True)]))
    index_bytes = data[-(16 * n + 4) : -4]
    table = np.frombuffer(index_bytes, "<u8").reshape(n, 2).copy()
    chunks = [data[o : o + b] for o, b in table.tolist()]
    frame = numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE).encode(
        np.zeros(declared_mb << 19, np.uint16)
    )
    chunks[0] = frame + np.array([google_crc32c.value(frame)], "<u4").tobytes()
    body, offset = b"", 0
    for i, c in enumerate(chunks):
        table[i] = (offset, len(c))
        body += c
        offset += len(c)
    index_out = table.astype("<u8").tobytes()
    crc = np.array([google_crc32c.value(index_out)], "<u4").tobytes()
    shard.write_bytes(body + index_out + crc)
    return segment


def test_decompression_bomb_is_refused_before_decoding(clean: Path, tmp_path: Path) -> None:
    store = _copy(clean, tmp_path)
    segment = _plant_bomb(store, 64)
    with pytest.raises(DamagedStoreError, match=r"declares 67,108,864 decoded bytes"):
        attnstore.open(str(store)).matrix(0, 0, 0)
    report = verify_store(store)
    assert any(
        p.location == f"segments/{segment}/c/0/0/0" and "declares 67,108,864" in p.message
        for p in report.problems
    ), report.problems


def _silent_flip(part: Path) -> int:
    """The offset of a bit whose flip a reader without checksums takes as other values."""
    original = pq.read_table(part)
    data = bytearray(part.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    for offset in range(4, len(data) - footer - 8):
        data[offset] ^= 0x01
        part.write_bytes(data)
        try:
            got = pq.read_table(part, page_checksum_verification=False)
            silent = not got.equals(original)
        except Exception:  # noqa: BLE001 - a flip the format itself notices: try the next
            silent = False
        data[offset] ^= 0x01
        if silent:
            data[offset] ^= 0x01
            part.write_bytes(data)
            return offset
    raise AssertionError("no silent bit flip found")


def test_flipped_bit_in_a_parquet_page_fails_the_read(clean: Path, tmp_path: Path) -> None:
    from attnstore.errors import QueryError

    store = _copy(clean, tmp_path)
    part = next((store / "tables" / "heads").rglob("*.parquet"))
    _silent_flip(part)
    s = attnstore.open(str(store))
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        s.table("heads")
    with pytest.raises(QueryError, match="CRC checksum"):
        s.sql("SELECT * FROM heads")
    report = verify_store(store)
    assert any("CRC" in p.message for p in report.problems), report.problems


def test_missing_delta_log_entry_is_one_line(clean: Path, tmp_path: Path) -> None:
    store = _copy(clean, tmp_path)
    logs = _log(store, "docs")
    (logs[-1].parent / f"{int(logs[-1].stem) + 1:020d}.json").write_text(logs[-1].read_text())
    logs[-1].unlink()
    with pytest.raises(DamagedStoreError, match=r"tables/docs/_delta_log: a log entry is missing"):
        attnstore.open(str(store))
    done = _cli("info", str(store))
    assert done.returncode == 1
    assert "tables/docs/_delta_log: a log entry is missing between" in done.stderr
    assert "ParsedLogPath" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_add_path_naming_a_non_parquet_file_is_one_line(clean: Path, tmp_path: Path) -> None:
    store = _copy(clean, tmp_path)
    (store / "tables" / "docs" / "notes.parquet").write_text("not a Parquet file " * 10)
    _append_add(store, "docs", "notes.parquet")
    for args in (("info", str(store)), ("query", str(store), "SELECT count(*) FROM docs")):
        done = _cli(*args)
        assert done.returncode == 1
        assert "tables/docs/notes.parquet: not a readable Parquet file" in done.stderr, done.stderr
        assert "internal error" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_manifest_with_wrong_types_is_one_line(clean: Path, tmp_path: Path) -> None:
    store = _copy(clean, tmp_path)
    manifest = json.loads((store / "attnstore.json").read_text())
    (store / "attnstore.json").write_text(json.dumps({**manifest, "heads": "abc"}))
    with pytest.raises(DamagedStoreError, match=r"attnstore.json: 'heads' must be a list of int"):
        attnstore.open(str(store))
    done = _cli("info", str(store))
    assert done.returncode == 1
    assert "'heads' must be a list of integers. Got 'abc'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_reversed_layer_range_is_named(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\n")
    done = _cli("extract", "--out", str(tmp_path / "s.attn"), "-c", str(corpus), "--layers", "2-0")
    assert done.returncode == 2
    assert "low ≤ high" in done.stderr
    assert "'2-0'" in done.stderr
    assert not (tmp_path / "s.attn").exists()


@pytest.mark.parametrize(
    ("file", "name"),
    [("evil.json", "../../outside"), ("heads.json", "heads"), ("x.json", "y"), ("z.json", None)],
)
def test_analysis_table_registration_cannot_name_a_path_or_a_builtin(
    clean: Path, tmp_path: Path, file: str, name: str | None
) -> None:
    """``analyses/<table>.json`` is store metadata: its name becomes a folder and a SQL view."""
    store = _copy(clean, tmp_path)
    (store / "analyses").mkdir(exist_ok=True)
    doc = {"table": name, "analysis": "x", "sorted_by": ["doc_id"],
           "columns": [{"name": "doc_id", "type": "int64", "nullable": False}]}  # fmt: skip
    (store / "analyses" / file).write_text("{" if name is None else json.dumps(doc))
    with pytest.raises(DamagedStoreError, match=r"analyses/"):
        attnstore.open(str(store))
