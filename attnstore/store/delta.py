"""The store's tables through delta-rs: the store package's only module that imports deltalake.

Writers commit here (:func:`commit_adds`, exactly once per application transaction); readers come
here only for what the plain log reader (:mod:`attnstore.store.deltalog`) leaves to delta-rs: a log
it does not understand, and a table's history. delta-rs' errors about a damaged log become one
:class:`~attnstore.errors.DamagedStoreError` line (:func:`damaged_log`).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, Transaction

from attnstore.analyses import tables as plugin_tables
from attnstore.errors import DamagedStoreError, StoreWriteError
from attnstore.store.deltalog import AddedFile, TableLog, table_path

if TYPE_CHECKING:
    from collections.abc import Iterable

    from attnstore.storage import Storage

__all__ = [
    "COMMIT_RETRIES",
    "DeltaError",
    "DeltaTable",
    "commit_adds",
    "damaged_log",
    "delta_tables",
    "ensure_table",
    "open_table",
    "table_log",
    "txn_version",
]

#: A Delta commit that loses a race to another writer is retried this many times.
COMMIT_RETRIES: Final = 50


def open_table(storage: Storage, name: str) -> DeltaTable | None:
    """The Delta table ``name`` of a format-2 store, or ``None`` if no writer created it yet."""
    try:
        return DeltaTable(
            storage.table_uri(table_path(name)), storage_options=storage.storage_options
        )
    except TableNotFoundError:
        return None
    except DeltaError as err:
        raise damaged_log(table_path(name), err) from None


def damaged_log(rel: str, err: Exception) -> Exception:
    """One line for a Delta log delta-rs cannot read (it names Rust structures, not the problem)."""
    text = " ".join(str(err).split())
    names = re.findall(r'filename: "([^"]+)"', text)
    if "found gap" in text and len(names) >= 2:
        return DamagedStoreError(
            f"{rel}/_delta_log: a log entry is missing between {names[0]} and {names[-1]} (the "
            "log must be contiguous); the table cannot be read. `attnstore verify` lists every "
            "damaged file."
        )
    return DamagedStoreError(
        f"{rel}/_delta_log: the Delta log cannot be read ({text[:200]}). "
        "`attnstore verify` lists every damaged file."
    )


def txn_version(table: DeltaTable | None, app_id: str) -> int:
    """The version of ``app_id``'s last transaction in ``table`` (0 if none, or no table)."""
    if table is None:
        return 0
    return table.transaction_version(app_id) or 0


def table_log(table: DeltaTable, apps: Iterable[str] = ()) -> TableLog:
    """``table``'s snapshot as plain data, with the transactions of ``apps``."""
    actions = pa.table(table.get_add_actions(flatten=True))
    paths = actions["path"].to_pylist()
    if "min.doc_id" in actions.column_names:
        lows, highs = actions["min.doc_id"].to_pylist(), actions["max.doc_id"].to_pylist()
    else:
        lows = highs = [None] * len(paths)
    files = tuple(AddedFile(p, lo, hi) for p, lo, hi in zip(paths, lows, highs, strict=True))
    txns = {app: v for app in apps if (v := txn_version(table, app))}
    return TableLog(table.version(), files, txns)


def commit_adds(
    storage: Storage,
    name: str,
    adds: list[dict[str, Any]],
    app_id: str,
    version: int,
    metadata: dict[str, str],
    cache: dict[str, DeltaTable] | None = None,
) -> None:
    """Commit ``adds`` to table ``name`` as transaction ``(app_id, version)``, exactly once."""
    table = cache.get(name) if cache is not None else None
    if table is None:
        table = ensure_table(storage, name)
        if cache is not None:
            cache[name] = table
    actions: list[AddAction | RemoveAction] = [
        AddAction(a["path"], a["size"], {}, a["modification_time"], True, a["stats"]) for a in adds
    ]
    for attempt in range(COMMIT_RETRIES):
        table.update_incremental()
        if txn_version(table, app_id) >= version:
            return  # already committed (a rerun rolling forward, or a lost acknowledgement)
        try:
            table.create_write_transaction(
                actions,
                mode="append",
                schema=table.schema(),
                commit_properties=CommitProperties(
                    custom_metadata=metadata,
                    app_transactions=[Transaction(app_id, version)],
                ),
            )
            return
        except CommitFailedError:
            if attempt == COMMIT_RETRIES - 1:
                raise
            time.sleep(0.01 * (attempt + 1))


def ensure_table(storage: Storage, name: str) -> DeltaTable:
    """Table ``name``, created with its schema if no writer created it yet."""
    table = open_table(storage, name)
    if table is not None:
        return table
    with contextlib.suppress(Exception):  # another writer created it first: open below
        DeltaTable.create(
            storage.table_uri(table_path(name)),
            schema=plugin_tables.schemas(storage)[name],
            mode="ignore",
            name=name,
            storage_options=storage.storage_options,
        )
    table = open_table(storage, name)
    if table is None:  # pragma: no cover - creation failed for a reason other than a race
        raise StoreWriteError(f"Cannot create the Delta table {name!r} in {storage.root!r}.")
    return table


def delta_tables(storage: Storage) -> Iterable[tuple[str, DeltaTable]]:
    """Every existing Delta table of a format-2 store (built-in and plug-in tables)."""
    for name in plugin_tables.schemas(storage):
        dt = open_table(storage, name)
        if dt is not None:
            yield name, dt
