"""A writer's intent file, ``writers/<app_id>.json``: its last flush version and the flush pending.

A flush records its intent (version, doc_ids, the Delta ``add`` actions per table) before it
commits, and clears it after (:mod:`attnstore.store.transactions`); readers read it to hide the
rows of a flush whose ``docs`` commit they do not see (:mod:`attnstore.store.snapshot`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from attnstore.layout import WRITERS

if TYPE_CHECKING:
    from attnstore.storage import Storage

__all__ = ["read_state", "write_state", "writer_path"]


def writer_path(app_id: str) -> str:
    """The store-relative path of ``app_id``'s intent file."""
    return f"{WRITERS}/{app_id}.json"


def read_state(storage: Storage, app_id: str) -> dict[str, Any]:
    """``app_id``'s state: ``{"app_id", "version", "pending"}`` (version 0 if it never flushed)."""
    rel = writer_path(app_id)
    if not storage.exists(rel):
        return {"app_id": app_id, "version": 0, "pending": None}
    state: dict[str, Any] = json.loads(storage.read_bytes(rel))
    return state


def write_state(storage: Storage, state: dict[str, Any]) -> None:
    """Replace the state file atomically (a reader sees the old or the new one)."""
    data = json.dumps(state, indent=1, sort_keys=True).encode() + b"\n"
    storage.write_bytes_atomic(writer_path(state["app_id"]), data)
