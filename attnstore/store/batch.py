"""A batch ready to commit (:class:`Segment`), and how the buffered batches become table rows.

The table schemas (:mod:`attnstore.index`, :mod:`attnstore.analyses.tables`) are imported when a
batch is built, not with :class:`Segment`: ``attnstore.store`` names it, and opening a store to read
a matrix needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from attnstore.errors import StoreWriteError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from attnstore.analyses.tables import TableSpec

__all__ = ["Segment", "batch_table", "concat_columns"]


@dataclass
class Segment:
    """One batch ready to commit: codes per document plus its table rows."""

    docs: dict[str, list[Any]]
    tokens: dict[str, Any]
    heads: dict[str, Any]
    #: per stored document, in ``docs`` order of non-skipped rows: ``[layer, head, packed]`` codes
    #: (packed: its stored rows, :class:`attnstore.rows.DocRows`), or a
    #: :class:`~attnstore.store.streaming.Streamed` document already written as its own segment
    codes: list[Any] = field(default_factory=list)
    #: ``--overview N``: per stored document, ``[layer, head, 2 (max, mean), M, M]`` float32
    overviews: list[np.ndarray] = field(default_factory=list)
    #: further tables by name: built-in ones (``words``, ``syntax``, …) as columns or tables, and
    #: the tables of analyses (pyarrow Tables; plug-in tables registered with the writer first)
    extra: dict[str, Any] = field(default_factory=dict)
    #: provenance of ``extra`` (e.g. the parser), recorded with the flush
    annotation: dict[str, Any] = field(default_factory=dict)


def batch_table(name: str, parts: list[Any], specs: Mapping[str, TableSpec]) -> pa.Table:
    """One table's rows of the flushed batches: built-in columns, or analyses' tables (plug-in
    tables by their ``specs``)."""
    from attnstore import index
    from attnstore.analyses import tables as plugin_tables

    if not any(isinstance(p, pa.Table) for p in parts):
        return index.table_from_columns(name, concat_columns(parts))
    spec = specs.get(name)
    if spec is None and name in index.SCHEMAS:
        spec = plugin_tables.TableSpec(name, index.SCHEMAS[name], index.SORT_KEYS[name], "")
        parts = [p if isinstance(p, pa.Table) else index.table_from_columns(name, p) for p in parts]
    if spec is None:
        raise StoreWriteError(
            f"Table {name!r} is neither built-in nor registered with this writer "
            "(StoreWriter.register)."
        )
    return plugin_tables.build_table(spec, parts)


def concat_columns(column_sets: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns of several batches of one table, back to back."""
    sets = [c for c in column_sets if c]
    if len(sets) == 1:
        return sets[0]
    out: dict[str, Any] = {}
    rows = [len(next(iter(c.values()))) for c in sets]
    for key in dict.fromkeys(k for c in sets for k in c):
        parts = [c[key] if key in c else [None] * n for c, n in zip(sets, rows, strict=True)]
        if all(isinstance(v, np.ndarray) for v in parts):
            out[key] = np.concatenate([np.asarray(v) for v in parts])
        else:
            out[key] = [x for v in parts for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    return out
