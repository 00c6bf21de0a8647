"""Where a document's matrices are: its ``docs`` row, read straight from the Parquet parts.

A point read (``matrix``, ``packed``, ``token_ids``) needs one ``docs`` row. :func:`find_doc` reads
it with ``pyarrow.parquet`` alone: only the parts whose ``doc_id`` range (from the Delta log) can
hold the document, and in them only the row groups whose statistics can, with page checksums
verified. No Arrow dataset (and so no pandas) is loaded for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnstore.errors import DamagedStoreError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from attnstore.storage import Storage
    from attnstore.store.snapshot import TableFile

__all__ = ["Location", "find_doc", "location_of"]


@dataclass(frozen=True)
class Location:
    """A stored document's matrices: segment ``segment`` from value ``offset`` on, ``T`` tokens."""

    segment: str
    offset: int
    n_tokens: int


def location_of(row: dict[str, Any] | None) -> Location | str | None:
    """A ``docs`` row → its :class:`Location`, the reason it has none (``"skipped:<why>"``,
    ``"scores-only"``), or ``None`` for no row."""
    if row is None:
        return None
    if row["skipped"] is not None:
        return f"skipped:{row['skipped']}"
    if row["segment"] is None:
        return "scores-only"
    return Location(row["segment"], int(row["offset"]), int(row["n_tokens"]))


def find_doc(
    storage: Storage, files: Sequence[TableFile], doc_id: int, columns: Sequence[str]
) -> dict[str, Any] | None:
    """``columns`` of the first ``docs`` row of ``doc_id`` in ``files`` (NULL for a column a part
    lacks), or ``None``."""
    filesystem = storage.arrow_filesystem()
    for f in files:
        if f.min_doc is not None and f.max_doc is not None and not f.min_doc <= doc_id <= f.max_doc:
            continue
        try:
            with filesystem.open_input_file(f.path) as fh:
                row = _find_in(pq.ParquetFile(fh, page_checksum_verification=True), doc_id, columns)
        except pa.ArrowInvalid as err:
            text = " ".join(str(err).split())
            raise DamagedStoreError(
                f"{f.path}: not a readable Parquet file ({text}); the store is damaged. "
                "`attnstore verify` lists every damaged file."
            ) from None
        if row is not None:
            return row
    return None


def _find_in(pf: pq.ParquetFile, doc_id: int, columns: Sequence[str]) -> dict[str, Any] | None:
    names = pf.schema_arrow.names
    if "doc_id" not in names:
        return None
    leaf = pf.schema.names.index("doc_id")  # a flat schema: one leaf column per field
    have = [c for c in columns if c in names]
    for g in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(g).column(leaf).statistics
        if stats is not None and stats.has_min_max and not stats.min <= doc_id <= stats.max:
            continue
        group = pf.read_row_group(g, columns=["doc_id", *have])
        for i in _positions(group.column("doc_id"), doc_id):
            return {c: group.column(c)[i].as_py() if c in have else None for c in columns}
    return None


def _positions(column: pa.ChunkedArray, value: int) -> Iterator[int]:
    """Row positions in ``column`` holding ``value``.

    Read from the int64 buffers with numpy (converting an Arrow array to numpy or Python lists
    would import pandas, which pyarrow probes for, and that costs more than the whole read).
    """
    start = 0
    for chunk in column.chunks:
        if chunk.type == pa.int64() and chunk.null_count == 0:
            values = np.frombuffer(chunk.buffers()[1], dtype=np.int64)
            hits: Iterable[int] = np.flatnonzero(
                values[chunk.offset : chunk.offset + len(chunk)] == value
            ).tolist()
        else:  # another type or NULLs (a damaged part): scalar by scalar
            hits = [i for i, v in enumerate(chunk) if v.as_py() == value]
        for i in hits:
            yield start + i
        start += len(chunk)
