"""Format 2 at scale: commit cadence, roll-forward of interrupted flushes, readers that never see
half a flush, compaction (also while a writer appends), and point reads that touch one file."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnstore
from attnstore.cli import cli
from attnstore.codecs import get_codec
from attnstore.compact import compact
from attnstore.errors import StoreWriteError
from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING, Manifest
from attnstore.packing import pack_tril
from attnstore.scores import SCORE_COLUMNS
from attnstore.store import Segment, StoreWriter, faults, transactions
from attnstore.verify import verify_store
from tests.helpers import GOLDEN

L, H = 2, 3
CODEC = get_codec("default")


def manifest() -> Manifest:
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "tests",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model": {"id": "synthetic", "revision": None, "architecture": "none", "n_layers": L,
                  "n_heads": H, "n_kv_heads": H, "dtype": "float32"},
        "tokenizer": {"id": "synthetic", "vocab_size": 50, "bos_token_id": None, "adds_bos": False},
        "codec": CODEC.get_config(), "packing": PACKING, "max_length": 64, "layers": list(range(L)),
        "heads": list(range(H)), "settings": {},
    }  # fmt: skip


def attention(doc_id: int, t: int) -> np.ndarray:
    """[L, H, T, T] rows that sum to one, different for every document."""
    rng = np.random.default_rng(doc_id)
    a = np.tril(rng.random((L, H, t, t)).astype(np.float32) + 0.01)
    return a / a.sum(-1, keepdims=True)


def batch(doc_ids: list[int], skipped: frozenset[int] = frozenset()) -> Segment:
    stored = [d for d in doc_ids if d not in skipped]
    lengths = {d: 3 + d % 7 for d in doc_ids}
    n = [lengths[d] if d in stored else 0 for d in doc_ids]
    return Segment(
        docs={"doc_id": doc_ids, "n_tokens": n, "n_tokens_input": n,
              "truncated": [False] * len(doc_ids),
              "skipped": [None if d in stored else "empty" for d in doc_ids],
              "n_chars": [x * 4 for x in n], "text": [f"doc {d}" for d in doc_ids]},
        tokens={"doc_id": [d for d in stored for _ in range(lengths[d])],
                "pos": [p for d in stored for p in range(lengths[d])],
                "token_id": [(d + p) % 50 for d in stored for p in range(lengths[d])],
                "token": [f"t{(d + p) % 50}" for d in stored for p in range(lengths[d])]},
        heads={"doc_id": np.repeat(stored, L * H).astype(np.int64),
               "layer": np.tile(np.repeat(np.arange(L), H), len(stored)),
               "head": np.tile(np.arange(H), L * len(stored)),
               "kv_head": np.tile(np.arange(H), L * len(stored)),
               "n_tokens": np.repeat([lengths[d] for d in stored], L * H),
               **{c: np.full(L * H * len(stored), 0.5) for c in SCORE_COLUMNS},
               "n_queries": np.repeat([lengths[d] for d in stored], L * H),
               "n_duplicate": np.zeros(L * H * len(stored), int),
               "n_induction": np.zeros(L * H * len(stored), int)},
        codes=[CODEC.encode(pack_tril(attention(d, lengths[d]))) for d in stored],
    )  # fmt: skip


def counts(store: attnstore.Store) -> tuple[int, int, int]:
    q = store.sql(
        "SELECT (SELECT count(*) FROM docs), (SELECT count(*) FROM tokens), "
        "(SELECT count(*) FROM heads)"
    ).to_pylist()[0]
    return tuple(int(v) for v in q.values())  # type: ignore[return-value]


def assert_consistent(store: attnstore.Store) -> None:
    """Every visible table row belongs to a visible document, and each document is whole."""
    stored = store.sql("SELECT doc_id, n_tokens FROM docs WHERE skipped IS NULL").to_pylist()
    assert counts(store)[2] == len(stored) * L * H
    assert counts(store)[1] == sum(d["n_tokens"] for d in stored)
    for d in stored[:3]:
        np.testing.assert_allclose(
            store.matrices(d["doc_id"]), attention(d["doc_id"], d["n_tokens"]), atol=2e-5
        )


def test_commit_every_and_close(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    writer = StoreWriter(out, manifest(), commit_every=3)
    writer.commit(batch([0, 1]))
    writer.commit(batch([2], skipped=frozenset({2})))
    assert not (out / "tables" / "docs" / "_delta_log").exists()  # buffered, nothing visible
    writer.commit(batch([3]))
    assert counts(attnstore.open(str(out)))[0] == 4  # the third batch flushed all three
    writer.commit(batch([4]))
    assert counts(attnstore.open(str(out)))[0] == 4
    writer.close()
    store = attnstore.open(str(out))
    assert counts(store)[0] == 5
    assert len(store.files("heads")) == 2  # one part per flush, not per batch
    assert store.commits[-1]["version"] == 2
    assert_consistent(store)
    with pytest.raises(StoreWriteError, match="closed"):
        writer.commit(batch([5]))


def test_commit_seconds(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    writer = StoreWriter(out, manifest(), commit_every=1000, commit_seconds=0.0)
    writer.commit(batch([0]))
    writer.commit(batch([1]))
    assert writer.flushes == 2  # every batch: the interval has always passed


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def fault(where: str) -> None:
        if where == point:
            raise Interrupted(where)

    monkeypatch.setattr(faults, "fault", fault)


@pytest.mark.parametrize("point", ["intent", "commit:tokens", "commit:heads"])
def test_interrupted_flush_is_hidden_then_rolled_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    out = tmp_path / "s.attn"
    with StoreWriter(out, manifest(), commit_every=2) as writer:
        writer.commit(batch([0, 1]))
        writer.commit(batch([2]))
    interrupt_at(monkeypatch, point)
    writer = StoreWriter(out, manifest(), commit_every=2)
    writer.commit(batch([3, 4]))
    with pytest.raises(Interrupted):
        writer.commit(batch([5], skipped=frozenset({5})))
    monkeypatch.undo()
    state = json.loads((out / "writers" / "shard-0-of-1.json").read_text())
    assert state["pending"]["doc_ids"] == [3, 4, 5]
    store = attnstore.open(str(out))
    assert store.doc_ids() == {0, 1, 2}  # the docs commit did not happen: nothing is visible
    assert_consistent(store)
    report = verify_store(out)
    assert report.ok
    assert any("interrupted" in p.message for p in report.problems)
    # Another writer (another app id) finishes the flush before adding anything
    with StoreWriter(out, manifest(), app_id="shard-1-of-2") as other:
        other.commit(batch([7]))
    store = attnstore.open(str(out))
    assert store.doc_ids() == {0, 1, 2, 3, 4, 5, 7}
    assert_consistent(store)
    docs = DeltaTable(str(out / "tables" / "docs"))
    assert docs.transaction_version("shard-0-of-1") == 2
    assert docs.transaction_version("shard-1-of-2") == 1
    assert json.loads((out / "writers" / "shard-0-of-1.json").read_text())["pending"] is None
    assert verify_store(out).problems == []


def test_roll_forward_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finishing a flush twice (two processes racing) commits each table once."""
    out = tmp_path / "s.attn"
    interrupt_at(monkeypatch, "commit:heads")
    writer = StoreWriter(out, manifest())
    with pytest.raises(Interrupted):
        writer.commit(batch([0, 1]))
    monkeypatch.undo()
    state = json.loads((out / "writers" / "shard-0-of-1.json").read_text())
    storage = writer.storage
    transactions.commit_pending(storage, "shard-0-of-1", state["pending"])
    assert transactions.roll_forward(storage, "shard-0-of-1")  # commits nothing new
    assert not transactions.roll_forward(storage, "shard-0-of-1")
    store = attnstore.open(str(out))
    assert counts(store) == (2, sum(3 + d % 7 for d in (0, 1)), 2 * L * H)
    assert len(store.files("tokens")) == 1


