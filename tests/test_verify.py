"""``attnstore verify`` finds every kind of damage, with its location, and nothing on a good store."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from attnstore.cli import cli
from attnstore.verify import verify_store


@pytest.fixture
def store(llama_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "s.attn"
    shutil.copytree(llama_store, copy)
    return copy


def records(path: Path) -> list[Path]:
    return sorted((path / "commits").glob("*.json"))


def segment_file(path: Path) -> Path:
    record = json.loads(records(path)[0].read_text())
    return next(
        path / rel for rel in record["files"] if rel.startswith("segments/") and "/c/" in rel
    )


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


def truncate_parquet(path: Path) -> str:
    record = json.loads(records(path)[1].read_text())
    f = path / record["tables"]["heads"]
    f.write_bytes(f.read_bytes()[:-100])
    return record["tables"]["heads"]


def edit_manifest(path: Path) -> str:
    f = path / "attnstore.json"
    manifest = json.loads(f.read_text())
    manifest["max_length"] = 4096
    f.write_text(json.dumps(manifest))
    return "attnstore.json"


def garble_record(path: Path) -> str:
    f = records(path)[-1]
    f.write_text("{not json")
    return f"commits/{f.name}"


def duplicate_commit(path: Path) -> str:
    f = records(path)[0]
    shutil.copy(f, f.with_name("ffffffff-000001.json"))
    return "commits/ffffffff-000001.json"


def bad_values_with_valid_checksum(path: Path) -> str:
    """Data that is wrong from the start (a bug, not bit rot): checksums match, rows do not sum."""
    import numpy as np
    import zarr

    record_path = records(path)[0]
    record = json.loads(record_path.read_text())
    arr = zarr.open_array(path / "segments" / record["segment"], mode="r+")
    data = np.asarray(arr[...])
    data[0, 0, :10] = 60000
    arr[...] = data
    for rel in record["files"]:
        f = path / rel
        record["files"][rel] = {
            "bytes": f.stat().st_size,
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
        }
    record_path.write_text(json.dumps(record))
    return f"segments/{record['segment']}"


CORRUPTIONS: dict[str, Callable[[Path], str]] = {
    "flipped byte": flip_byte,
    "deleted chunk": delete_chunk,
    "truncated parquet": truncate_parquet,
    "edited manifest": edit_manifest,
    "garbled commit record": garble_record,
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
        store / "segments" / json.loads(records(store)[0].read_text())["segment"],
        store / "segments" / "deadbeef-000001",
    )
    report = verify_store(store)
    assert report.ok
    assert {p.severity for p in report.problems} == {"warning"}
    assert any("deadbeef-000001" in p.location for p in report.problems)
    result = CliRunner().invoke(cli, ["verify", str(store), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["ok"] is True
