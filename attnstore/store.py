"""A store on disk: attention in Zarr v3 segments, tables in Delta Lake, and read-back.

This is the only module that imports deltalake; zarr also in :mod:`attnstore.streaming` (a long
document's segment, written as its rows come). A segment is one Zarr v3 array
``[layer, head, packed]`` holding the packed lower triangles of its documents back to back (see
:mod:`attnstore.packing`), compressed with Blosc (zstd + byte shuffle) and written as a single shard:
one object, written once by one process. A document's matrices start at its ``offset`` in the
segment its ``docs`` row names.

Writing (format 2). :class:`StoreWriter` buffers batches and *flushes* every ``commit_every``
batches or ``commit_seconds`` seconds (checked when a batch arrives) and at :meth:`~StoreWriter.close`.
A flush, under the writer's ``app_id`` (``"shard-i-of-n"``, deterministic so reruns are idempotent):

1. writes the segment(s) of the buffered batches and one Parquet part per table, durable (fsync);
2. writes ``writers/<app_id>.json`` with the *intent*: flush version ``v``, its doc_ids and the
   Delta ``add`` actions per table;
3. commits each table's adds with the Delta application transaction ``(app_id, v)`` — every table
   but ``docs`` first, ``docs`` last (``docs`` is what makes the flush visible, and what resume reads);
4. clears the intent.

A crash anywhere leaves either nothing visible or a pending intent. Every writer that opens the
store, and ``compact``, rolls pending intents forward (idempotently: a table whose
``transaction_version(app_id)`` already is ``v`` is skipped). Readers take the ``docs`` snapshot
first and hide, in the other tables, the rows of a flush whose ``docs`` commit they do not see,
so no reader ever sees half a flush.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from attnstore import index
from attnstore.analyses import tables as plugin_tables
from attnstore.codecs import Codec, get_codec
from attnstore.errors import (
    IncompatibleStoreError,
    MatrixNotFoundError,
    StoreExistsError,
    StoreNotFoundError,
    StoreWriteError,
)
from attnstore.layout import (
    COMMITS,
    COMPAT_KEYS,
    FOLDER_FANOUT,
    FORMAT_NAME,
    LAYOUT_KEYS,
    MANIFEST_NAME,
    OVERVIEWS,
    SEGMENTS,
    TABLES_DIR,
    WRITERS,
    Manifest,
    check_manifest_fields,
    manifest_value,
    new_writer_id,
    parse_format_version,
    read_json,
    read_manifest,
)
from attnstore.overview import grid
from attnstore.packing import packed_size, row_index, unpack, unpack_logits, unpack_tril
from attnstore.rows import DocRows, RowSelection, RowsNotStoredError
from attnstore.segments import open_segment
from attnstore.storage import LocalStorage, Storage, is_url, open_storage

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from deltalake import DeltaTable

__all__ = [
    "DEFAULT_COMMIT_EVERY",
    "DEFAULT_COMMIT_SECONDS",
    "Segment",
    "Store",
    "StoreWriter",
    "app_id_for_shard",
    "commit_cadence",
]

#: Inner chunk length along the packed axis: 64 Ki values (128 KiB as uint16). One T=512 matrix
#: (131,328 values) spans 3 chunks, so one read decompresses at most ~400 KiB.
CHUNK: Final = 1 << 16
#: ``extract`` flushes every this many batches (``ATTNSTORE_COMMIT_EVERY`` overrides)...
DEFAULT_COMMIT_EVERY: Final = 64
#: ...or once this many seconds passed since the last flush (``ATTNSTORE_COMMIT_SECONDS``).
DEFAULT_COMMIT_SECONDS: Final = 30.0
#: Buffered matrices are written as one segment once they reach this many bytes (or at a flush).
SEGMENT_BYTES: Final = 64 << 20
#: A Delta commit that loses a race to another writer is retried this many times.
COMMIT_RETRIES: Final = 50
DEFAULT_APP_ID: Final = "shard-0-of-1"
_APP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def commit_cadence() -> tuple[int, float]:
    """``(commit_every, commit_seconds)`` for ``extract``: the defaults or the environment's."""
    every = os.environ.get("ATTNSTORE_COMMIT_EVERY")
    seconds = os.environ.get("ATTNSTORE_COMMIT_SECONDS")
    return (
        int(every) if every else DEFAULT_COMMIT_EVERY,
        float(seconds) if seconds else DEFAULT_COMMIT_SECONDS,
    )


def app_id_for_shard(index_: int, count: int) -> str:
    """The writer identity of shard ``index_`` of ``count`` (``--shard i/n``)."""
    return f"shard-{index_}-of-{count}"


@dataclass
class Segment:
    """One batch ready to commit: codes per document plus its table rows."""

    docs: dict[str, list[Any]]
    tokens: dict[str, Any]
    heads: dict[str, Any]
    #: per stored document, in ``docs`` order of non-skipped rows: ``[layer, head, packed]`` codes
    #: (packed: its stored rows, :class:`attnstore.rows.DocRows`), or a
    #: :class:`~attnstore.streaming.Streamed` document already written as its own segment
    codes: list[Any] = field(default_factory=list)
    #: ``--overview N``: per stored document, ``[layer, head, 2 (max, mean), M, M]`` float32
    overviews: list[np.ndarray] = field(default_factory=list)
    #: further tables by name: built-in ones (``words``, ``syntax``, …) as columns or tables, and
    #: the tables of analyses (pyarrow Tables; plug-in tables registered with the writer first)
    extra: dict[str, Any] = field(default_factory=dict)
    #: provenance of ``extra`` (e.g. the parser), recorded with the flush
    annotation: dict[str, Any] = field(default_factory=dict)


def _parquet_format() -> pads.ParquetFileFormat:
    """Parquet as every reader reads it: page checksums verified, so a flipped bit in a page fails
    the read instead of returning wrong values (every attnstore writer writes them)."""
    return pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(
            page_checksum_verification=True
        )
    )


@dataclass(frozen=True)
class _File:
    """One Parquet file of a table snapshot, with its ``doc_id`` range when known."""

    path: str
    min_doc: int | None
    max_doc: int | None


def _files_of(storage: Storage, name: str, dt: DeltaTable) -> list[_File]:
    from attnstore.paths import inside

    actions = pa.table(dt.get_add_actions(flatten=True))
    base = table_path(name)
    source = f"{base}/_delta_log"
    paths = [  # every add path checked: a store's log never makes a reader leave the store
        storage.arrow_path(
            storage.table_uri(inside(storage, base, p, source=source, what="add path", uri=True))
        )
        for p in actions["path"].to_pylist()
    ]
    if "min.doc_id" in actions.column_names:
        lows, highs = actions["min.doc_id"].to_pylist(), actions["max.doc_id"].to_pylist()
    else:
        lows = highs = [None] * len(paths)
    return [_File(p, lo, hi) for p, lo, hi in zip(paths, lows, highs, strict=True)]