def test_compact_merges_sorts_and_keeps_content(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    with StoreWriter(out, manifest()) as writer:  # one flush per batch: many small parts
        for start in (30, 0, 12, 24, 6, 18):
            writer.commit(batch(list(range(start, start + 6)), skipped=frozenset({start + 1})))
    before = attnstore.open(str(out))
    q = 'SELECT * EXCLUDE (segment, "offset") FROM docs ORDER BY doc_id'
    rows = {t: before.sql(f"SELECT * FROM {t} ORDER BY ALL") for t in ("tokens", "heads")}
    docs = before.sql(q)
    assert len(before.files("heads")) == 6
    report = compact(out, retention_hours=0)
    assert report["tables"]["heads"]["files_before"] == 6
    after = attnstore.open(str(out))
    for t in ("docs", "tokens", "heads"):
        assert len(after.files(t)) == 1
        ids = after.table(t, ["doc_id"])["doc_id"].to_numpy()
        assert (np.diff(ids) >= 0).all()  # sorted by doc_id
        assert (out / "tables" / t / "_delta_log" / "_last_checkpoint").is_file()
        on_disk = [p for p in (out / "tables" / t).rglob("*.parquet") if "_delta_log" not in str(p)]
        assert len(on_disk) == 1  # retention 0: the replaced parts are gone
    assert after.sql(q) == docs
    for t, expected in rows.items():
        assert after.sql(f"SELECT * FROM {t} ORDER BY ALL") == expected
    assert_consistent(after)
    assert verify_store(out).problems == []
    # resume keeps working on a compacted store: the app transaction survived the rewrite
    with StoreWriter(out, manifest()) as writer:
        writer.commit(batch([36]))
    assert DeltaTable(str(out / "tables" / "docs")).transaction_version("shard-0-of-1") == 7


def test_default_retention_keeps_files_for_open_readers(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    with StoreWriter(out, manifest()) as writer:
        for d in range(4):
            writer.commit(batch([d]))
    reader = attnstore.open(str(out))  # an older snapshot
    compact(out)
    assert len(attnstore.open(str(out)).files("heads")) == 1
    assert reader.sql("SELECT count(*) FROM heads").column(0)[0].as_py() == 4 * L * H
    assert reader.matrix(3, 1, 2).shape == (6, 6)


def test_compact_while_a_writer_appends(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    with StoreWriter(out, manifest()) as writer:
        for d in range(5):
            writer.commit(batch([d]))
    errors: list[BaseException] = []

    def append() -> None:
        try:
            with StoreWriter(out, manifest(), app_id="shard-1-of-2") as w:
                for d in range(100, 112):
                    w.commit(batch([d]))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=append)
    thread.start()
    compact(out)
    compact(out)
    thread.join()
    assert not errors, errors
    store = attnstore.open(str(out))
    assert store.doc_ids() == set(range(5)) | set(range(100, 112))
    assert_consistent(store)
    assert verify_store(out).ok


def test_point_reads_touch_one_file(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    with StoreWriter(out, manifest()) as writer:
        for d in range(20):
            writer.commit(batch([d]))
    store = attnstore.open(str(out))
    tokens = store.dataset("tokens")
    assert len(list(tokens.get_fragments())) == 20
    assert len(list(tokens.get_fragments(filter=pc.field("doc_id") == 7))) == 1
    assert store.token_ids(7).tolist() == [(7 + p) % 50 for p in range(3 + 7 % 7)]
    plan = store.sql("EXPLAIN SELECT * FROM heads WHERE doc_id = 7").to_pylist()
    assert "doc_id" in str(plan)  # the filter is pushed into the Arrow scan


def test_no_internal_names_in_show_tables(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    with StoreWriter(out, manifest()) as writer:
        writer.commit(batch([0]))
    names = attnstore.open(str(out)).sql("SHOW TABLES").column(0).to_pylist()
    assert {"docs", "tokens", "heads", "head_summary"} <= set(names)
    assert not [n for n in names if n.startswith("_")]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=6),
    every=st.integers(1, 4),
)
def test_any_cadence_stores_every_batch_once(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], every: int
) -> None:
    out = tmp_path_factory.mktemp("cadence") / "s.attn"
    ids = iter(range(100))
    batches = [[next(ids) for _ in range(n)] for n in sizes]
    with StoreWriter(out, manifest(), commit_every=every) as writer:
        for b in batches:
            writer.commit(batch(b))
    store = attnstore.open(str(out))
    assert sorted(store.table("docs", ["doc_id"])["doc_id"].to_pylist()) == sorted(
        d for b in batches for d in b
    )
    assert len(store.files("docs")) == -(-len(batches) // every)
    assert_consistent(store)


def test_cli_compact_and_migrate(tmp_path: Path) -> None:
    out = tmp_path / "s.attn"
    with StoreWriter(out, manifest()) as writer:
        for d in range(3):
            writer.commit(batch([d]))
    result = CliRunner().invoke(cli, ["compact", str(out), "--retention-hours", "0", "--json"])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["tables"]["docs"] == {**report["tables"]["docs"], "files_before": 3,
                                        "files_after": 1}  # fmt: skip
    old = GOLDEN / "v1.0.attn"
    result = CliRunner().invoke(cli, ["compact", str(old)])
    assert result.exit_code == 1
    assert "attnstore migrate" in result.output
    result = CliRunner().invoke(cli, ["migrate", str(old), str(tmp_path / "new.attn")])
    assert result.exit_code == 0, result.output
    assert verify_store(tmp_path / "new.attn").ok


def test_materialize_selected_heads_of_a_census(tmp_path: Path, llama_dir: Path) -> None:
    """Two passes: a scores-only census, then matrices for just the matching rows, equal to a
    full extraction's."""
    kw: dict[str, Any] = {"model": str(llama_dir), "corpus": "pydoc:topics", "limit": 5,
                          "max_length": 40, "batch_size": 2, "progress": False}  # fmt: skip
    census, full, out = tmp_path / "census.attn", tmp_path / "full.attn", tmp_path / "m.attn"
    attnstore.extract(str(census), scores_only=True, **kw)
    attnstore.extract(str(full), **kw)
    where = "layer = 2 AND head IN (1, 3) AND doc_id IN (SELECT doc_id FROM docs WHERE doc_id > 1)"
    result = CliRunner().invoke(
        cli, ["materialize", str(census), "--where", where, "--out", str(out),
              "-m", str(llama_dir), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["docs_written"], report["layers"], report["heads"]) == (3, [2], [1, 3])
    m, f = attnstore.open(str(out)), attnstore.open(str(full))
    assert (m.manifest["layers"], m.manifest["heads"]) == ([2], [1, 3])
    assert m.doc_ids() == {2, 3, 4}
    for d in (2, 3, 4):
        for h in (1, 3):
            np.testing.assert_array_equal(m.matrix(d, 2, h), f.matrix(d, 2, h))
        assert m.token_ids(d).tolist() == f.token_ids(d).tolist()
    with pytest.raises(attnstore.MatrixNotFoundError, match="No layer 1"):
        m.matrix(2, 1, 1)
    assert verify_store(out).ok
    again = CliRunner().invoke(
        cli, ["materialize", str(census), "--where", where, "--out", str(out), "--json"]
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["docs_already_materialized"] == 3
    bad = CliRunner().invoke(cli, ["materialize", str(census), "--where", "nope > 1", "-o", "x"])
    assert bad.exit_code == 1
    assert "heads table" in bad.output
