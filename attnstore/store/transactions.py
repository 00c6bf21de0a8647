"""Committing a flush's intent to the Delta tables, and rolling forward the ones a crash left.

A flush's ``add`` actions are committed table by table as the Delta application transaction
``(app_id, version)``: every table but ``docs`` first, ``docs`` last (``docs`` is what makes the
flush visible). :func:`roll_forward` finishes a pending intent idempotently: a table whose
``transaction_version(app_id)`` already is ``version`` is skipped.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from attnstore import index
from attnstore.analyses import tables as plugin_tables
from attnstore.errors import UnsafeStorePathError
from attnstore.layout import WRITERS
from attnstore.paths import inside
from attnstore.store import faults
from attnstore.store.delta import commit_adds
from attnstore.store.deltalog import table_path
from attnstore.store.intents import read_state, write_state, writer_path

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from attnstore.storage import Storage

__all__ = ["commit_pending", "roll_forward", "roll_forward_all"]


def commit_pending(
    storage: Storage,
    app_id: str,
    pending: dict[str, Any],
    cache: dict[str, DeltaTable] | None = None,
) -> None:
    """Commit every table of the intent ``pending`` (checked first: it is store metadata too)."""
    tables: dict[str, list[dict[str, Any]]] = pending["tables"]
    source = writer_path(app_id)
    known = set(index.SCHEMAS) | set(tables) & set(plugin_tables.registered(storage))
    for name, adds in tables.items():
        if name not in known:  # a built-in table, or an analysis table registered in the store
            raise UnsafeStorePathError(f"{source}: unknown table {name!r} in the pending flush.")
        for a in adds:
            inside(storage, table_path(name), a["path"], source=source, what="add path", uri=True)
    metadata = {"attnstore": json.dumps(pending.get("record", {}), sort_keys=True)}
    order = [n for n in tables if n != "docs"] + ["docs"]
    for name in order:
        commit_adds(
            storage, name, tables.get(name, []), app_id, pending["version"], metadata, cache
        )
        faults.fault(f"commit:{name}")


def roll_forward(storage: Storage, app_id: str) -> bool:
    """Finish the pending flush of ``app_id`` (left by a crash), if any. True if there was one."""
    with storage.lock(f"{WRITERS}/{app_id}.lock"):
        state = read_state(storage, app_id)
        pending = state.get("pending")
        if not pending:
            return False
        commit_pending(storage, app_id, pending)
        state["pending"] = None
        write_state(storage, state)
        return True


def roll_forward_all(storage: Storage) -> int:
    """Roll forward every writer's pending flush; the number finished."""
    apps = [n.removesuffix(".json") for n in storage.list(WRITERS) if n.endswith(".json")]
    return sum(roll_forward(storage, a) for a in apps)
