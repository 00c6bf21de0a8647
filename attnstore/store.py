"""A store on disk: committed batches of attention in Zarr v3, their tables, and read-back.

This is the only module that imports zarr. Each committed batch ("segment") is one Zarr v3 array
``[layer, head, packed]`` holding the packed lower triangles of its documents back to back (see
:mod:`attnstore.packing`), compressed with Blosc (zstd + byte shuffle) and written as a single shard:
one object per batch, written once by one process. A document's matrices start at its ``offset``
in the ``docs`` table.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from attnstore import index
from attnstore.codecs import Codec, get_codec
from attnstore.errors import (
    IncompatibleStoreError,
    MatrixNotFoundError,
    StoreExistsError,
    StoreWriteError,
)
from attnstore.layout import (
    COMMITS,
    COMPAT_KEYS,
    FORMAT_VERSION,
    LAYOUT_KEYS,
    MANIFEST_NAME,
    SEGMENTS,
    TABLES_DIR,
    Manifest,
    manifest_value,
    new_writer_id,
    read_json,
    read_manifest,
    write_json_atomic,
)
from attnstore.packing import packed_length, unpack_tril

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Segment", "Store", "StoreWriter"]

#: Inner chunk length along the packed axis: 64 Ki values (128 KiB as uint16). One T=512 matrix
#: (131,328 values) spans 3 chunks, so one read decompresses at most ~400 KiB.
CHUNK: Final = 1 << 16


@dataclass
class Segment:
    """One batch ready to commit: codes per document plus its table rows."""

    docs: dict[str, list[Any]]
    tokens: dict[str, Any]
    heads: dict[str, Any]
    #: per stored document, in ``docs`` order of non-skipped rows: ``[layer, head, packed]`` codes
    codes: list[np.ndarray] = field(default_factory=list)
    #: further tables (``words``, ``syntax``, ``syntax_baseline``) by name
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: provenance of ``extra`` (e.g. the parser), copied into the commit record
    annotation: dict[str, Any] = field(default_factory=dict)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Fault injection for the crash tests: ``ATTNSTORE_CRASH_AT="table:heads:3"`` kills this process
#: (SIGKILL, no clean-up) the 3rd time a commit reaches that point. Points, in commit order:
#: ``segment``, ``table:docs``, ``table:tokens``, ``table:heads``, ``record``, ``committed``.
FAULT_POINTS: Final = (
    "segment",
    "table:docs",
    "table:tokens",
    "table:heads",
    "record",
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


class Store:
    """A read-only view of the committed contents of a store.

    Examples
    --------
    >>> store = attnstore.open("demo.attn")  # doctest: +SKIP
    >>> store.sql("SELECT layer, head, avg(induction) FROM heads GROUP BY ALL")  # doctest: +SKIP
    >>> store.matrix(doc_id=3, layer=18, head=6).shape  # doctest: +SKIP
    (87, 87)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        self.codec: Codec = get_codec(self.manifest["codec"])
        self._layer_pos = {layer: i for i, layer in enumerate(self.manifest["layers"])}
        self._arrays: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.refresh()

    def __repr__(self) -> str:
        return f"<attnstore.Store {str(self.path)!r}: {len(self._commits)} commits>"

    # -- what is committed -------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the commit records (to see batches committed since opening)."""
        folder = self.path / COMMITS
        names = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
        self._commits: list[dict[str, Any]] = [read_json(folder / n) for n in names]
        self._locations: dict[int, _Location] | None = None
        self._tokens: dict[int, np.ndarray] | None = None

    @property
    def commits(self) -> list[dict[str, Any]]:
        return list(self._commits)

    def files(self, table: str) -> list[Path]:
        """The committed Parquet parts of ``table``."""
        if table not in index.SCHEMAS:
            raise ValueError(f"Expected a table in {list(index.TABLES)}. Got {table!r} instead.")
        out = []
        for commit in self._commits:
            rel = commit["tables"].get(table)
            if rel:
                out.append(self.path / rel)
        return out

    def table(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One table as a pyarrow Table (all committed parts)."""
        files = self.files(name)
        if not files:
            empty = index.empty_table(name)
            return empty.select(list(columns)) if columns else empty
        # parts of an older minor version may lack newer columns: promote (NULL-filled)
        return pa.concat_tables(
            (pq.read_table(f, columns=columns) for f in files), promote_options="default"
        )

    def doc_ids(self) -> set[int]:
        """Every committed doc_id, stored or skipped."""
        return {int(d) for c in self._commits for d in c["doc_ids"]}

    # -- matrices ----------------------------------------------------------------------------
    def _location(self, doc_id: int) -> _Location:
        if self._locations is None:
            docs = self.table("docs", ["doc_id", "segment", "offset", "n_tokens", "skipped"])
            self._locations = {}
            self._skipped = {}
            for d, s, o, n, sk in zip(
                *(docs[c].to_pylist() for c in docs.column_names), strict=True
            ):
                if sk is not None:
                    self._skipped[d] = sk
                elif s is None:
                    self._skipped[d] = "scores-only"
                else:
                    self._locations[d] = _Location(s, o, n)
        loc = self._locations.get(doc_id)
        if loc is None:
            if self._skipped.get(doc_id) == "scores-only":
                raise MatrixNotFoundError(
                    f"doc_id {doc_id} has scores and tokens but no matrices: this store was "
                    "extracted with --scores-only. Extract again without it to keep matrices."
                )
            if doc_id in self._skipped:
                raise MatrixNotFoundError(
                    f"doc_id {doc_id} was skipped at extraction ({self._skipped[doc_id]}): "
                    "it has no matrices."
                )
            ids = sorted(self._locations)
            have = f"{ids[0]}…{ids[-1]} ({len(ids)} docs)" if ids else "none"
            raise MatrixNotFoundError(f"No doc_id {doc_id} in this store. Stored doc_ids: {have}.")
        return loc

    def _array(self, segment: str) -> Any:
        with self._lock:
            arr = self._arrays.get(segment)
            if arr is None:
                arr = zarr.open_array(self.path / SEGMENTS / segment, mode="r")
                self._arrays[segment] = arr
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

    def packed(self, doc_id: int, layer: int, head: int, *, decode: bool = True) -> np.ndarray:
        """One head's packed lower triangle: float32 probabilities, or raw codes with ``decode=False``."""
        li = self._check_layer_head(layer, head)
        loc = self._location(int(doc_id))
        hi = self.manifest["heads"].index(head)
        codes = self._array(loc.segment)[
            li, hi, loc.offset : loc.offset + packed_length(loc.n_tokens)
        ]
        return self.codec.decode(codes) if decode else codes

    def token_ids(self, doc_id: int) -> np.ndarray:
        """Token ids of one stored document, int64 ``[T]``."""
        if self._tokens is None:
            table = self.table("tokens", ["doc_id", "pos", "token_id"])
            order = np.lexsort((table["pos"].to_numpy(), table["doc_id"].to_numpy()))
            docs = table["doc_id"].to_numpy()[order]
            ids = table["token_id"].to_numpy()[order].astype(np.int64)
            starts = (
                np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
                if len(docs)
                else np.zeros(0, int)
            )
            bounds = np.r_[starts, len(docs)].tolist()
            self._tokens = {int(docs[a]): ids[a:b] for a, b in itertools.pairwise(bounds)}
        if int(doc_id) not in self._tokens:
            self._location(int(doc_id))  # raises the clear error for unknown or skipped documents
        return self._tokens[int(doc_id)]

    def matrix(self, doc_id: int, layer: int, head: int) -> np.ndarray:
        """One head's attention for one document: float32 ``[T, T]``, zeros above the diagonal."""
        n = self._location(int(doc_id)).n_tokens
        return unpack_tril(self.packed(doc_id, layer, head), n)

    def matrices(self, doc_id: int) -> np.ndarray:
        """Every stored head of one document: float32 ``[layer, head, T, T]``."""
        loc = self._location(int(doc_id))
        codes = self._array(loc.segment)[
            :, :, loc.offset : loc.offset + packed_length(loc.n_tokens)
        ]
        return unpack_tril(self.codec.decode(codes), loc.n_tokens)

    # -- SQL -----------------------------------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run read-only SQL over the ``docs``, ``tokens`` and ``heads`` views."""
        from attnstore.query import run

        return run(self, query, params)

    # -- summary -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Counts, sizes and settings, as plain JSON-able data."""
        docs = self.table("docs", ["n_tokens", "skipped", "truncated"])
        n_tokens = np.asarray(docs["n_tokens"].to_numpy(zero_copy_only=False), dtype=np.int64)
        stored = np.asarray(docs["skipped"].is_null().to_numpy(zero_copy_only=False))
        seg_bytes = sum(  # committed segment files only, as recorded at commit
            meta["bytes"]
            for c in self._commits
            for rel, meta in c["files"].items()
            if rel.startswith(f"{SEGMENTS}/")
        )
        total_bytes = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        n_lh = len(self.manifest["layers"]) * len(self.manifest["heads"])
        dense_f32 = int((n_tokens[stored].astype(np.int64) ** 2).sum()) * n_lh * 4
        return {
            "path": str(self.path),
            "format_version": self.manifest["format_version"],
            "model": self.manifest["model"]["id"],
            "codec": self.manifest["codec"]["id"],
            "max_abs_error": self.manifest["codec"]["max_abs_error"],
            "layers": len(self.manifest["layers"]),
            "heads": len(self.manifest["heads"]),
            "commits": len(self._commits),
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


class StoreWriter:
    """Commits segments to a store; one writer per process, any number per store.

    Parameters
    ----------
    path
        Store folder. Created with ``manifest`` if missing or empty; if it already holds a store,
        its manifest must agree with ``manifest`` on :data:`~attnstore.layout.COMPAT_KEYS`
        unless ``allow_different`` is set.
    """

    def __init__(
        self, path: str | os.PathLike[str], manifest: Manifest, *, allow_different: bool = False
    ) -> None:
        self.path = Path(path)
        self.writer_id = new_writer_id()
        self._counter = 0
        if self.path.exists() and not self.path.is_dir():
            raise StoreExistsError(
                f"Cannot write a store at {str(self.path)!r}: it is a file. Choose another --out."
            )
        if (self.path / MANIFEST_NAME).exists():
            existing = read_manifest(self.path)
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
            self.manifest = existing
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise StoreExistsError(
                f"{str(self.path)!r} exists, is not empty and is not an attnstore store. "
                "Choose another --out (attnstore never writes into another program's folder)."
            )
        else:
            # The manifest comes first: a folder holding only a manifest is a valid empty store, so
            # a crash right after creation leaves something the same command can resume.
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / MANIFEST_NAME, manifest)
            self.manifest = manifest
        zarr.open_group(self.path / SEGMENTS, mode="a", zarr_format=3)
        self.codec = get_codec(self.manifest["codec"])
        self._manifest_sha256 = _sha256(self.path / MANIFEST_NAME)
        # Leftovers of crashed writers (unreferenced segments, '.tmp-' files) are ignored by every
        # reader and reported by `attnstore verify`; they are not deleted here, since another
        # writer may be alive and mid-commit.

    def _next_name(self) -> str:
        self._counter += 1
        return f"{self.writer_id}-{self._counter:06d}"

    def commit(self, segment: Segment) -> dict[str, Any]:
        """Write a segment's array and tables, then its commit record (which makes it visible)."""
        name = self._next_name()
        try:
            return self._commit(name, segment)
        except OSError as err:
            raise StoreWriteError(
                f"Writing batch {name} (doc_ids {min(segment.docs['doc_id'])}…"
                f"{max(segment.docs['doc_id'])}) to {str(self.path)!r} failed: "
                f"{err.strerror or err}. Nothing of this batch was committed and earlier batches "
                "are intact; fix the cause and rerun the same command to resume."
            ) from err

    def _commit(self, name: str, segment: Segment) -> dict[str, Any]:
        files: dict[str, Path] = {}
        offsets: list[int | None] = []
        if segment.codes:
            lengths = [c.shape[-1] for c in segment.codes]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
            data = np.concatenate(segment.codes, axis=-1)
            n_layers, n_heads, total = data.shape
            shard = -(-total // CHUNK) * CHUNK
            arr_path = self.path / SEGMENTS / name
            arr = zarr.create_array(
                store=arr_path,
                shape=data.shape,
                dtype=data.dtype,
                chunks=(1, 1, min(CHUNK, shard)),
                shards=(n_layers, n_heads, shard),
                compressors=BloscCodec(**self.codec.compressor),
                fill_value=0,
                attributes={
                    "attnstore": {"packing": "tril-rowmajor", "codec": self.codec.get_config()}
                },
            )
            arr[...] = data
            files.update(
                {str(p.relative_to(self.path)): p for p in arr_path.rglob("*") if p.is_file()}
            )
            _fault("segment")
            it = iter(starts)
            offsets = [None if sk is not None else int(next(it)) for sk in segment.docs["skipped"]]
        else:
            offsets = [None] * len(segment.docs.get("doc_id", ()))
        to_write: dict[str, dict[str, Any]] = {}
        if segment.docs:  # a batch of documents (an annotation-only commit has none)
            docs = dict(segment.docs)
            docs["segment"] = [None if o is None else name for o in offsets]
            docs["offset"] = offsets
            to_write = {"docs": docs, "tokens": segment.tokens, "heads": segment.heads}
        to_write.update(segment.extra)
        tables: dict[str, str] = {}
        for tname, cols in to_write.items():
            table = index.table_from_columns(tname, cols)
            rel = f"{TABLES_DIR}/{tname}/{name}.parquet"
            index.write_part(table, self.path / rel)
            tables[tname] = rel
            files[rel] = self.path / rel
            _fault(f"table:{tname}")
        for path in files.values():  # durable before the record that points at them
            _fsync(path)
        record = {
            "format_version": FORMAT_VERSION,
            "manifest_sha256": self._manifest_sha256,
            "segment": name if segment.codes else None,
            "writer": self.writer_id,
            "created_at": _now(),
            "doc_ids": sorted(int(d) for d in segment.docs.get("doc_id", ())),
            "tables": tables,
            **segment.annotation,
            "files": {
                rel: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for rel, p in sorted(files.items())
            },
        }
        _fault("record")
        write_json_atomic(self.path / COMMITS / f"{name}.json", record)
        _fault("committed")
        return record
