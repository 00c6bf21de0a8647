"""Writing a store (format 2): :class:`StoreWriter` buffers batches and commits them in flushes.

A writer *flushes* every ``commit_every`` batches or ``commit_seconds`` seconds (checked when a
batch arrives) and at :meth:`~StoreWriter.close`. A flush, under the writer's ``app_id``
(``"shard-i-of-n"``, deterministic so reruns are idempotent):

1. writes the segment(s) of the buffered batches (:mod:`attnstore.store.segments`) and one Parquet
   part per table, durable (fsync);
2. writes ``writers/<app_id>.json`` with the *intent*: flush version ``v``, its doc_ids and the
   Delta ``add`` actions per table (:mod:`attnstore.store.intents`);
3. commits each table's adds with the Delta application transaction ``(app_id, v)`` — every table
   but ``docs`` first, ``docs`` last (``docs`` is what makes the flush visible, and what resume
   reads; :mod:`attnstore.store.transactions`);
4. clears the intent.

A crash anywhere leaves either nothing visible or a pending intent. Every writer that opens the
store, and ``compact``, rolls pending intents forward (idempotently: a table whose
``transaction_version(app_id)`` already is ``v`` is skipped). Readers take the ``docs`` snapshot
first and hide, in the other tables, the rows of a flush whose ``docs`` commit they do not see
(:mod:`attnstore.store.snapshot`), so no reader ever sees half a flush.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from attnstore import index
from attnstore.analyses import tables as plugin_tables
from attnstore.codecs import get_codec
from attnstore.errors import IncompatibleStoreError, StoreExistsError, StoreWriteError
from attnstore.layout import (
    COMPAT_KEYS,
    FOLDER_FANOUT,
    LAYOUT_KEYS,
    MANIFEST_NAME,
    OVERVIEWS,
    SEGMENTS,
    WRITERS,
    Manifest,
    manifest_value,
    new_writer_id,
    parse_format_version,
)
from attnstore.overview import grid
from attnstore.rows import DocRows, RowSelection
from attnstore.storage import LocalStorage, Storage, is_url, open_storage
from attnstore.store import faults
from attnstore.store.batch import Segment, batch_table
from attnstore.store.delta import DeltaError, open_table, table_log, txn_version
from attnstore.store.deltalog import table_path
from attnstore.store.intents import read_state, write_state
from attnstore.store.manifest import manifest_bytes, read_store_manifest
from attnstore.store.segments import write_overviews, write_segment
from attnstore.store.snapshot import files_of
from attnstore.store.streaming import DocStream, Streamed
from attnstore.store.tables import doc_ids_in
from attnstore.store.transactions import commit_pending, roll_forward_all

if TYPE_CHECKING:
    from collections.abc import Iterable

    from deltalake import DeltaTable

__all__ = [
    "DEFAULT_APP_ID",
    "DEFAULT_COMMIT_EVERY",
    "DEFAULT_COMMIT_SECONDS",
    "StoreWriter",
    "app_id_for_shard",
    "commit_cadence",
]

#: ``extract`` flushes every this many batches (``ATTNSTORE_COMMIT_EVERY`` overrides)...
DEFAULT_COMMIT_EVERY: Final = 64
#: ...or once this many seconds passed since the last flush (``ATTNSTORE_COMMIT_SECONDS``).
DEFAULT_COMMIT_SECONDS: Final = 30.0
#: Buffered matrices are written as one segment once they reach this many bytes (or at a flush).
SEGMENT_BYTES: Final = 64 << 20
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


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _occupied(storage: Storage) -> bool:
    """True if the store's place holds anything but a writer's temporary files."""
    return any(not (n.startswith(".") and ".tmp-" in n) for n in storage.list(""))


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
        """A :class:`~attnstore.store.streaming.DocStream` for one long document of ``n_tokens``.

        Its segment (``[layer, head, stored rows]``) is written as the rows come, by the caller's
        thread; the document joins a flush (and becomes visible) when its
        :class:`~attnstore.store.streaming.Streamed` handle arrives in :attr:`Segment.codes`.
        """
        rows = DocRows.of(RowSelection.parse(self.manifest.get("rows")), n_tokens)
        shape = (len(self.manifest["layers"]), len(self.manifest["heads"]), rows.length)
        name = self._next_name()
        return DocStream(self.storage, f"{SEGMENTS}/{name}", name, shape, self.codec, faults.fault)

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

    def _write_segment(self) -> None:
        """Write the matrices of the batches not yet in a segment as one Zarr array."""
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
            packing = self.manifest.get("packing") or "tril-rowmajor"
            data = np.concatenate(codes, axis=-1)
            write_segment(self.storage, f"{SEGMENTS}/{name}", data, self.codec, packing)
            faults.fault("segment")
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
        write_overviews(
            self.storage, f"{OVERVIEWS}/{name}", np.concatenate(flat, axis=-1), self.codec, size
        )
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
        tables = {n: batch_table(n, c, self._plugin_specs) for n, c in to_write.items()}
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
            faults.fault(f"table:{name}")
        annotation: dict[str, Any] = {}
        for s in batches:
            annotation.update(s.annotation)
        with self.storage.lock(f"{WRITERS}/{self.app_id}.lock"):
            state = read_state(self.storage, self.app_id)
            if state.get("pending"):  # a crashed process with our app_id left one
                commit_pending(self.storage, self.app_id, state["pending"], self._tables)
            docs_table = self._tables.get("docs") or open_table(self.storage, "docs")
            if docs_table is not None:
                docs_table.update_incremental()
            seen = txn_version(docs_table, self.app_id)
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
            write_state(self.storage, state)
            faults.fault("intent")
            commit_pending(self.storage, self.app_id, state["pending"], self._tables)
            state["pending"] = None
            write_state(self.storage, state)
            faults.fault("committed")
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
    files = files_of(storage, "docs", table_log(dt))
    lo, hi = min(doc_ids), max(doc_ids)
    paths = [
        f.path
        for f in files
        if f.path not in checked
        and (f.min_doc is None or f.max_doc is None or (f.min_doc <= hi and f.max_doc >= lo))
    ]
    checked.update(paths)
    return doc_ids_in(storage, paths, doc_ids)


def _span(ids: set[int]) -> str:
    return f"{min(ids)}…{max(ids)} ({len(ids)})" if len(ids) > 1 else str(next(iter(ids)))


def _write_errors() -> tuple[type[Exception], ...]:
    return (OSError, DeltaError)