@dataclass(frozen=True)
class _Location:
    segment: str
    offset: int
    n_tokens: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Fault injection for the crash tests: ``ATTNSTORE_CRASH_AT="commit:heads:3"`` kills this process
#: (SIGKILL, no clean-up) the 3rd time a flush reaches that point. Points, in flush order:
#: ``segment`` (a segment written), ``table:<name>`` (a Parquet part written), ``intent`` (the
#: intent recorded), ``commit:<name>`` (a Delta commit done; ``docs`` last), ``committed``.
FAULT_POINTS: Final = (
    "segment",
    "table:docs",
    "table:tokens",
    "table:heads",
    "intent",
    "commit:tokens",
    "commit:heads",
    "commit:docs",
    "committed",
)
_fault_counts: dict[str, int] = {}


def _fault(point: str) -> None:
    spec = os.environ.get("ATTNSTORE_CRASH_AT")
    if not spec:
        return
    where, _, nth = spec.rpartition(":")
    if where != point:
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] == int(nth):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_store_manifest(storage: Storage) -> Manifest:
    """Read and check the manifest of the store in ``storage`` (a folder or a URL)."""
    if isinstance(storage, LocalStorage):
        return read_manifest(storage.path)
    try:
        data = storage.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise StoreNotFoundError(
            f"No store at {storage.root!r}: it has no {MANIFEST_NAME}. "
            "Create one with `attnstore extract --out URL`."
        ) from None
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise StoreNotFoundError(f"Cannot read {MANIFEST_NAME} of {storage.root!r}: {err}.") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(
            f"{storage.root}/{MANIFEST_NAME} is not an attnstore manifest: "
            f'expected "format": "{FORMAT_NAME}".'
        )
    parse_format_version(doc.get("format_version"))
    check_manifest_fields(doc, f"{storage.root}/{MANIFEST_NAME}")
    return doc  # type: ignore[return-value]


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest file's bytes: indented, sorted keys, a final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _occupied(storage: Storage) -> bool:
    """True if the store's place holds anything but a writer's temporary files."""
    return any(not (n.startswith(".") and ".tmp-" in n) for n in storage.list(""))


def table_path(name: str) -> str:
    return f"{TABLES_DIR}/{name}"


def writer_path(app_id: str) -> str:
    return f"{WRITERS}/{app_id}.json"


def _read_state(storage: Storage, app_id: str) -> dict[str, Any]:
    rel = writer_path(app_id)
    if not storage.exists(rel):
        return {"app_id": app_id, "version": 0, "pending": None}
    state: dict[str, Any] = json.loads(storage.read_bytes(rel))
    return state


def _write_state(storage: Storage, state: dict[str, Any]) -> None:
    data = json.dumps(state, indent=1, sort_keys=True).encode() + b"\n"
    storage.write_bytes_atomic(writer_path(state["app_id"]), data)


def open_table(storage: Storage, name: str) -> DeltaTable | None:
    """The Delta table ``name`` of a format-2 store, or ``None`` if no writer created it yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        return DeltaTable(
            storage.table_uri(table_path(name)), storage_options=storage.storage_options
        )
    except TableNotFoundError:
        return None
    except DeltaError as err:
        raise _damaged_log(table_path(name), err) from None


def _damaged_log(rel: str, err: Exception) -> Exception:
    """One line for a Delta log delta-rs cannot read (it names Rust structures, not the problem)."""
    from attnstore.errors import DamagedStoreError

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


def _txn_version(table: DeltaTable | None, app_id: str) -> int:
    if table is None:
        return 0
    return table.transaction_version(app_id) or 0


def _commit_adds(
    storage: Storage,
    name: str,
    adds: list[dict[str, Any]],
    app_id: str,
    version: int,
    metadata: dict[str, str],
    cache: dict[str, DeltaTable] | None = None,
) -> None:
    """Commit ``adds`` to table ``name`` as transaction ``(app_id, version)``, exactly once."""
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, CommitProperties, RemoveAction, Transaction

    table = cache.get(name) if cache is not None else None
    if table is None:
        table = _ensure_table(storage, name)
        if cache is not None:
            cache[name] = table
    actions: list[AddAction | RemoveAction] = [
        AddAction(a["path"], a["size"], {}, a["modification_time"], True, a["stats"]) for a in adds
    ]
    for attempt in range(COMMIT_RETRIES):
        table.update_incremental()
        if _txn_version(table, app_id) >= version:
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


def _ensure_table(storage: Storage, name: str) -> DeltaTable:
    from deltalake import DeltaTable

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


def roll_forward(storage: Storage, app_id: str) -> bool:
    """Finish the pending flush of ``app_id`` (left by a crash), if any. True if there was one."""
    with storage.lock(f"{WRITERS}/{app_id}.lock"):
        state = _read_state(storage, app_id)
        pending = state.get("pending")
        if not pending:
            return False
        _commit_pending(storage, app_id, pending)
        state["pending"] = None
        _write_state(storage, state)
        return True


def _commit_pending(
    storage: Storage,
    app_id: str,
    pending: dict[str, Any],
    cache: dict[str, DeltaTable] | None = None,
) -> None:
    from attnstore.errors import UnsafeStorePathError
    from attnstore.paths import inside

    tables: dict[str, list[dict[str, Any]]] = pending["tables"]
    source = writer_path(app_id)
    known = set(index.SCHEMAS) | set(tables) & set(plugin_tables.registered(storage))
    for name, adds in tables.items():  # an intent is store metadata too: checked before commit
        if name not in known:  # a built-in table, or an analysis table registered in the store
            raise UnsafeStorePathError(f"{source}: unknown table {name!r} in the pending flush.")
        for a in adds:
            inside(storage, table_path(name), a["path"], source=source, what="add path", uri=True)
    metadata = {"attnstore": json.dumps(pending.get("record", {}), sort_keys=True)}
    order = [n for n in tables if n != "docs"] + ["docs"]
    for name in order:
        _commit_adds(
            storage, name, tables.get(name, []), app_id, pending["version"], metadata, cache
        )
        _fault(f"commit:{name}")


def roll_forward_all(storage: Storage) -> int:
    """Roll forward every writer's pending flush; the number finished."""
    apps = [n.removesuffix(".json") for n in storage.list(WRITERS) if n.endswith(".json")]
    return sum(roll_forward(storage, a) for a in apps)


