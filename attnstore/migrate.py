"""``attnstore migrate OLD NEW``: copy a format 1.x store into a new format 2 store.

Every commit record of ``OLD`` becomes one batch of ``NEW`` (documents, tables, annotation
provenance), its matrices re-read from the old segments and written unchanged (same codes, same
codec), so ``NEW`` reads exactly like ``OLD``. ``OLD`` is only read. ``NEW`` must not exist yet;
if a migration is interrupted, delete ``NEW`` and run it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from attnstore.errors import IncompatibleStoreError, StoreExistsError
from attnstore.layout import FORMAT_VERSION, SEGMENTS, Manifest
from attnstore.storage import Location, location_text, open_storage
from attnstore.store.batch import Segment
from attnstore.store.reader import Store
from attnstore.store.writer import StoreWriter

__all__ = ["migrate"]

_ANNOTATION_KEYS = ("parser", "source")


def migrate(old: Location, new: Location) -> dict[str, Any]:
    """Convert the 1.x store at ``old`` into a new format-2 store at ``new`` (folders, URLs or
    opened :class:`~attnstore.storage.Storage` objects)."""
    import pyarrow.parquet as pq
    import zarr

    src = Store(old)
    if not src.read_only:
        raise IncompatibleStoreError(
            f"{location_text(old)!r} already has format {src.manifest['format_version']}: nothing to migrate."
        )
    target = open_storage(new)  # opened once: the writer below writes through it
    if target.exists(""):
        raise StoreExistsError(
            f"{location_text(new)!r} exists. `attnstore migrate` writes a new store: choose a new path "
            "(or delete an interrupted migration's output and run again)."
        )
    manifest: Manifest = {**src.manifest, "format_version": FORMAT_VERSION}
    manifest["settings"] = {**manifest["settings"], "migrated_from": src.manifest["format_version"]}
    writer = StoreWriter(target, manifest, app_id="migrate", commit_every=64)
    old_root = Path(src.storage.root)  # format 1 stores are local folders
    docs_n = 0
    for record in src.commits:
        tables = {name: pq.read_table(old_root / rel) for name, rel in record["tables"].items()}
        annotation = {k: record[k] for k in _ANNOTATION_KEYS if k in record}
        docs = tables.pop("docs", None)
        if docs is None:
            writer.commit(
                Segment(docs={}, tokens={}, heads={}, annotation=annotation,
                        extra={n: t.to_pydict() for n, t in tables.items()})
            )  # fmt: skip
            continue
        rows = docs.to_pylist()
        codes: list[np.ndarray] = []
        if record.get("segment"):
            from attnstore.paths import relative_name

            segment = relative_name(record["segment"], source="commits", what="segment")
            arr = zarr.open_array(old_root / SEGMENTS / segment, mode="r")
            for r in rows:
                if r["skipped"] is None and r["segment"] is not None:
                    n = r["n_tokens"]
                    codes.append(
                        np.asarray(arr[:, :, r["offset"] : r["offset"] + n * (n + 1) // 2])
                    )
        columns = docs.drop_columns(["segment", "offset"]).to_pydict()
        writer.commit(
            Segment(
                docs=columns,
                tokens=tables.pop("tokens").to_pydict(),
                heads=tables.pop("heads").to_pydict(),
                codes=codes,
                extra={n: t.to_pydict() for n, t in tables.items()},
                annotation=annotation,
            )
        )
        docs_n += len(rows)
    writer.close()
    return {"from": location_text(old), "to": location_text(new), "commits": len(src.commits), "docs": docs_n,
            "format_version": FORMAT_VERSION}  # fmt: skip
