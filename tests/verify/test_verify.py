"""``attnstore verify`` finds every kind of damage, with its location, and nothing on a good store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from deltalake import DeltaTable
from hypothesis import given, settings
from hypothesis import strategies as st

from attnstore.cli import cli
from attnstore.errors import StoreNotFoundError
from attnstore.verify import verify_store
from tests.helpers import GOLDEN


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
    shutil.copytree(GOLDEN / "v1.1.attn", copy)
    assert verify_store(copy).ok
    f = next((copy / "commits").glob("*.json"))
    f.write_text("{not json")
    report = verify_store(copy)
    assert not report.ok
    assert any(p.location == f"commits/{f.name}" for p in report.problems)


# -- overviews (--overview N, format 2.1) -------------------------------------------------------
OVERVIEW_STORES = {
    "matrices": {"overview": 5},
    "rows": {"overview": 5, "rows": "0:8,-6:"},
    "scores only": {"overview": 5, "scores_only": True},
}


@pytest.fixture(scope="module")
def overview_stores(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> dict[str, Path]:
    """Stores with 5 × 5 overviews of documents of different lengths (blocks of 1 … 20 tokens)."""
    import attnstore

    root = tmp_path_factory.mktemp("overview-stores")
    out = {}
    for name, kwargs in OVERVIEW_STORES.items():
        out[name] = root / f"{name.replace(' ', '-')}.attn"
        attnstore.extract(
            str(out[name]), model=str(llama_dir), corpus="pydoc:topics", limit=5, max_length=96,
            batch_size=3, progress=False, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
    return out


@pytest.fixture
def overview_store(overview_stores: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "o.attn"
    shutil.copytree(overview_stores["matrices"], copy)
    return copy


def overview_array(path: Path) -> str:
    """The store-relative name of the (one) overview array of a store."""
    (name,) = {str(p.parent.relative_to(path)) for p in (path / "overviews").rglob("zarr.json")}
    return name


def edit_overviews(path: Path, change: Callable[[Any], None]) -> str:
    """Rewrite the overview array's values through zarr: its checksums stay valid."""
    import numpy as np
    import zarr

    name = overview_array(path)
    arr = zarr.open_array(path / name, mode="r+")
    data = np.asarray(arr[...])
    change(data)
    arr[...] = data
    return name


def delete_overview_shard(path: Path) -> str:
    f = path / overview_array(path) / "c" / "0" / "0" / "0" / "0"
    f.unlink()
    return str(f.relative_to(path))


def swap_overview_heads(path: Path) -> str:
    """Sound pictures of the wrong head: only the comparison with the stored matrices sees it."""
    return edit_overviews(path, lambda d: d.__setitem__((0, slice(0, 2)), d[0, [1, 0]].copy()))


def nan_in_overview(path: Path) -> str:
    return edit_overviews(path, lambda d: d.__setitem__((1, 2, 0, 3), float("nan")))


def overview_max_above_one(path: Path) -> str:
    return edit_overviews(path, lambda d: d.__setitem__((0, 0, 0, 0), 1.5))


def mean_row_not_summing(path: Path) -> str:
    """Row 0 of the first document's mean picture (its first 5 cells) set to zero."""
    return edit_overviews(path, lambda d: d.__setitem__((2, 1, 1, slice(0, 5)), 0.0))


def delete_overview_row(path: Path) -> str:
    DeltaTable(str(path / "tables" / "overviews")).delete("doc_id = 1")
    return "tables/overviews"


def wrong_overview_grid(path: Path) -> str:
    DeltaTable(str(path / "tables" / "overviews")).update({"block": "7"}, predicate="doc_id = 2")
    return "tables/overviews"


OVERVIEW_DAMAGE: dict[str, Callable[[Path], str]] = {
    "deleted overview shard": delete_overview_shard,
    "overview of another head": swap_overview_heads,
    "non-finite overview": nan_in_overview,
    "overview max above 1": overview_max_above_one,
    "mean overview row not summing to 1": mean_row_not_summing,
    "document without its overview row": delete_overview_row,
    "overview row with the wrong grid": wrong_overview_grid,
}