class Store:
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
        self._arrays: OrderedDict[str, Any] = OrderedDict()
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
        #: every table of this store: the built-in ones, then plug-in tables (analyses)
        self.schemas: dict[str, pa.Schema] = plugin_tables.schemas(
            None if self.read_only else self.storage
        )
        self._locations: OrderedDict[int, _Location | str | None] = OrderedDict()
        self._overview_rows: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        if self.read_only:
            folder = Path(self.storage.root) / COMMITS
            names = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
            self._commits: list[dict[str, Any]] = [read_json(folder / n) for n in names]
            from attnstore.paths import relative_name

            self._files = {
                name: [
                    _File(
                        f"{self.storage.root}/"
                        + relative_name(c["tables"][name], source=COMMITS, what="table file"),
                        None,
                        None,
                    )
                    for c in self._commits
                    if c["tables"].get(name)
                ]
                for name in index.TABLES
            }
            self._hidden: dict[str, set[int]] = {}
            return
        tables, self._hidden = _snapshot(self.storage, names=tuple(self.schemas))
        self._versions = {name: dt.version() for name, dt in tables.items()}
        # The snapshot as plain data: reads below never call delta-rs again, so a Store works in
        # forked DataLoader workers (delta-rs' runtime does not survive a fork).
        self._files = {name: _files_of(self.storage, name, dt) for name, dt in tables.items()}

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
        schema = self.schemas[name]
        files = self._files.get(name, [])
        if not files:
            return pads.dataset(schema.empty_table())
        fmt = _parquet_format()
        doc_id = pc.field("doc_id")
        fragments = [
            fmt.make_fragment(
                f.path,
                filesystem=self.storage.arrow_filesystem(),
                partition_expression=pc.scalar(True)
                if f.min_doc is None or f.max_doc is None
                else (doc_id >= f.min_doc) & (doc_id <= f.max_doc),
            )
            for f in files
        ]
        # parts of an older minor may lack newer columns: the schema fills them with NULL
        ds: pads.Dataset = pads.FileSystemDataset(
            fragments, schema, fmt, self.storage.arrow_filesystem()
        )
        hidden = self._hidden.get(name)
        if hidden:
            ds = ds.filter(~doc_id.isin(pa.array(sorted(hidden), pa.int64())))
        return ds

    def table(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One table as a pyarrow Table (all committed rows; prefer :meth:`sql` for big tables)."""
        return self.dataset(name).to_table(columns=list(columns) if columns else None)

    def doc_ids(self) -> set[int]:
        """Every committed doc_id, stored or skipped."""
        column = self.dataset("docs").to_table(columns=["doc_id"])["doc_id"]
        return set(column.to_numpy().tolist())

    # -- matrices ----------------------------------------------------------------------------
    def _lookup(self, doc_id: int) -> _Location | str | None:
        """A stored document's location, the reason it has none, or None if it is not here."""
        with self._lock:
            if doc_id in self._locations:
                self._locations.move_to_end(doc_id)
                return self._locations[doc_id]
        rows = (
            self.dataset("docs")
            .to_table(
                filter=pc.field("doc_id") == doc_id,
                columns=["segment", "offset", "n_tokens", "skipped"],
            )
            .to_pylist()
        )
        found: _Location | str | None = None
        if rows:
            row = rows[0]
            if row["skipped"] is not None:
                found = f"skipped:{row['skipped']}"
            elif row["segment"] is None:
                found = "scores-only"
            else:
                found = _Location(row["segment"], int(row["offset"]), int(row["n_tokens"]))
        with self._lock:
            self._locations[doc_id] = found
            while len(self._locations) > 4096:  # bounded: flat memory over any corpus
                self._locations.popitem(last=False)
        return found

    def _location(self, doc_id: int) -> _Location:
        loc = self._lookup(doc_id)
        if isinstance(loc, _Location):
            return loc
        if loc == "scores-only":
            raise MatrixNotFoundError(
                f"doc_id {doc_id} has scores and tokens but no matrices: this store was "
                "extracted with --scores-only. Extract again without it to keep matrices."
            )
        if loc is not None:
            raise MatrixNotFoundError(
                f"doc_id {doc_id} was skipped at extraction ({loc.removeprefix('skipped:')}): "
                "it has no matrices."
            )
        ids = self.dataset("docs").to_table(columns=["doc_id"])["doc_id"]
        have = (
            f"{pc.min(ids).as_py()}…{pc.max(ids).as_py()} ({len(ids)} docs)" if len(ids) else "none"
        )
        raise MatrixNotFoundError(f"No doc_id {doc_id} in this store. Stored doc_ids: {have}.")

    def _array(self, segment: str, folder: str = SEGMENTS) -> Any:
        if self._pid != os.getpid():  # a forked worker: arrays opened before hold the parent's clients
            self._arrays, self._lock, self._pid = OrderedDict(), threading.Lock(), os.getpid()
        key = segment if folder == SEGMENTS else f"{folder}/{segment}"
        with self._lock:
            arr = self._arrays.get(key)
            if arr is not None:
                self._arrays.move_to_end(key)
                return arr
        from attnstore.paths import inside, local_files_inside

        rel = inside(self.storage, folder, segment, source="tables/docs", what="segment")
        local_files_inside(self.storage, rel, source="tables/docs", what="segment")
        arr = open_segment(self.storage.zarr_store(rel, read_only=True), rel)
        with self._lock:
            self._arrays[key] = arr
            while len(self._arrays) > 256:
                self._arrays.popitem(last=False)
        return arr

    def _check_layer_head(self, layer: int, head: int) -> int:
        if layer not in self._layer_pos:
            raise MatrixNotFoundError(
                f"No layer {layer} in this store. Stored layers: {self.manifest['layers']}."
            )
        if head not in self.manifest["heads"]:
            raise MatrixNotFoundError(
                f"No head {head} in this store. Stored heads: {self.manifest['heads']}."
            )
        return self._layer_pos[layer]

    def packed(
        self, doc_id: int, layer: int, head: int, *, decode: bool = True, values: str = "probs"
    ) -> np.ndarray:
        """One head's packed values (lower triangle; whole square in bidirectional stores):
        float32 probabilities, or raw codes with ``decode=False``.

        In a store with ``--rows``, the packed values of the stored rows only
        (:meth:`stored_rows`; row ``r`` holds keys ``0 … r``, rows in increasing order).

        ``values="logits"`` (stores extracted with ``--values logits``): the pre-softmax scores
        (masked entries −inf); the probabilities of such a store are ``exp(logit − lse)`` with
        each row's stored log-sum-exp, exactly the model's (rows of models with learned sinks
        keep their sum below 1). Raw codes (``decode=False``) of such a store hold the packed
        logits followed by the ``T`` row LSEs.
        """
        if self._plain:  # causal probabilities: only the stored rows (--rows)
            stored = self._stored_codes(doc_id, layer, head)
            if decode:
                self._values(stored[..., :0], 0, values)  # refuses logits of a probs store
                return self.codec.decode(stored)
            return stored
        li = self._check_layer_head(layer, head)
        loc = self._location(int(doc_id))
        hi = self._head_pos[head]
        size = packed_size(loc.n_tokens, self.packing)
        extra = loc.n_tokens if self.values == "logits" else 0
        codes: np.ndarray = self._array(loc.segment)[li, hi, loc.offset : loc.offset + size + extra]
        if not decode:
            return codes
        return self._values(self.codec.decode(codes), loc.n_tokens, values)

    @property
    def values(self) -> str:
        """What the matrices hold: ``"probs"``, or ``"logits"`` (``extract --values logits``)."""
        return str(manifest_value(self.manifest, "values"))

    def _values(self, decoded: np.ndarray, n: int, values: str) -> np.ndarray:
        """Decoded codes ``[..., size (+ n)]`` → packed probabilities or logits ``[..., size]``."""
        if values not in ("probs", "logits"):
            raise ValueError(f"Expected values 'probs' or 'logits'. Got {values!r} instead.")
        if self.values != "logits":
            if values == "logits":
                raise MatrixNotFoundError(
                    "This store holds probabilities only: extract with --values logits (and a "
                    "float codec) to keep the pre-softmax scores."
                )
            return decoded
        size = packed_size(n, self.packing)
        logits, lse = decoded[..., :size], decoded[..., size:]
        if values == "logits":
            return logits
        rows = row_index(n, self.packing)
        with np.errstate(under="ignore"):
            probs: np.ndarray = np.exp(
                logits.astype(np.float64) - lse[..., rows].astype(np.float64)
            ).astype(np.float32)
        return probs

    @property
    def packing(self) -> str:
        """``"tril-rowmajor"`` (causal triangles) or ``"full-rowmajor"`` (encoders' squares)."""
        return str(self.manifest.get("packing") or "tril-rowmajor")

    @property
    def bidirectional(self) -> bool:
        """Whether the store holds an encoder's bidirectional attention (whole squares)."""
        return bool(manifest_value(self.manifest, "attention") == "bidirectional")

    @property
    def _plain(self) -> bool:
        """Causal probabilities (the packed triangle, rows selectable): not an encoder's squares,
        not ``--values logits``."""
        return self.packing == "tril-rowmajor" and self.values == "probs"

    def _stored_codes(self, doc_id: int, layer: int, head: int) -> np.ndarray:
        li = self._check_layer_head(layer, head)
        loc = self._location(int(doc_id))
        length = self._doc_rows(loc.n_tokens).length
        codes: np.ndarray = self._array(loc.segment)[
            li, self._head_pos[head], loc.offset : loc.offset + length
        ]
        return codes

    def _doc_rows(self, n_tokens: int) -> DocRows:
        return _doc_rows(self.row_selection, n_tokens)

    def n_tokens(self, doc_id: int) -> int:
        """``T`` of a stored document (a cached look-up; no matrix is read)."""
        return self._location(int(doc_id)).n_tokens

    def stored_rows(self, doc_id: int) -> np.ndarray:
        """The query rows stored for ``doc_id`` (every row unless the store has ``--rows``)."""
        return self._doc_rows(self._location(int(doc_id)).n_tokens).rows

    def _row_range(self, rows: slice | None, n: int) -> tuple[int, int]:
        if rows is None:
            return 0, n
        if not isinstance(rows, slice):
            raise TypeError(f"Expected rows=slice(start, stop). Got {rows!r}.")
        start, stop, step = rows.indices(n)
        if step != 1:
            raise ValueError(f"Expected rows=slice(start, stop) with step 1. Got {rows!r}.")
        return start, max(start, stop)

    def _read_rows(
        self, doc_id: int, li: slice | int, hi: slice | int, rows: slice | None
    ) -> tuple[np.ndarray, int, int, int]:
        """Decoded packed values of rows ``a … b`` (only the chunks holding them are read)."""
        loc = self._location(int(doc_id))
        n = loc.n_tokens
        a, b = self._row_range(rows, n)
        doc_rows = self._doc_rows(n)
        if rows is None and not doc_rows.every:
            raise RowsNotStoredError(
                f"doc_id {doc_id}: this store keeps only query rows {doc_rows.describe()} "
                f"(--rows {self.row_selection}); read them with rows=slice(start, stop)."
            )
        lo, end = doc_rows.require(a, b)
        if end == lo:  # no rows: nothing to read (zarr refuses empty selections)
            lead = [x for x in (li, hi) if isinstance(x, slice)]
            shape = [len(self.manifest["layers"]), len(self.manifest["heads"])][: len(lead)]
            return np.zeros((*shape, 0), dtype=np.float32), n, a, b
        codes = self._array(loc.segment)[li, hi, loc.offset + lo : loc.offset + end]
        return self.codec.decode(codes), n, a, b

    def overview(self, doc_id: int, layer: int, head: int, kind: str = "max") -> np.ndarray:
        """The ``--overview N`` picture of one head: float32 ``[M, M]``, ``M = ⌈T / b⌉ ≤ N``.

        Cell ``(i, j)`` pools query rows ``i·b … (i+1)·b − 1`` and keys likewise, ``b = ⌈T / N⌉``:
        ``kind="max"`` their largest probability, ``"mean"`` their summed mass divided by the
        number of query rows (each row sums to 1). See :meth:`overview_grid` for ``b`` and ``M``.
        """
        if kind not in ("max", "mean"):
            raise ValueError(f"Expected kind 'max' or 'mean'. Got {kind!r}.")
        li = self._check_layer_head(layer, head)
        info = self.overview_grid(doc_id)
        m = info["n_blocks"]
        arr = self._array(info["array"], OVERVIEWS)
        values = arr[li, self._head_pos[head], ("max", "mean").index(kind),
                     info["offset"] : info["offset"] + m * m]  # fmt: skip
        return np.asarray(values, dtype=np.float32).reshape(m, m)

    def overview_grid(self, doc_id: int) -> dict[str, Any]:
        """Where and how one document's overviews are: ``size`` (N), ``block`` (b), ``n_blocks``
        (M), ``array`` and ``offset``; :class:`MatrixNotFoundError` if it has none."""
        doc_id = int(doc_id)
        key = ("overview", doc_id)
        with self._lock:
            hit = self._overview_rows.get(key)
        if hit is None:
            rows = self.dataset("overviews").to_table(filter=pc.field("doc_id") == doc_id).to_pylist()
            if not rows:
                if not self.manifest.get("overview"):
                    raise MatrixNotFoundError(
                        "This store has no overviews: extract with --overview N to write them."
                    )
                self._location(doc_id)  # the clear error for unknown or skipped documents
                raise MatrixNotFoundError(f"doc_id {doc_id} has no overview in this store.")
            hit = rows[0]
            with self._lock:
                self._overview_rows[key] = hit
                while len(self._overview_rows) > 4096:
                    self._overview_rows.popitem(last=False)
        return dict(hit)

    def _doc_tokens(self, doc_id: int, columns: list[str]) -> pa.Table:
        """``columns`` of one document's ``tokens`` rows in position order (a filtered read)."""
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

    def matrix(
        self,
        doc_id: int,
        layer: int,
        head: int,
        values: str = "probs",
        *,
        rows: slice | None = None,
    ) -> np.ndarray:
        """One head's attention for one document: float32 ``[T, T]``, zeros above the diagonal
        (a whole square in bidirectional stores). ``values="logits"``: the pre-softmax scores of
        a store extracted with ``--values logits``, −inf where masked or not stored.

        ``rows=slice(a, b)``: only query rows ``a … b − 1``, float32 ``[b − a, T]``, reading only
        the chunks that hold them (causal probability stores; the others decode the head and
        slice it). Rows the store did not keep (``--rows``) raise
        :class:`~attnstore.rows.RowsNotStoredError`.
        """
        if not self._plain:
            n = self._location(int(doc_id)).n_tokens
            packed = self.packed(doc_id, layer, head, values=values)
            full = (
                unpack_logits(packed, n, self.packing)
                if values == "logits"
                else unpack(packed, n, self.packing)
            )
            return full if rows is None else full[rows]
        self._values(np.zeros(0, dtype=np.float32), 0, values)  # refuses logits of a probs store
        li = self._check_layer_head(layer, head)
        got, n, a, b = self._read_rows(doc_id, li, self._head_pos[head], rows)
        if a == 0 and b == n:
            return unpack_tril(got, n)
        return _unpack_rows(got, n, a, b)

    def matrices(
        self, doc_id: int, values: str = "probs", *, rows: slice | None = None
    ) -> np.ndarray:
        """Every stored head of one document: float32 ``[layer, head, T, T]`` (or ``[…, b − a, T]``
        with ``rows=slice(a, b)``; ``values`` as in :meth:`matrix`)."""
        if not self._plain:
            loc = self._location(int(doc_id))
            size = packed_size(loc.n_tokens, self.packing)
            extra = loc.n_tokens if self.values == "logits" else 0
            codes = self._array(loc.segment)[:, :, loc.offset : loc.offset + size + extra]
            packed = self._values(self.codec.decode(codes), loc.n_tokens, values)
            full = (
                unpack_logits(packed, loc.n_tokens, self.packing)
                if values == "logits"
                else unpack(packed, loc.n_tokens, self.packing)
            )
            return full if rows is None else full[..., rows, :]
        self._values(np.zeros(0, dtype=np.float32), 0, values)
        got, n, a, b = self._read_rows(doc_id, slice(None), slice(None), rows)
        if a == 0 and b == n:
            return unpack_tril(got, n)
        return _unpack_rows(got, n, a, b)

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
        segments = {s for s in pc.unique(docs["segment"]).to_pylist() if s is not None}
        from attnstore.paths import inside

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


@functools.lru_cache(maxsize=64)
def _doc_rows(selection: RowSelection | None, n_tokens: int) -> DocRows:
    return DocRows.of(selection, n_tokens)


@functools.lru_cache(maxsize=64)
def _rows_index(n: int, a: int, b: int) -> np.ndarray:
    """Flat indices into ``[b − a, n]`` of the packed values of rows ``a … b − 1``."""
    lengths = np.arange(a + 1, b + 1, dtype=np.int64)
    local = np.repeat(np.arange(b - a, dtype=np.int64), lengths)
    offs = np.cumsum(lengths) - lengths
    cols = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offs, lengths)
    index: np.ndarray = local * n + cols
    index.setflags(write=False)
    return index


