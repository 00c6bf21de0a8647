"""A store opened for reading: :class:`Store`, a read-only view of its committed contents.

A store on disk holds attention in Zarr v3 segments (:mod:`attnstore.store.segments`) and tables in
Delta Lake (one table per name, :mod:`attnstore.store.deltalog`); writers add to it through
:class:`~attnstore.store.writer.StoreWriter`. Opening takes a consistent snapshot of the tables
(:mod:`attnstore.store.snapshot`) as plain data; one document's matrices are read by
:class:`~attnstore.store.matrices.MatrixReader`, tables by Arrow datasets
(:mod:`attnstore.store.tables`, loaded on first use) and SQL by :mod:`attnstore.query`.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from attnstore.codecs import Codec, get_codec
from attnstore.layout import (
    ANALYSES,
    BUILTIN_TABLES,
    COMMITS,
    SEGMENTS,
    Manifest,
    parse_format_version,
    read_json,
    registrations,
)
from attnstore.paths import inside, relative_name
from attnstore.rows import RowSelection
from attnstore.storage import Storage, is_url, open_storage
from attnstore.store.manifest import read_store_manifest
from attnstore.store.matrices import MatrixReader
from attnstore.store.snapshot import TableFile, files_of, snapshot

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow.dataset as pads
    from deltalake import DeltaTable

__all__ = ["Store"]


class Store(MatrixReader):
    """A read-only view of the committed contents of a store.

    Opening reads the Delta logs (a checkpoint plus the commits after it), not the tables. Point
    reads (``matrix``, ``packed``, ``matrices``, ``token_ids``) read only the files and row groups
    whose statistics can hold the document, so memory stays flat as the corpus grows. The snapshot
    is plain data: a Store pickles, and a forked process (a DataLoader worker) reads through it
    without delta-rs, whose runtime does not survive a fork (:meth:`refresh` there needs ``spawn``).

    Examples
    --------
    >>> store = attnstore.open("demo.attn")  # doctest: +SKIP
    >>> store.sql("SELECT layer, head, sum(induction * n_induction) / sum(n_induction) "
    ...           "FROM heads GROUP BY ALL")  # doctest: +SKIP
    >>> store.matrix(doc_id=3, layer=18, head=6).shape  # doctest: +SKIP
    (87, 87)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        *,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        if isinstance(path, (str, os.PathLike)):
            self.storage: Storage = open_storage(path, storage_options)
        else:  # an opened storage, with its options
            self.storage = path
            path = path.root
        #: the folder, or the URL of a store on object storage
        self.path: Path | str = self.storage.root if is_url(path) else Path(path)
        self.manifest: Manifest = read_store_manifest(self.storage)
        self._pid = os.getpid()
        self.format_major = parse_format_version(self.manifest["format_version"])[0]
        self.codec: Codec = get_codec(self.manifest["codec"])
        self._layer_pos = {layer: i for i, layer in enumerate(self.manifest["layers"])}
        self._head_pos = {head: i for i, head in enumerate(self.manifest["heads"])}
        #: ``--rows`` of a 2.1 store (None: every query row is stored)
        self.row_selection = RowSelection.parse(self.manifest.get("rows"))
        self._arrays = OrderedDict()
        self._lock = threading.Lock()
        self.refresh()

    def __repr__(self) -> str:
        return f"<attnstore.Store {str(self.path)!r} (format {self.manifest['format_version']})>"

    @property
    def read_only(self) -> bool:
        """Format 1 stores open read-only; ``attnstore migrate`` converts them."""
        return self.format_major < 2

    # -- what is committed -------------------------------------------------------------------
    def refresh(self) -> None:
        """Take a new snapshot (to see batches committed since opening)."""
        self._datasets: dict[str, pads.Dataset] = {}
        names = self._table_names()
        self._locations = OrderedDict()
        self._overview_rows = OrderedDict()
        if self.read_only:
            folder = Path(self.storage.root) / COMMITS
            records = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
            self._commits: list[dict[str, Any]] = [read_json(folder / n) for n in records]
            self._files = {
                name: [
                    TableFile(
                        f"{self.storage.root}/"
                        + relative_name(c["tables"][name], source=COMMITS, what="table file"),
                        None,
                        None,
                    )
                    for c in self._commits
                    if c["tables"].get(name)
                ]
                for name in names
            }
            self._hidden: dict[str, set[int]] = {}
            return
        tables, self._hidden = snapshot(self.storage, names=names)
        self._versions = {name: log.version for name, log in tables.items()}
        # The snapshot as plain data: reads below never call delta-rs, so a Store works in
        # forked DataLoader workers (delta-rs' runtime does not survive a fork).
        self._files = {name: files_of(self.storage, name, log) for name, log in tables.items()}

    def _table_names(self) -> tuple[str, ...]:
        """The tables to snapshot: the built-in ones, then the store's plug-in tables.

        Plug-in tables' registrations (``analyses/*.json``) are read, and checked, when the store
        has any; a store without them opens without importing the schemas (:attr:`schemas`).
        """
        self._schemas: dict[str, pa.Schema] | None = None
        if self.read_only:
            return BUILTIN_TABLES
        if not registrations(self.storage.list(ANALYSES)):
            return BUILTIN_TABLES
        from attnstore.analyses import tables as plugin_tables

        self._schemas = plugin_tables.schemas(self.storage)
        return tuple(self._schemas)

    @property
    def schemas(self) -> dict[str, pa.Schema]:
        """Every table of this store: the built-in ones, then plug-in tables (analyses)."""
        if self._schemas is None:
            from attnstore import index

            self._schemas = dict(index.SCHEMAS)
        return self._schemas

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_lock=None, _arrays=OrderedDict(), _datasets={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _delta(self, name: str) -> DeltaTable | None:
        """Table ``name`` at this snapshot's version (for history and versions, not for reads)."""
        version = self._versions.get(name)
        if version is None:
            return None
        from attnstore.store.delta import open_table

        dt = open_table(self.storage, name)
        if dt is not None and dt.version() != version:
            dt.load_as_version(version)
        return dt

    @property
    def commits(self) -> list[dict[str, Any]]:
        """What each commit recorded (format 1: commit records; 2: one entry per flush)."""
        if self.read_only:
            return list(self._commits)
        docs = self._delta("docs")
        if docs is None:
            return []
        return [json.loads(e["attnstore"]) for e in reversed(docs.history()) if "attnstore" in e]

    def files(self, table: str) -> list[Path]:
        """The Parquet files the current snapshot of ``table`` reads."""
        if table not in self.schemas:
            raise ValueError(f"Expected a table in {list(self.schemas)}. Got {table!r} instead.")
        return [Path(f.path) for f in self._files.get(table, [])]

    def dataset(self, name: str) -> pads.Dataset:
        """Table ``name`` as a lazy pyarrow Dataset with exactly the current columns.

        Filters and projections passed to it (or pushed down by DuckDB) skip whole files by the
        ``doc_id`` statistics in the Delta log and row groups by the Parquet statistics.
        """
        if name not in self.schemas:
            raise ValueError(f"Expected a table in {list(self.schemas)}. Got {name!r} instead.")
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._make_dataset(name)
            self._datasets[name] = ds
        return ds

    def _make_dataset(self, name: str) -> pads.Dataset:
        from attnstore.store.tables import make_dataset

        return make_dataset(
            self.storage, self.schemas[name], self._files.get(name, []), self._hidden.get(name)
        )

    def table(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One table as a pyarrow Table (all committed rows; prefer :meth:`sql` for big tables)."""
        return self.dataset(name).to_table(columns=list(columns) if columns else None)

    def doc_ids(self) -> set[int]:
        """Every committed doc_id, stored or skipped."""
        column = self.dataset("docs").to_table(columns=["doc_id"])["doc_id"]
        return set(column.to_numpy().tolist())

    # -- tokens --------------------------------------------------------------------------------
    def _doc_tokens(self, doc_id: int, columns: list[str]) -> pa.Table:
        """``columns`` of one document's ``tokens`` rows in position order (a filtered read)."""
        import pyarrow.compute as pc

        rows = self.dataset("tokens").to_table(
            filter=pc.field("doc_id") == doc_id, columns=["pos", *columns]
        )
        return rows.sort_by("pos")

    def token_ids(self, doc_id: int) -> np.ndarray:
        """Token ids of one stored document, int64 ``[T]`` (a filtered read of ``tokens``)."""
        doc_id = int(doc_id)
        if self._lookup(doc_id) != "scores-only":
            self._location(doc_id)  # raises the clear error for unknown or skipped documents
        ids = self._doc_tokens(doc_id, ["token_id"])["token_id"].to_numpy()
        return np.asarray(ids, dtype=np.int64)

    def token_spans(self, doc_id: int) -> list[tuple[int, int] | None]:
        """Each stored token's ``(char_start, char_end)`` in the document text, in order.

        ``None`` for a token without a span (slow tokenizers, format 1.0); an empty list for a
        document with no stored tokens. A filtered read of ``tokens``, like :meth:`token_ids`.
        """
        rows = self._doc_tokens(int(doc_id), ["char_start", "char_end"])
        starts, ends = rows["char_start"].to_pylist(), rows["char_end"].to_pylist()
        return [None if a is None else (a, b) for a, b in zip(starts, ends, strict=True)]

    # -- SQL -----------------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run read-only SQL over the ``docs``, ``tokens`` and ``heads`` views."""
        from attnstore.query import run

        return run(self, query, params)

    # -- summary -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Counts, sizes and settings, as plain JSON-able data."""
        docs = self.table("docs", ["n_tokens", "skipped", "truncated", "segment"])
        n_tokens = np.asarray(docs["n_tokens"].to_numpy(zero_copy_only=False), dtype=np.int64)
        stored = np.asarray(docs["skipped"].is_null().to_numpy(zero_copy_only=False))
        segments = {s for s in set(docs["segment"].to_pylist()) if s is not None}

        seg_bytes = sum(  # the segments committed documents point at (names checked)
            size
            for s in segments
            for _, size in self.storage.walk(
                inside(self.storage, SEGMENTS, s, source="tables/docs", what="segment")
            )
        )
        total_bytes = sum(size for _, size in self.storage.walk(""))
        n_lh = len(self.manifest["layers"]) * len(self.manifest["heads"])
        dense_f32 = int((n_tokens[stored].astype(np.int64) ** 2).sum()) * n_lh * 4
        return {
            "path": str(self.path),
            "format_version": self.manifest["format_version"],
            "model": self.manifest["model"]["id"],
            "model_quantization": _model_quantization(self.manifest),
            "codec": self.manifest["codec"]["id"],
            "max_abs_error": self.manifest["codec"]["max_abs_error"],
            "layers": len(self.manifest["layers"]),
            "heads": len(self.manifest["heads"]),
            "commits": len(self._commits) if self.read_only else self._versions.get("docs", 0),
            "docs": int(stored.sum()),
            "docs_skipped": int((~stored).sum()),
            "docs_truncated": int(
                np.asarray(docs["truncated"].to_numpy(zero_copy_only=False)).sum()
            ),
            "tokens": int(n_tokens.sum()),
            "attention_bytes": seg_bytes,
            "store_bytes": total_bytes,
            "dense_float32_bytes": dense_f32,
            "ratio_vs_dense_float32": round(dense_f32 / seg_bytes, 2) if seg_bytes else None,
        }


def _model_quantization(manifest: Manifest) -> str | None:
    """``settings.model_quantization``, or for stores written before it, judged by the model id."""
    settings = manifest.get("settings") or {}
    if "model_quantization" in settings:
        return settings["model_quantization"]  # type: ignore[no-any-return]
    from attnstore.modelref import quantization

    return quantization(manifest["model"]["id"], inspect=False)
