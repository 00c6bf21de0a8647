"""A table snapshot as a lazy pyarrow Dataset: what ``Store.dataset``, SQL and the writers' claim
check read (the only module of the store that imports ``pyarrow.dataset``).

Every Parquet read verifies page checksums, so a flipped bit in a page fails the read instead of
returning wrong values (every attnstore writer writes them). Files carry their ``doc_id`` range
from the Delta log as a partition expression, so a filter on ``doc_id`` skips whole files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.storage import Storage
    from attnstore.store.snapshot import TableFile

__all__ = ["doc_ids_in", "make_dataset", "parquet_format"]


def parquet_format() -> pads.ParquetFileFormat:
    """Parquet as every reader reads it: page checksums verified."""
    return pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(
            page_checksum_verification=True
        )
    )


def make_dataset(
    storage: Storage, schema: pa.Schema, files: Sequence[TableFile], hidden: set[int] | None
) -> pads.Dataset:
    """The rows of ``files`` with exactly ``schema``'s columns, less the ``hidden`` doc_ids.

    Parts of an older minor may lack newer columns: the schema fills them with NULL.
    """
    if not files:
        return pads.dataset(schema.empty_table())
    fmt = parquet_format()
    doc_id = pc.field("doc_id")
    fragments = [
        fmt.make_fragment(
            f.path,
            filesystem=storage.arrow_filesystem(),
            partition_expression=pc.scalar(True)
            if f.min_doc is None or f.max_doc is None
            else (doc_id >= f.min_doc) & (doc_id <= f.max_doc),
        )
        for f in files
    ]
    ds: pads.Dataset = pads.FileSystemDataset(fragments, schema, fmt, storage.arrow_filesystem())
    if hidden:
        ds = ds.filter(~doc_id.isin(pa.array(sorted(hidden), pa.int64())))
    return ds


def doc_ids_in(storage: Storage, paths: Sequence[str], doc_ids: set[int]) -> set[int]:
    """Those of ``doc_ids`` that the Parquet files ``paths`` hold (a filtered read)."""
    if not paths or not doc_ids:
        return set()
    ds = pads.dataset(paths, format=parquet_format(), filesystem=storage.arrow_filesystem())
    wanted = pa.array(sorted(doc_ids), pa.int64())
    found = ds.to_table(columns=["doc_id"], filter=pc.field("doc_id").isin(wanted))["doc_id"]
    return set(found.to_pylist())