def _unpack_rows(values: np.ndarray, n: int, a: int, b: int) -> np.ndarray:
    """Packed values of consecutive rows ``a … b − 1`` (leading axes kept) → ``[..., b − a, n]``."""
    out = np.zeros((*values.shape[:-1], (b - a) * n), dtype=np.float32)
    out[..., _rows_index(n, a, b)] = values
    return out.reshape(*values.shape[:-1], b - a, n)


def _snapshot(
    storage: Storage, attempts: int = 20, names: Sequence[str] = index.TABLES
) -> tuple[dict[str, DeltaTable], dict[str, set[int]]]:
    """Consistent table snapshots: ``docs`` first, then the others, plus the doc_ids to hide.

    A table may be ahead of ``docs`` for an app only by a flush whose ``docs`` commit is still to
    come (or was interrupted): its intent in ``writers/<app>.json`` lists the doc_ids to hide. If a
    flush raced past between the snapshots, the snapshots are taken again.
    """
    hidden: dict[str, set[int]] = {}
    tables: dict[str, DeltaTable] = {}
    for _ in range(attempts):
        tables, hidden = {}, {}
        docs = open_table(storage, "docs")
        if docs is not None:
            tables["docs"] = docs
        for name in names:
            if name != "docs" and (dt := open_table(storage, name)) is not None:
                tables[name] = dt
        apps = [n.removesuffix(".json") for n in storage.list(WRITERS) if n.endswith(".json")]
        consistent = True
        for app in apps:
            seen = _txn_version(docs, app)
            ahead = {
                n: v
                for n, dt in tables.items()
                if n != "docs" and (v := _txn_version(dt, app)) > seen
            }
            if not ahead:
                continue
            pending = _read_state(storage, app).get("pending") or {}
            if all(v == pending.get("version") == seen + 1 for v in ahead.values()):
                ids = set(pending.get("doc_ids", ()))
                for n in ahead:
                    hidden.setdefault(n, set()).update(ids)
            else:
                consistent = False
        if consistent:
            return tables, hidden
        time.sleep(0.01)
    # A flush keeps racing past: hide every row whose document docs does not list.
    visible = (
        set(tables["docs"].to_pyarrow_dataset().to_table(columns=["doc_id"])["doc_id"].to_pylist())
        if "docs" in tables
        else set()
    )
    for name, dt in tables.items():
        if name != "docs":
            ids = dt.to_pyarrow_dataset().to_table(columns=["doc_id"])["doc_id"].to_pylist()
            hidden[name] = set(ids) - visible
    return tables, hidden


