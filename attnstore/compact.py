"""``attnstore compact``: few large, sorted files per table, a checkpoint, and no stale files.

For every Delta table of a format-2 store:

1. finish flushes interrupted by a crash (:func:`attnstore.store.transactions.roll_forward_all`);
2. rewrite its parts into files of up to ``target_size`` bytes, sorted by ``doc_id``
   (Delta ``OPTIMIZE ZORDER BY (doc_id)``), with row groups of :data:`attnstore.index.ROW_GROUP_ROWS`;
3. ``VACUUM``: delete the files no snapshot of the last ``retention_hours`` references;
4. write a checkpoint and expire log entries older than ``retention_hours``.

So opening the store afterwards reads one checkpoint and the commits after it, and a query scans
a handful of files, whatever the number of batches written.

Safe while other processes append and query: rewriting is one Delta commit (a reader keeps the
snapshot it opened, a writer's append does not conflict with it, a lost race is retried), and a
file is deleted only ``retention_hours`` after it left the table. The default,
:data:`DEFAULT_RETENTION_HOURS`, outlasts any query; ``retention_hours=0`` removes the old files at
once and is only safe when no other process reads the store at the same time.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Final

from attnstore import index
from attnstore.errors import AttnStoreError, IncompatibleStoreError
from attnstore.layout import parse_format_version
from attnstore.storage import open_storage

if TYPE_CHECKING:
    from attnstore.storage import Storage
from attnstore.store.delta import delta_tables
from attnstore.store.manifest import read_store_manifest
from attnstore.store.transactions import roll_forward_all

__all__ = ["DEFAULT_RETENTION_HOURS", "DEFAULT_TARGET_SIZE", "compact", "maybe_compact"]

#: Files that left a table are kept this long for readers that opened an older snapshot.
DEFAULT_RETENTION_HOURS: Final = 24
#: Target size of a compacted file.
DEFAULT_TARGET_SIZE: Final = 256 << 20
#: ``extract`` compacts at its end when a table has more parts than this.
AUTO_COMPACT_PARTS: Final = 256
_RETRIES: Final = 20


def _retry(what: Any) -> Any:
    from deltalake.exceptions import CommitFailedError, DeltaError

    for attempt in range(_RETRIES):
        try:
            return what()
        except (CommitFailedError, DeltaError):
            if attempt == _RETRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None  # pragma: no cover


def compact(
    path: str | os.PathLike[str] | Storage,
    *,
    retention_hours: int = DEFAULT_RETENTION_HOURS,
    target_size: int = DEFAULT_TARGET_SIZE,
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Compact every table of the store at ``path`` (a folder, a URL, or an opened storage); what
    was done, per table."""
    from deltalake import WriterProperties

    if retention_hours < 0:
        raise AttnStoreError(
            f"Expected --retention-hours ≥ 0 (hours an unreferenced file is kept for readers). "
            f"Got {retention_hours}."
        )
    storage = _storage(path, storage_options)
    if not isinstance(path, (str, os.PathLike)):
        path = storage.root
    manifest = read_store_manifest(storage)
    if parse_format_version(manifest["format_version"])[0] < 2:
        raise IncompatibleStoreError(
            f"The store at {str(path)!r} has format {manifest['format_version']}: it is read-only "
            f"here. Convert it first: `attnstore migrate {path} NEW`."
        )
    rolled = roll_forward_all(storage)
    props = WriterProperties(max_row_group_size=index.ROW_GROUP_ROWS, compression="ZSTD")
    hours = int(retention_hours)
    report: dict[str, Any] = {"path": str(path), "rolled_forward": rolled, "tables": {}}
    for name, dt in delta_tables(storage):
        before = len(dt.file_uris())
        if before > 1:

            def optimize(dt: Any = dt) -> Any:
                dt.update_incremental()
                return dt.optimize.z_order(
                    ["doc_id"], target_size=target_size, writer_properties=props
                )

            _retry(optimize)
        dt.update_incremental()
        retention = f"interval {hours} hours" if hours else "interval 0 seconds"
        if dt.metadata().configuration.get("delta.logRetentionDuration") != retention:
            _retry(lambda dt=dt, r=retention: dt.alter.set_table_properties(
                {"delta.logRetentionDuration": r}
            ))  # fmt: skip
        removed = _retry(
            lambda dt=dt: dt.vacuum(
                retention_hours=hours, dry_run=False, enforce_retention_duration=False
            )
        )
        dt.update_incremental()
        _retry(dt.create_checkpoint)
        dt.cleanup_metadata()
        dt.update_incremental()
        report["tables"][name] = {
            "files_before": before,
            "files_after": len(dt.file_uris()),
            "files_deleted": len(removed or []),
            "version": dt.version(),
        }
    return report


def maybe_compact(
    path: str | os.PathLike[str] | Storage, storage_options: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """Compact (default retention) when some table has more than :data:`AUTO_COMPACT_PARTS` parts."""
    storage = _storage(path, storage_options)
    if any(len(dt.file_uris()) > AUTO_COMPACT_PARTS for _, dt in delta_tables(storage)):
        return compact(storage)
    return None


def _storage(path: str | os.PathLike[str] | Storage, options: dict[str, str] | None) -> Storage:
    if isinstance(path, (str, os.PathLike)):
        return open_storage(path, options)
    return path
