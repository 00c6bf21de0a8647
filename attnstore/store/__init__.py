"""A store on disk: attention in Zarr v3 segments, tables in Delta Lake, and read-back.

The package, by part:

- :mod:`~attnstore.store.reader`: :class:`Store`, a store opened for reading (tables, SQL, info);
- :mod:`~attnstore.store.matrices`: one document's matrices (the read path of ``matrix()``);
- :mod:`~attnstore.store.locations`: a document's ``docs`` row, read from the Parquet parts;
- :mod:`~attnstore.store.snapshot`: a consistent snapshot of the tables (no half flush);
- :mod:`~attnstore.store.deltalog`: a Delta table's snapshot read from its log, without delta-rs;
- :mod:`~attnstore.store.delta`: delta-rs (the only module importing deltalake): commits, history;
- :mod:`~attnstore.store.tables`: a table snapshot as a lazy Arrow dataset (SQL, full reads);
- :mod:`~attnstore.store.segments`: segment and overview arrays, written once, opened safely;
- :mod:`~attnstore.store.streaming`: a long document's segment, written as its rows come;
- :mod:`~attnstore.store.manifest`: the manifest read through any storage;
- :mod:`~attnstore.store.batch`: :class:`Segment`, one batch ready to commit;
- :mod:`~attnstore.store.writer`: :class:`StoreWriter`, buffered flushes;
- :mod:`~attnstore.store.intents`, :mod:`~attnstore.store.transactions`: a flush's intent and
  its commit, rolled forward after a crash;
- :mod:`~attnstore.store.faults`: fault injection for the crash tests.

Opening a store and reading a matrix loads neither delta-rs nor an Arrow dataset (nor pandas):
the names of the writing side (:class:`StoreWriter` and its helpers) are imported from here on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnstore.store.batch import Segment
from attnstore.store.deltalog import table_path
from attnstore.store.faults import FAULT_POINTS
from attnstore.store.manifest import manifest_bytes, read_store_manifest
from attnstore.store.reader import Store

if TYPE_CHECKING:
    from attnstore.store.delta import delta_tables, open_table
    from attnstore.store.transactions import roll_forward, roll_forward_all
    from attnstore.store.writer import (
        DEFAULT_APP_ID,
        DEFAULT_COMMIT_EVERY,
        DEFAULT_COMMIT_SECONDS,
        StoreWriter,
        app_id_for_shard,
        commit_cadence,
    )

__all__ = [
    "DEFAULT_APP_ID",
    "DEFAULT_COMMIT_EVERY",
    "DEFAULT_COMMIT_SECONDS",
    "FAULT_POINTS",
    "Segment",
    "Store",
    "StoreWriter",
    "app_id_for_shard",
    "commit_cadence",
    "delta_tables",
    "manifest_bytes",
    "open_table",
    "read_store_manifest",
    "roll_forward",
    "roll_forward_all",
    "table_path",
]

_WRITER = frozenset({
    "DEFAULT_APP_ID", "DEFAULT_COMMIT_EVERY", "DEFAULT_COMMIT_SECONDS", "StoreWriter",
    "app_id_for_shard", "commit_cadence",
})  # fmt: skip


def __getattr__(name: str) -> Any:
    """The writing side's names, imported on first use (they load delta-rs and Arrow datasets)."""
    if name in _WRITER:
        from attnstore.store import writer

        return getattr(writer, name)
    if name in ("delta_tables", "open_table"):
        from attnstore.store import delta

        return getattr(delta, name)
    if name in ("roll_forward", "roll_forward_all"):
        from attnstore.store import transactions

        return getattr(transactions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
