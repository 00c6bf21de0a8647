"""One document's matrices read from a store: the read path of ``matrix()`` and its kin.

:class:`MatrixReader` is the half of :class:`~attnstore.store.Store` that reads one document: its
``docs`` row (:mod:`attnstore.store.locations`, a cached point read), its segment (a cached array)
and the chunks holding the rows asked for, decoded by the store's codec and unpacked
(:mod:`attnstore.packing`). Segments and overview arrays are read without zarr
(:mod:`attnstore.store.shards`) when their metadata is what attnstore writes, and through zarr
(:func:`~attnstore.store.segments.open_segment`, imported then) otherwise. It loads neither delta-rs
nor an Arrow dataset: a fresh process that opens a store and reads one matrix imports numpy,
``pyarrow.parquet``, numcodecs' Blosc and google_crc32c, and that is all.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from attnstore.errors import MatrixNotFoundError
from attnstore.layout import OVERVIEWS, SEGMENTS, manifest_value
from attnstore.packing import packed_size, row_index, unpack, unpack_logits, unpack_tril
from attnstore.paths import inside, local_files_inside
from attnstore.rows import DocRows, RowSelection, RowsNotStoredError
from attnstore.store.locations import Location, find_doc, location_of
from attnstore.store.shards import open_sharded

if TYPE_CHECKING:
    from attnstore.codecs import Codec
    from attnstore.layout import Manifest
    from attnstore.storage import Storage
    from attnstore.store.snapshot import TableFile

__all__ = ["MatrixReader"]

#: Documents whose location a reader keeps (bounded: flat memory over any corpus).
LOCATIONS_CACHED = 4096
#: Opened segment arrays a reader keeps.
ARRAYS_CACHED = 256


class MatrixReader:
    """The per-document reads of a :class:`~attnstore.store.Store` (a mixin: the store holds the
    manifest, codec, storage and snapshot these read through)."""

    storage: Storage
    manifest: Manifest
    codec: Codec
    row_selection: RowSelection | None
    _layer_pos: dict[int, int]
    _head_pos: dict[int, int]
    _files: dict[str, list[TableFile]]
    _lock: threading.Lock
    _pid: int
    _arrays: OrderedDict[str, Any]
    _locations: OrderedDict[int, Location | str | None]
    _overview_rows: OrderedDict[tuple[str, int], dict[str, Any]]

    def dataset(self, name: str) -> Any:  # the store's (tables are read there)
        raise NotImplementedError

    # -- where a document is -----------------------------------------------------------------
    def _lookup(self, doc_id: int) -> Location | str | None:
        """A stored document's location, the reason it has none, or None if it is not here."""
        with self._lock:
            if doc_id in self._locations:
                self._locations.move_to_end(doc_id)
                return self._locations[doc_id]
        row = find_doc(
            self.storage,
            self._files.get("docs", []),
            doc_id,
            ["segment", "offset", "n_tokens", "skipped"],
        )
        found = location_of(row)
        with self._lock:
            self._locations[doc_id] = found
            while len(self._locations) > LOCATIONS_CACHED:
                self._locations.popitem(last=False)
        return found

    def _location(self, doc_id: int) -> Location:
        loc = self._lookup(doc_id)
        if isinstance(loc, Location):
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
        ids = self.dataset("docs").to_table(columns=["doc_id"])["doc_id"].to_numpy()
        have = f"{ids.min()}…{ids.max()} ({len(ids)} docs)" if len(ids) else "none"
        raise MatrixNotFoundError(f"No doc_id {doc_id} in this store. Stored doc_ids: {have}.")

    def _array(self, segment: str, folder: str = SEGMENTS) -> Any:
        if (
            self._pid != os.getpid()
        ):  # a forked worker: arrays opened before hold the parent's clients
            self._arrays, self._lock, self._pid = OrderedDict(), threading.Lock(), os.getpid()
        key = segment if folder == SEGMENTS else f"{folder}/{segment}"
        with self._lock:
            arr = self._arrays.get(key)
            if arr is not None:
                self._arrays.move_to_end(key)
                return arr
        rel = inside(self.storage, folder, segment, source="tables/docs", what="segment")
        local_files_inside(self.storage, rel, source="tables/docs", what="segment")
        arr = open_sharded(self.storage, rel)
        if arr is None:  # metadata outside what attnstore writes, or a storage without ranges
            from attnstore.store.segments import open_segment

            arr = open_segment(self.storage.zarr_store(rel, read_only=True), rel)
        with self._lock:
            self._arrays[key] = arr
            while len(self._arrays) > ARRAYS_CACHED:
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
            import pyarrow.compute as pc

            rows = (
                self.dataset("overviews").to_table(filter=pc.field("doc_id") == doc_id).to_pylist()
            )
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