class StoreWriter:
    """Adds batches to a store; any number of writers (processes) per store.

    Parameters
    ----------
    path
        Store folder or URL, or an opened :class:`~attnstore.storage.Storage` (a
        :attr:`Store.storage`, with its options). Created with ``manifest`` if missing or empty; if it already holds a store,
        its manifest must agree with ``manifest`` on :data:`~attnstore.layout.COMPAT_KEYS`
        unless ``allow_different`` is set.
    app_id
        This writer's identity in the Delta application transactions (``"shard-i-of-n"``). Two
        processes may share one; their flushes then take turns.
    commit_every, commit_seconds
        Flush after this many batches, or once this many seconds passed since the last flush
        (checked as batches arrive); :meth:`close` flushes the rest. The default, 1, commits every
        batch as it comes; ``extract`` uses :func:`commit_cadence`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        manifest: Manifest,
        *,
        allow_different: bool = False,
        app_id: str = DEFAULT_APP_ID,
        commit_every: int = 1,
        commit_seconds: float | None = None,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        if isinstance(path, (str, os.PathLike)):
            self.storage: Storage = open_storage(path, storage_options)
        else:  # an opened storage (a Store's): its options come with it
            self.storage = path
            path = path.root
        self.path: Path | str = self.storage.root if is_url(path) else Path(path)
        if not _APP_ID.match(app_id):
            raise ValueError(
                f"Expected an app_id of letters, digits, '.', '_', '-'. Got {app_id!r}."
            )
        if commit_every < 1:
            raise ValueError(f"commit_every must be ≥ 1. Got {commit_every}.")
        self.app_id = app_id
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.writer_id = new_writer_id()
        self._counter = 0
        self._name_lock = threading.Lock()  # names are taken by the writer thread and streams
        if isinstance(self.path, Path) and self.path.exists() and not self.path.is_dir():
            raise StoreExistsError(
                f"Cannot write a store at {str(self.path)!r}: it is a file. Choose another --out."
            )
        # The manifest comes first: a place holding only a manifest is a valid empty store, so a
        # crash right after creation leaves something the same command can resume. It is created
        # only if absent (a conditional PUT, a hard link), so of several writers creating one store
        # at once exactly one writes it and the others adopt it.
        if self.storage.exists(MANIFEST_NAME):
            self.manifest = self._adopt(manifest, allow_different)
        elif _occupied(self.storage) and not self.storage.exists(MANIFEST_NAME):
            raise StoreExistsError(
                f"{str(self.path)!r} exists, is not empty and is not an attnstore store. "
                "Choose another --out (attnstore never writes into another program's folder)."
            )
        elif self.storage.create_bytes(MANIFEST_NAME, manifest_bytes(manifest)):
            self.manifest = manifest
        else:  # another writer created the store a moment ago
            self.manifest = self._adopt(manifest, allow_different)
        self.codec = get_codec(self.manifest["codec"])
        self._manifest_sha256 = hashlib.sha256(self.storage.read_bytes(MANIFEST_NAME)).hexdigest()
        # Flushes interrupted by a crash (of any writer) are finished before anything new is added,
        # so a rerun never commits a document twice.
        roll_forward_all(self.storage)
        self._buffer: list[Segment] = []  # batches not yet flushed
        self._unsegmented = 0  # of those, the last ones whose matrices are not written yet
        self._buffered_bytes = 0
        self._last_flush = time.monotonic()
        self.flushes = 0
        self.closed = False
        self._tables: dict[str, DeltaTable] = {}  # opened once, updated before each commit
        self._plugin_specs = plugin_tables.registered(self.storage)
        # Leftovers of crashed writers (unreferenced segments and parts, '.tmp-' files) are ignored
        # by every reader and reported by `attnstore verify`; `attnstore compact` removes old ones.

    def _adopt(self, manifest: Manifest, allow_different: bool) -> Manifest:
        """The existing store's manifest, once checked against the requested one."""
        existing = read_store_manifest(self.storage)
        if parse_format_version(existing["format_version"])[0] < 2:
            raise IncompatibleStoreError(
                f"The store at {str(self.path)!r} has format {existing['format_version']}, "
                "which this attnstore reads but does not write. Convert it with "
                f"`attnstore migrate {self.path} NEW` and write to NEW."
            )
        have = {k: manifest_value(existing, k) for k in COMPAT_KEYS}
        want = {k: manifest_value(manifest, k) for k in COMPAT_KEYS}
        diffs = [k for k in COMPAT_KEYS if have[k] != want[k]]
        detail = "; ".join(f"{k}: store has {have[k]!r}, requested {want[k]!r}" for k in diffs)
        if any(k in LAYOUT_KEYS for k in diffs):
            raise IncompatibleStoreError(
                f"The store at {str(self.path)!r} was written with another layout ({detail}). "
                "A store holds one codec and one layer/head selection: write to a new --out."
            )
        if diffs and not allow_different:
            raise IncompatibleStoreError(
                f"The store at {str(self.path)!r} was written with other settings ({detail}). "
                "Write to a new --out, or pass --allow-different to add these documents anyway."
            )
        return existing

    def _next_name(self) -> str:
        with self._name_lock:
            n = self._counter
            self._counter += 1
        return f"{self.writer_id}/{n // FOLDER_FANOUT:05d}/{n:09d}"

    def stream(self, n_tokens: int) -> Any:
        """A :class:`~attnstore.streaming.DocStream` for one long document of ``n_tokens``.

        Its segment (``[layer, head, stored rows]``) is written as the rows come, by the caller's
        thread; the document joins a flush (and becomes visible) when its
        :class:`~attnstore.streaming.Streamed` handle arrives in :attr:`Segment.codes`.
        """
        from attnstore.streaming import DocStream

        rows = DocRows.of(RowSelection.parse(self.manifest.get("rows")), n_tokens)
        shape = (len(self.manifest["layers"]), len(self.manifest["heads"]), rows.length)
        name = self._next_name()
        return DocStream(self.storage, f"{SEGMENTS}/{name}", name, shape, self.codec, _fault)

    # -- public ------------------------------------------------------------------------------
    def register(self, specs: Iterable[plugin_tables.TableSpec]) -> None:
        """Record plug-in tables in the store before a batch with their rows is committed
        (:func:`attnstore.analyses.tables.register`: a name taken with another schema is refused)."""
        specs = list(specs)
        plugin_tables.register(self.storage, specs)
        self._plugin_specs.update({s.name: s for s in specs})

    def commit(self, segment: Segment) -> None:
        """Add one batch; it becomes visible at the next flush (at once with ``commit_every=1``)."""
        if self.closed:
            raise StoreWriteError("This StoreWriter is closed; open a new one to add batches.")
        self._buffer.append(segment)
        self._unsegmented += 1
        self._buffered_bytes += sum(c.nbytes for c in segment.codes) + sum(
            o.nbytes for o in segment.overviews
        )
        try:
            if self._buffered_bytes >= SEGMENT_BYTES:
                self._write_segment()
            due = self.commit_seconds is not None and (
                time.monotonic() - self._last_flush >= self.commit_seconds
            )
            if len(self._buffer) >= self.commit_every or due:
                self._flush()
        except _write_errors() as err:
            self._fail(err)

    def flush(self) -> None:
        """Commit every buffered batch now."""
        if self._buffer:
            try:
                self._flush()
            except _write_errors() as err:
                self._fail(err)

    def close(self) -> None:
        """Flush and stop accepting batches."""
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _fail(self, err: Exception) -> None:
        ids = [int(d) for s in self._buffer for d in s.docs.get("doc_id", ())]
        what = f"doc_ids {min(ids)}…{max(ids)}" if ids else "annotations"
        self._buffer, self._unsegmented, self._buffered_bytes = [], 0, 0
        raise StoreWriteError(
            f"Writing the batches since the last commit ({what}) to {str(self.path)!r} failed: "
            f"{getattr(err, 'strerror', None) or err}. Nothing of them was committed and earlier commits are "
            "intact; fix the cause and rerun the same command to resume."
        ) from err

    def _table(self, name: str, parts: list[Any]) -> pa.Table:
        """One table's rows of the flushed batches: built-in columns, or analyses' tables."""
        if not any(isinstance(p, pa.Table) for p in parts):
            return index.table_from_columns(name, _concat_columns(parts))
        spec = self._plugin_specs.get(name)
        if spec is None and name in index.SCHEMAS:
            spec = plugin_tables.TableSpec(name, index.SCHEMAS[name], index.SORT_KEYS[name], "")
            parts = [
                p if isinstance(p, pa.Table) else index.table_from_columns(name, p) for p in parts
            ]
        if spec is None:
            raise StoreWriteError(
                f"Table {name!r} is neither built-in nor registered with this writer "
                "(StoreWriter.register)."
            )
        return plugin_tables.build_table(spec, parts)

    def _write_segment(self) -> None:
        """Write the matrices of the batches not yet in a segment as one Zarr array."""
        from attnstore.streaming import Streamed

        first = len(self._buffer) - self._unsegmented
        self._unsegmented = 0
        self._write_overviews(first)
        batches = self._buffer[first:]
        codes = [c for s in batches for c in s.codes if not isinstance(c, Streamed)]
        if not any(s.codes for s in batches):
            self._buffered_bytes = 0
            return
        name = self._next_name() if codes else ""
        lengths = [c.shape[-1] for c in codes]
        starts = iter(np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist())
        if codes:
            self._write_array(name, np.concatenate(codes, axis=-1))
        for i, s in enumerate(batches, start=first):
            if not s.docs or not s.codes:
                continue
            handles = iter(s.codes)
            places: list[tuple[str, int] | None] = []
            for sk in s.docs["skipped"]:
                if sk is not None:
                    places.append(None)
                    continue
                c = next(handles)
                places.append((c.segment, 0) if isinstance(c, Streamed) else (name, next(starts)))
            docs = {**s.docs, "segment": [None if p is None else p[0] for p in places],
                    "offset": [None if p is None else int(p[1]) for p in places]}  # fmt: skip
            self._buffer[i] = dataclasses.replace(s, docs=docs, codes=[])  # the caller's stays
        self._buffered_bytes = 0

    def _write_overviews(self, first: int) -> None:
        """One ``overviews/<name>`` array ``[layer, head, 2, cells]`` for the overviews of the
        buffered batches from ``first`` on, and their rows of the ``overviews`` table
        (schemas/README.md, format 2.1)."""
        batches = self._buffer[first:]
        if not any(s.overviews for s in batches):
            return
        name = self._next_name()
        size = int(self.manifest.get("overview") or 0)
        flat = [o.reshape(*o.shape[:3], -1) for s in batches for o in s.overviews]
        data = np.concatenate(flat, axis=-1)
        n_layers, n_heads, n_kinds, total = data.shape
        chunk = min(CHUNK, total)
        rel = f"{OVERVIEWS}/{name}"
        arr = zarr.create_array(
            store=self.storage.zarr_store(rel, read_only=False),
            shape=data.shape,
            dtype=data.dtype,
            chunks=(1, 1, n_kinds, chunk),
            shards=(n_layers, n_heads, n_kinds, -(-total // chunk) * chunk),
            compressors=[BloscCodec(**self.codec.compressor), Crc32cCodec()],
            fill_value=0,
            zarr_format=3,
            attributes={"attnstore": {"overview": size, "kinds": ["max", "mean"]}},
        )
        arr[...] = data
        self.storage.sync(rel)
        offset = 0
        for i, s in enumerate(batches, start=first):
            if not s.overviews:
                continue
            stored = [(d, n) for d, n, sk in zip(s.docs["doc_id"], s.docs["n_tokens"],
                                                 s.docs["skipped"], strict=True) if sk is None]  # fmt: skip
            rows: dict[str, list[Any]] = {
                k: [] for k in ("doc_id", "size", "block", "n_blocks", "array", "offset")
            }
            for (doc_id, n), o in zip(stored, s.overviews, strict=True):
                m = o.shape[-1]
                rows["doc_id"].append(int(doc_id))
                rows["size"].append(size)
                rows["block"].append(grid(int(n), size)[0])
                rows["n_blocks"].append(m)
                rows["array"].append(name)
                rows["offset"].append(offset)
                offset += m * m
            self._buffer[i] = dataclasses.replace(
                s, overviews=[], extra={**s.extra, "overviews": rows}
            )

    def _write_array(self, name: str, data: np.ndarray) -> None:
        """The segment ``segments/<name>``: codes ``[layer, head, packed]`` as one shard."""
        n_layers, n_heads, total = data.shape
        shard = -(-total // CHUNK) * CHUNK
        rel = f"{SEGMENTS}/{name}"
        arr = zarr.create_array(
            store=self.storage.zarr_store(rel, read_only=False),
            shape=data.shape,
            dtype=data.dtype,
            chunks=(1, 1, min(CHUNK, shard)),
            shards=(n_layers, n_heads, shard),
            # crc32c per chunk: a flipped bit fails the read instead of returning wrong values
            compressors=[BloscCodec(**self.codec.compressor), Crc32cCodec()],
            fill_value=0,
            zarr_format=3,
            attributes={
                "attnstore": {
                    "packing": self.manifest.get("packing") or "tril-rowmajor",
                    "codec": self.codec.get_config(),
                }
            },
        )
        arr[...] = data
        self.storage.sync(rel)
        _fault("segment")

    def _flush(self) -> None:
        self._write_segment()
        batches, self._buffer = self._buffer, []
        to_write: dict[str, list[dict[str, Any]]] = {}
        for s in batches:
            if s.docs:  # a batch of documents (an annotation-only batch has none)
                docs = dict(s.docs)
                n = len(docs.get("doc_id", ()))
                docs.setdefault("segment", [None] * n)
                docs.setdefault("offset", [None] * n)
                for name, cols in (("docs", docs), ("tokens", s.tokens), ("heads", s.heads)):
                    to_write.setdefault(name, []).append(cols)
            for name, cols in s.extra.items():
                to_write.setdefault(name, []).append(cols)
        part = self._next_name()
        adds: dict[str, list[dict[str, Any]]] = {}
        doc_ids: set[int] = set()
        tables = {n: self._table(n, c) for n, c in to_write.items()}
        # The claim check (attnstore.lease): documents another writer already committed are
        # dropped, so no document is ever stored twice.
        new_docs = set(tables["docs"]["doc_id"].to_pylist()) if "docs" in tables else set()
        checked: set[str] = set()  # docs parts read by the first check (immutable: not re-read)
        taken = _committed(self.storage, self._tables, new_docs, checked)
        if taken:
            drop = pa.array(sorted(taken), pa.int64())
            tables = {
                n: t.filter(pc.invert(pc.is_in(t["doc_id"], value_set=drop)))
                for n, t in tables.items()
            }
            new_docs -= taken
            if not any(t.num_rows for t in tables.values()):  # every document was taken
                self._last_flush = time.monotonic()
                return
        for name, table in tables.items():
            if table.num_rows == 0 and name != "docs":
                continue
            doc_ids.update(table["doc_id"].to_pylist())
            rel = f"{part}.parquet"
            part_rel = f"{table_path(name)}/{rel}"
            if isinstance(self.storage, LocalStorage):
                local = self.storage.local_path(part_rel)
                index.write_part(table, local)
                stat = local.stat()
            else:  # object storage: write the part here, then upload it whole
                with tempfile.TemporaryDirectory(prefix="attnstore-part-") as tmp:
                    local = Path(tmp) / "part.parquet"
                    index.write_part(table, local)
                    stat = local.stat()
                    self.storage.upload(part_rel, local)
            adds[name] = [{
                "path": rel, "size": stat.st_size, "modification_time": int(stat.st_mtime * 1000),
                "stats": index.part_stats(table),
            }]  # fmt: skip
            _fault(f"table:{name}")
        annotation: dict[str, Any] = {}
        for s in batches:
            annotation.update(s.annotation)
        with self.storage.lock(f"{WRITERS}/{self.app_id}.lock"):
            state = _read_state(self.storage, self.app_id)
            if state.get("pending"):  # a crashed process with our app_id left one
                _commit_pending(self.storage, self.app_id, state["pending"], self._tables)
            docs_table = self._tables.get("docs") or open_table(self.storage, "docs")
            if docs_table is not None:
                docs_table.update_incremental()
            seen = _txn_version(docs_table, self.app_id)
            raced = _committed(self.storage, self._tables, new_docs, checked)
            if raced:  # committed by another writer while this flush wrote its parts
                raise StoreWriteError(
                    f"doc_ids {_span(raced)} were committed by another writer of this store "
                    f"while {self.app_id} was writing them; this flush is refused so that no "
                    "document is stored twice"
                )
            version = max(int(state.get("version", 0)), seen) + 1
            record = {
                "app_id": self.app_id, "version": version, "writer": self.writer_id,
                "created_at": _now(), "n_doc_ids": len(doc_ids), **annotation,
            }  # fmt: skip
            state = {
                "app_id": self.app_id,
                "version": version,
                "manifest_sha256": self._manifest_sha256,
                "pending": {
                    "version": version,
                    "doc_ids": sorted(doc_ids),
                    "tables": adds,
                    "record": record,
                },
            }
            _write_state(self.storage, state)
            _fault("intent")
            _commit_pending(self.storage, self.app_id, state["pending"], self._tables)
            state["pending"] = None
            _write_state(self.storage, state)
            _fault("committed")
        self.flushes += 1
        self._last_flush = time.monotonic()


def _committed(
    storage: Storage, cache: dict[str, DeltaTable], doc_ids: set[int], checked: set[str]
) -> set[int]:
    """Those of ``doc_ids`` whose ``docs`` row is committed (a filtered read of the latest log),
    reading only parts not in ``checked`` (which gets the parts read added)."""
    if not doc_ids:
        return set()
    dt = cache.get("docs") or open_table(storage, "docs")
    if dt is None:
        return set()
    cache["docs"] = dt
    dt.update_incremental()
    files = _files_of(storage, "docs", dt)
    lo, hi = min(doc_ids), max(doc_ids)
    paths = [
        f.path
        for f in files
        if f.path not in checked
        and (f.min_doc is None or f.max_doc is None or (f.min_doc <= hi and f.max_doc >= lo))
    ]
    checked.update(paths)
    if not paths:
        return set()
    ds = pads.dataset(paths, format=_parquet_format(), filesystem=storage.arrow_filesystem())
    wanted = pa.array(sorted(doc_ids), pa.int64())
    found = ds.to_table(columns=["doc_id"], filter=pc.field("doc_id").isin(wanted))["doc_id"]
    return set(found.to_pylist())


def _span(ids: set[int]) -> str:
    return f"{min(ids)}…{max(ids)} ({len(ids)})" if len(ids) > 1 else str(next(iter(ids)))


def _write_errors() -> tuple[type[Exception], ...]:
    from deltalake.exceptions import DeltaError

    return (OSError, DeltaError)


def _concat_columns(column_sets: list[dict[str, Any]]) -> dict[str, Any]:
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


def delta_tables(storage: Storage) -> Iterable[tuple[str, DeltaTable]]:
    """Every existing Delta table of a format-2 store (built-in and plug-in tables)."""
    for name in plugin_tables.schemas(storage):
        dt = open_table(storage, name)
        if dt is not None:
            yield name, dt
