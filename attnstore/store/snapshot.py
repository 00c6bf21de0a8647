"""A consistent snapshot of a store's tables: ``docs`` first, the others after, no half flush.

A table may be ahead of ``docs`` for a writer only by a flush whose ``docs`` commit is still to
come (or was interrupted): its intent in ``writers/<app>.json`` lists the doc_ids to hide. The
snapshot is plain data (:class:`TableFile` lists), so a :class:`~attnstore.store.Store` pickles and
reads in forked workers. Each table's log is read by :mod:`attnstore.store.deltalog`; a log it
leaves to delta-rs is read by :mod:`attnstore.store.delta`, imported only then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from attnstore.layout import BUILTIN_TABLES, WRITERS
from attnstore.paths import inside
from attnstore.store.deltalog import LogNotUnderstood, TableLog, log_path, read_log, table_path
from attnstore.store.intents import read_state

if TYPE_CHECKING:
    from collections.abc import Sequence

    from deltalake import DeltaTable

    from attnstore.storage import Storage

__all__ = ["TableFile", "files_of", "snapshot"]


@dataclass(frozen=True)
class TableFile:
    """One Parquet file of a table snapshot (a path of the storage's Arrow file system), with its
    ``doc_id`` range when known."""

    path: str
    min_doc: int | None
    max_doc: int | None


def files_of(storage: Storage, name: str, log: TableLog) -> list[TableFile]:
    """The files of table ``name`` at ``log``, every path checked: a store's log never makes a
    reader leave the store."""
    base = table_path(name)
    source = log_path(name)
    return [
        TableFile(
            storage.arrow_path(
                storage.table_uri(
                    inside(storage, base, f.path, source=source, what="add path", uri=True)
                )
            ),
            f.min_doc,
            f.max_doc,
        )
        for f in log.files
    ]


def _open(storage: Storage, name: str) -> TableLog | DeltaTable | None:
    """Table ``name``'s log as plain data, or the delta-rs table when only delta-rs reads it."""
    try:
        return read_log(storage, name)
    except LogNotUnderstood:
        from attnstore.store.delta import open_table

        return open_table(storage, name)


def _settle(table: TableLog | DeltaTable, apps: Sequence[str]) -> TableLog:
    if isinstance(table, TableLog):
        return table
    from attnstore.store.delta import table_log

    return table_log(table, apps)


def snapshot(
    storage: Storage, names: Sequence[str] = BUILTIN_TABLES, attempts: int = 20
) -> tuple[dict[str, TableLog], dict[str, set[int]]]:
    """Consistent table snapshots, ``docs`` first, plus per table the doc_ids to hide.

    If a flush raced past between the snapshots, they are taken again (``attempts`` times).
    """
    hidden: dict[str, set[int]] = {}
    tables: dict[str, TableLog] = {}
    for _ in range(attempts):
        hidden = {}
        opened: dict[str, TableLog | DeltaTable] = {}
        if (docs := _open(storage, "docs")) is not None:
            opened["docs"] = docs
        for name in names:
            if name != "docs" and (table := _open(storage, name)) is not None:
                opened[name] = table
        # listed after the tables: a writer that started later has nothing in this snapshot
        apps = [n.removesuffix(".json") for n in storage.list(WRITERS) if n.endswith(".json")]
        tables = {name: _settle(t, apps) for name, t in opened.items()}
        consistent = True
        for app in apps:
            seen = tables["docs"].txn_version(app) if "docs" in tables else 0
            ahead = {
                n: v for n, t in tables.items() if n != "docs" and (v := t.txn_version(app)) > seen
            }
            if not ahead:
                continue
            pending = read_state(storage, app).get("pending") or {}
            if all(v == pending.get("version") == seen + 1 for v in ahead.values()):
                ids = set(pending.get("doc_ids", ()))
                for n in ahead:
                    hidden.setdefault(n, set()).update(ids)
            else:
                consistent = False
        if consistent:
            return tables, hidden
        time.sleep(0.01)
    # A flush keeps racing past: hide every row whose document docs does not list.
    visible = _doc_ids(storage, "docs", tables["docs"]) if "docs" in tables else set()
    for name, table in tables.items():
        if name != "docs":
            hidden[name] = _doc_ids(storage, name, table) - visible
    return tables, hidden


def _doc_ids(storage: Storage, name: str, log: TableLog) -> set[int]:
    """Every ``doc_id`` in table ``name`` at ``log`` (its files' ``doc_id`` column)."""
    import pyarrow.parquet as pq

    filesystem = storage.arrow_filesystem()
    ids: set[int] = set()
    for f in files_of(storage, name, log):
        with filesystem.open_input_file(f.path) as fh:
            column = pq.ParquetFile(fh, page_checksum_verification=True).read(columns=["doc_id"])
            ids.update(column["doc_id"].to_pylist())
    return ids