@pytest.mark.parametrize("name", sorted(OVERVIEW_STORES))
def test_stores_with_overviews_are_clean(overview_stores: dict[str, Path], name: str) -> None:
    for quick in (False, True):
        report = verify_store(overview_stores[name], quick=quick)
        assert report.ok, report.problems
        assert report.problems == []
        assert report.overviews_checked == (0 if quick else 5 * 3 * 4)


@pytest.mark.parametrize("name", sorted(OVERVIEW_DAMAGE))
def test_each_overview_damage_is_found(overview_store: Path, name: str) -> None:
    location = OVERVIEW_DAMAGE[name](overview_store)
    report = verify_store(overview_store)
    errors = [p for p in report.problems if p.severity == "error"]
    assert errors, report.problems
    assert all(p.location.startswith(location) for p in errors), errors
    result = CliRunner().invoke(cli, ["verify", str(overview_store)])
    assert result.exit_code == 1
    assert "DAMAGED" in result.output


def test_quick_verify_checks_where_overviews_are(overview_store: Path) -> None:
    nan_in_overview(overview_store)
    assert verify_store(overview_store, quick=True).ok  # values are not read
    location = delete_overview_shard(overview_store)
    report = verify_store(overview_store, quick=True)
    assert [p.location for p in report.problems if p.severity == "error"] == [location]


def test_overviews_without_the_manifest_setting(
    overview_stores: dict[str, Path], tmp_path: Path
) -> None:
    """Overview rows in a store whose manifest records no --overview; a stray array: a warning."""
    store = tmp_path / "o.attn"
    shutil.copytree(overview_stores["scores only"], store)
    f = store / "attnstore.json"
    f.write_text(
        json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "overview"})
    )
    report = verify_store(store)
    assert any(
        p.location == "tables/overviews" and "records no --overview" in p.message
        for p in report.problems
    ), report.problems
    stray = tmp_path / "p.attn"
    shutil.copytree(overview_stores["matrices"], stray)
    shutil.copytree(stray / overview_array(stray), stray / "overviews" / "deadbeef" / "0")
    report = verify_store(stray)
    assert report.ok
    assert any(p.location.startswith("overviews/deadbeef/0/") for p in report.problems)


def test_scores_only_overviews_are_not_compared(
    overview_stores: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "s.attn"
    shutil.copytree(overview_stores["scores only"], store)
    swap_overview_heads(store)  # sound pictures; nothing stored to pool them from
    assert verify_store(store).ok


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    size=st.integers(1, 12),
    spec=st.sampled_from([None, "0:3,-5:", "::3", "-1:", "7"]),
    full=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pooling_packed_rows_equals_pooling_the_matrix(
    n: int, size: int, spec: str | None, full: bool, seed: int
) -> None:
    """What verify compares with: the pooling of stored rows, for the rows of cells they cover."""
    import numpy as np

    from attnstore.overview import pool_matrix, pool_packed
    from attnstore.rows import DocRows, RowSelection

    rng = np.random.default_rng(seed)
    a = rng.random((2, 3, n, n)).astype(np.float32)
    if not full:
        a = np.tril(a)
    a /= a.sum(-1, keepdims=True)
    rows = np.arange(n) if full else DocRows.of(RowSelection.parse(spec), n).rows
    widths = np.full(len(rows), n) if full else rows + 1
    starts = np.concatenate([[0], np.cumsum(widths)])[:-1]
    packed = np.zeros((2, 3, int(widths.sum())), dtype=np.float32)
    for r, s, w in zip(rows, starts, widths, strict=True):
        packed[..., s : s + w] = a[..., r, :w]
    mx, mean, complete = pool_packed(packed, rows, starts, widths, size, n)
    want_max, want_mean = pool_matrix(a, size)
    assert complete.all() == (len(rows) == n)
    np.testing.assert_allclose(mx[..., complete, :], want_max[..., complete, :], atol=1e-7)
    np.testing.assert_allclose(mean[..., complete, :], want_mean[..., complete, :], atol=1e-6)
