"""``attnstore verify`` finds every kind of damage, with its location, and nothing on a good store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from deltalake import DeltaTable

from attnstore.cli import cli
from attnstore.errors import StoreNotFoundError
from attnstore.verify import verify_store


@pytest.fixture
def store(llama_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "s.attn"
    shutil.copytree(llama_store, copy)
    return copy


def segments(path: Path) -> list[str]:
    """The segments the docs table points at, in doc_id order."""
    docs = pq.read_table(DeltaTable(str(path / "tables" / "docs")).file_uris()[0])
    names = [s for s in docs.sort_by("doc_id")["segment"].to_pylist() if s is not None]
    return list(dict.fromkeys(names))


def segment_file(path: Path) -> Path:
    return path / "segments" / segments(path)[0] / "c" / "0" / "0" / "0"


def flip_byte(path: Path) -> str:
    f = segment_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return str(f.relative_to(path))


def delete_chunk(path: Path) -> str:
    f = segment_file(path)
    f.unlink()
    return str(f.relative_to(path))


def part(path: Path, table: str) -> Path:
    return Path(DeltaTable(str(path / "tables" / table)).file_uris()[0].removeprefix("file://"))


def truncate_parquet(path: Path) -> str:
    f = part(path, "heads")
    f.write_bytes(f.read_bytes()[:-100])
    return str(f.relative_to(path))


def flip_parquet_byte(path: Path) -> str:
    """Same size, one byte different: the Parquet page checksums catch it."""
    f = part(path, "tokens")
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    return str(f.relative_to(path))


def delete_part(path: Path) -> str:
    f = part(path, "docs")
    f.unlink()
    return str(f.relative_to(path))


def edit_manifest(path: Path) -> str:
    f = path / "attnstore.json"
    manifest = json.loads(f.read_text())
    manifest["max_length"] = 4096
    f.write_text(json.dumps(manifest))
    return "attnstore.json"


def garble_log(path: Path) -> str:
    log = path / "tables" / "heads" / "_delta_log"
    f = max(log.glob("*.json"))
    f.write_text("{not json")
    return "tables/heads/_delta_log"


def garble_writer_file(path: Path) -> str:
    f = path / "writers" / "shard-0-of-1.json"
    f.write_text("{not json")
    return "writers/shard-0-of-1.json"


def duplicate_commit(path: Path) -> str:
    """The docs part added a second time under another name, as a buggy writer would."""
    from deltalake.transaction import AddAction

    dt = DeltaTable(str(path / "tables" / "docs"))
    src = part(path, "docs")
    shutil.copy(src, src.with_name("copy.parquet"))
    rel = str(src.with_name("copy.parquet").relative_to(path / "tables" / "docs"))
    size = src.stat().st_size
    dt.create_write_transaction(
        [AddAction(rel, size, {}, 0, True, json.dumps({"numRecords": 1}))],
        mode="append", schema=dt.schema(),
    )  # fmt: skip
    return "tables/docs"


def bad_values_with_valid_checksum(path: Path) -> str:
    """Data that is wrong from the start (a bug, not bit rot): checksums match, rows do not sum."""
    import numpy as np
    import zarr

    name = segments(path)[0]
    arr = zarr.open_array(path / "segments" / name, mode="r+")
    data = np.asarray(arr[...])
    data[0, 0, :10] = 60000
    arr[...] = data
    return f"segments/{name}"


CORRUPTIONS: dict[str, Callable[[Path], str]] = {
    "flipped byte": flip_byte,
    "deleted chunk": delete_chunk,
    "truncated parquet": truncate_parquet,
    "flipped parquet byte": flip_parquet_byte,
    "deleted table part": delete_part,
    "edited manifest": edit_manifest,
    "garbled delta log": garble_log,
    "garbled writer file": garble_writer_file,
    "doc committed twice": duplicate_commit,
    "rows not summing to one": bad_values_with_valid_checksum,
}


def test_good_store_is_clean(store: Path) -> None:
    report = verify_store(store)
    assert report.ok, report.problems
    assert report.problems == []
    assert report.matrices_checked == 12 * 3 * 4


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_found(store: Path, name: str) -> None:
    location = CORRUPTIONS[name](store)
    report = verify_store(store)
    assert not report.ok
    errors = [p for p in report.problems if p.severity == "error"]
    assert any(p.location.startswith(location) or location in p.message for p in errors), errors
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1
    assert "DAMAGED" in result.output


def test_leftovers_are_warnings_not_errors(store: Path) -> None:
    (store / "tables" / "heads" / ".x.parquet.tmp-123").write_bytes(b"partial")
    shutil.copytree(
        store / "segments" / segments(store)[0], store / "segments" / "deadbeef" / "00000" / "0"
    )
    report = verify_store(store)
    assert report.ok
    assert {p.severity for p in report.problems} == {"warning"}
    assert any("deadbeef" in p.location for p in report.problems)
    result = CliRunner().invoke(cli, ["verify", str(store), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["ok"] is True


def test_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StoreNotFoundError, match="not an attnstore store"):
        verify_store(tmp_path)
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "not an attnstore store" in result.output
    assert "DAMAGED" not in result.output


def test_format_1_store_verifies(tmp_path: Path) -> None:
    copy = tmp_path / "old.attn"
    shutil.copytree(Path(__file__).parent / "golden" / "v1.1.attn", copy)
    assert verify_store(copy).ok
    f = next((copy / "commits").glob("*.json"))
    f.write_text("{not json")
    report = verify_store(copy)
    assert not report.ok
    assert any(p.location == f"commits/{f.name}" for p in report.problems)
