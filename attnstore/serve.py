"""``attnstore serve``: a local web viewer for stores, with a small JSON API.

A stdlib :class:`~http.server.ThreadingHTTPServer` serves the static pages shipped in
``attnstore/static/`` (plain JavaScript and canvas: no CDN, no build step, works offline) and the JSON
API they use, which scripts can use too (documented in ``schemas/serve.md``):

=====================  ==========================================================================
``/api/meta``           the stores: model, layers, heads, documents, score columns, syntax tables
``/api/heads``          ``head_summary`` rows (one per layer and head: corpus means and a label)
``/api/grid``           one value per (layer, head): a score's corpus aggregate, or the label
``/api/head``           one head: every score with its rank, label, top and per-decile documents
``/api/doc``            one document: text and tokens
``/api/tile``           one 256 × 256 tile of a head's max-pooled matrix, float32 (binary)
``/api/overview``       a head's stored ``--overview`` (max or mean), float32 (binary)
``/api/row``            exact attention of one query row (``/api/col``: one key column)
``/api/sql``            read-only SQL over the store's views: rows, or 4xx ``{"error": ...}``
=====================  ==========================================================================

Safety: the server binds 127.0.0.1 unless told otherwise and answers only requests addressed to
that host (DNS rebinding), and every ``/api/`` request must carry the header ``X-Attnstore: 1``
(the page sends it; a page on another origin cannot without CORS, so a cross-origin ``no-cors``
request spends no work). Each store gets its own DuckDB connection, built by
:func:`attnstore.query.connect` and locked down by the one read-only policy of
:mod:`attnstore.sqlpolicy` (no file system for DuckDB at all, no temporary folder, no extensions,
``lock_configuration``), with bounded threads and memory. User SQL must be one ``SELECT``
statement; it runs on the store's connection (one query at a time; the tables stay lazy Arrow
datasets, never copied into memory), is interrupted after a time limit that also covers the
conversion to JSON, returns at most a row cap and a byte cap (``"truncated": true``), and at most
:data:`SQL_CONCURRENCY` user queries run or wait at once (more get HTTP 429). Bad parameters get a
4xx with a message, never a stack trace; so do requests the standard library refuses itself (an
over-long request line or header: JSON, not its HTML page).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import decimal
import http.server
import json
import math
import mimetypes
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import duckdb
    import pyarrow as pa

    from attnstore.storage import Location
    from attnstore.store import Store

__all__ = ["ROW_CAP", "SQL_TIME_LIMIT", "TILE", "ApiError", "Viewer", "make_server", "serve"]

STATIC: Final = Path(__file__).with_name("static")
#: Side of one heatmap tile, in pooled cells.
TILE: Final = 256
#: The client asks for a pooling factor that keeps the whole matrix within this many cells a side.
MAX_SIDE: Final = 1024
#: Seconds a user query may run before it is interrupted.
SQL_TIME_LIMIT: Final = 3.0
#: Seconds the pages' own queries may run (aggregates over a large ``heads`` table).
PAGE_TIME_LIMIT: Final = 120.0
#: Rows a user query returns at most (the answer says ``truncated``).
ROW_CAP: Final = 1000
#: Bytes of JSON rows a user query returns at most (the answer says ``truncated``).
RESULT_BYTES: Final = 4 << 20
#: User SQL queries running or waiting at once, all stores together (more get HTTP 429).
SQL_CONCURRENCY: Final = 2
#: The header every ``/api/`` request must carry (a cross-origin ``no-cors`` request cannot).
API_HEADER: Final = "X-Attnstore"
#: Decoded matrices kept in memory (bytes, all stores together).
CACHE_BYTES: Final = 512 << 20
#: Columns of ``head_summary`` that are identifiers or counts, not scores.
_NOT_SCORES: Final = frozenset({"layer", "head", "kv_head", "n_docs"})
AGGREGATES: Final = ("mean", "median", "p90", "max", "min")
_AGG_SQL: Final = {
    "median": "quantile_cont({c}, 0.5)",
    "p90": "quantile_cont({c}, 0.9)",
    "max": "max({c})",
    "min": "min({c})",
}
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})


class ApiError(Exception):
    """A request the API refuses: HTTP status and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _jsonable(value: Any) -> Any:
    """A DuckDB value as JSON: NaN/inf become null, decimals floats, dates ISO strings."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return _jsonable(float(value))
    if isinstance(value, _dt.date | _dt.time | _dt.datetime):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return str(value)


def _records(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Result rows as JSON objects keyed by column name."""
    return [dict(zip(columns, map(_jsonable, r), strict=True)) for r in rows]


@dataclass
class _Source:
    """One served store: its reader, its locked DuckDB connection and what its tables hold."""

    index: int
    name: str
    store: Store
    con: duckdb.DuckDBPyConnection
    scores: list[str]
    has_syntax: bool
    has_semantic: bool
    n_docs: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Cache:
    """A small LRU of decoded arrays, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[Any, ...], np.ndarray] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()
        self._making: dict[tuple[Any, ...], threading.Lock] = {}

    def get(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached value, or ``make()``'s, computed once however many threads ask at once."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            key_lock = self._making.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._items.get(key)
            if hit is not None:
                return hit
            try:
                value = make()
            finally:
                with self._lock:
                    self._making.pop(key, None)
            with self._lock:
                self._items[key] = value
                self._bytes += value.nbytes
                while self._bytes > self.max_bytes and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return value


class Viewer:
    """The API behind ``attnstore serve``, independent of HTTP (each method returns JSON data).

    Parameters
    ----------
    paths
        One or more stores (folders, URLs, opened :class:`~attnstore.storage.Storage` or
        :class:`~attnstore.store.Store` objects; each is opened once); the API names them by
        position (``store=0``, ``store=1`` …).
    time_limit
        Seconds a user SQL query may run.
    row_cap
        Rows a user SQL query returns at most.
    """

    def __init__(
        self,
        paths: Sequence[Location | Store],
        *,
        time_limit: float = SQL_TIME_LIMIT,
        row_cap: int = ROW_CAP,
        memory_limit: str = "2GB",
        result_bytes: int = RESULT_BYTES,
    ) -> None:
        from attnstore.errors import AttnStoreError
        from attnstore.query import connect
        from attnstore.sqlpolicy import lock_down
        from attnstore.storage import location_text
        from attnstore.store import Store

        if not paths:
            raise AttnStoreError("Expected at least one store to serve. Got none.")
        self.time_limit = time_limit
        self.row_cap = row_cap
        self.result_bytes = result_bytes
        self._sql_slots = threading.BoundedSemaphore(SQL_CONCURRENCY)
        self.sources: list[_Source] = []
        self.cache = _Cache(CACHE_BYTES)
        texts = [str(p.path) if isinstance(p, Store) else location_text(p) for p in paths]
        names = [Path(t).name or t for t in texts]
        for i, path in enumerate(paths):
            store = path if isinstance(path, Store) else Store(path)  # opened once
            con = connect(store)
            described = con.execute("DESCRIBE head_summary").fetchall()
            numeric = ("DOUBLE", "FLOAT", "REAL", "BIGINT", "INTEGER", "HUGEINT", "SMALLINT")
            scores = [
                str(n)
                for n, t, *_ in described
                if str(t).upper() in numeric
                and n not in _NOT_SCORES
                and not str(n).startswith("n_")
            ]
            (n_syntax,) = con.execute("SELECT count(*) FROM syntax_heads").fetchone() or (0,)
            n_probe = 0
            if con.execute(
                "SELECT count(*) FROM duckdb_views() WHERE view_name = 'probe_heads'"
            ).fetchone() != (0,):
                (n_probe,) = con.execute("SELECT count(*) FROM probe_heads").fetchone() or (0,)
            (n_docs,) = con.execute(
                "SELECT count(*) FROM docs WHERE skipped IS NULL"
            ).fetchone() or (0,)
            # the one read-only policy (attnstore.sqlpolicy), with bounded threads and memory
            lock_down(con, threads=2, memory_limit=memory_limit)
            name = names[i] if names.count(names[i]) == 1 else f"{names[i]} ({i})"
            self.sources.append(
                _Source(i, name, store, con, scores, bool(n_syntax), bool(n_probe), int(n_docs))
            )

    def close(self) -> None:
        for src in self.sources:
            src.con.close()

    # -- parameters ------------------------------------------------------------------------
    def source(self, params: dict[str, str]) -> _Source:
        i = _int(params, "store", 0, 0, len(self.sources) - 1)
        return self.sources[i]

    def _layer_head(self, src: _Source, params: dict[str, str]) -> tuple[int, int]:
        layers, heads = src.store.manifest["layers"], src.store.manifest["heads"]
        layer = _int(params, "layer")
        head = _int(params, "head")
        if layer not in layers:
            raise ApiError(404, f"No layer {layer} in store {src.name!r}. Stored layers: {layers}.")
        if head not in heads:
            raise ApiError(404, f"No head {head} in store {src.name!r}. Stored heads: {heads}.")
        return layer, head

    def _score(self, src: _Source, params: dict[str, str], name: str, default: str) -> str:
        score = params.get(name, default)
        if score not in src.scores:
            raise ApiError(
                400, f"Expected {name} to be one of {', '.join(src.scores)}. Got {score!r}."
            )
        return score

    # -- SQL -----------------------------------------------------------------------------------
    def query(
        self,
        src: _Source,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        cap: int | None = None,
        time_limit: float = PAGE_TIME_LIMIT,
    ) -> tuple[list[str], list[tuple[Any, ...]], bool]:
        """Run SQL on the store's connection, interrupted after ``time_limit`` s; ≤ ``cap`` rows.

        Queries on one store run one at a time: its tables are lazy Arrow datasets registered in
        the connection itself (other cursors cannot see them), and a local viewer needs no more.
        """
        with _bounded(src, time_limit, time_limit):
            relation = _relation(src, sql, params)
            if cap is not None:
                relation = relation.limit(cap + 1)
            columns = list(relation.columns)
            rows = relation.fetchall()
        truncated = cap is not None and len(rows) > cap
        return columns, rows[:cap] if cap is not None else rows, truncated

    def user_sql(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/sql``: one read-only SELECT, bounded in time (conversion to JSON included), rows,
        bytes of JSON (:data:`RESULT_BYTES`; the answer says ``truncated``) and concurrency
        (:data:`SQL_CONCURRENCY` user queries at once, all stores together; more get a 429)."""
        import duckdb

        from attnstore.errors import QueryError
        from attnstore.sqlpolicy import SELECT_ONLY, check_statement

        src = self.source(params)
        sql = params.get("q", "").strip()
        if not sql:
            raise ApiError(400, "Expected a SQL query in parameter q. Got nothing.")
        if len(sql) > 20_000:
            raise ApiError(400, f"Expected at most 20,000 characters of SQL. Got {len(sql):,}.")
        bound: list[Any] = []
        if "params" in params:
            try:
                bound = json.loads(params["params"])
            except ValueError:
                bound = []
            if not isinstance(bound, list):
                raise ApiError(400, "Expected params as a JSON array, e.g. params=[0.9, 3].")
        if not self._sql_slots.acquire(blocking=False):
            raise ApiError(
                429,
                f"{SQL_CONCURRENCY} SQL queries are already running; try again when one finishes.",
            )
        try:
            with src.lock:
                try:
                    check_statement(src.con, sql, SELECT_ONLY)
                except QueryError as err:
                    raise ApiError(403 if str(err).startswith("Only") else 400, str(err)) from None
            t0 = time.perf_counter()
            deadline = t0 + self.time_limit
            table = self._arrow(src, sql, bound or None, self.row_cap + 1, deadline)
            truncated = table.num_rows > self.row_cap
            table = table.slice(0, self.row_cap)
            if table.nbytes > self.result_bytes:  # bound the conversion before it starts
                table, truncated = _head_within(table, self.result_bytes), True
            names = _unique(list(table.column_names))
            rows: list[dict[str, Any]] = []
            size = 0
            for i, row in enumerate(table.to_pylist()):
                if i % 64 == 0 and time.perf_counter() > deadline:
                    raise ApiError(400, _too_long(self.time_limit))
                record = dict(zip(names, map(_jsonable, row.values()), strict=True))
                size += len(json.dumps(record, ensure_ascii=False, allow_nan=False)) + 1
                if size > self.result_bytes:
                    truncated = True
                    break
                rows.append(record)
            if time.perf_counter() > deadline:
                raise ApiError(400, _too_long(self.time_limit))
        except duckdb.Error as err:  # pragma: no cover - _arrow maps DuckDB errors
            raise ApiError(400, f"{type(err).__name__}: {err}") from None
        finally:
            self._sql_slots.release()
        return {
            "columns": names,
            "rows": rows,
            "truncated": truncated,
            "row_cap": self.row_cap,
            "result_bytes": self.result_bytes,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    def _arrow(
        self, src: _Source, sql: str, params: Sequence[Any] | None, cap: int, deadline: float
    ) -> pa.Table:
        """User SQL as an Arrow table of ≤ ``cap`` rows, interrupted at ``deadline``."""
        with _bounded(src, deadline - time.perf_counter(), self.time_limit):
            relation = _relation(src, sql, params).limit(cap)
            fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
            table: pa.Table = fetch()
        return table

    # -- pages -------------------------------------------------------------------------------
    def meta(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/meta``: what each store holds."""
        out = []
        for src in self.sources:
            m = src.store.manifest
            _, rows, _ = self.query(src, "SELECT max(n_tokens) FROM docs WHERE skipped IS NULL")
            out.append(
                {
                    "store": src.index,
                    "name": src.name,
                    "model": m["model"]["id"],
                    "codec": m["codec"]["id"],
                    # "bidirectional": an encoder's whole squares (the viewer draws every tile)
                    "attention": "bidirectional" if src.store.bidirectional else "causal",
                    "layers": m["layers"],
                    "heads": m["heads"],
                    "docs": src.n_docs,
                    "max_tokens": rows[0][0],
                    "scores": src.scores,
                    "syntax": src.has_syntax,
                    "semantic": src.has_semantic,
                    "overview": m.get("overview"),
                    "rows": m.get("rows"),
                }
            )
        return {
            "stores": out,
            "aggregates": list(AGGREGATES),
            "tile": TILE,
            "max_side": MAX_SIDE,
            "row_cap": self.row_cap,
            "time_limit_s": self.time_limit,
        }

    def heads(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/heads``: every ``head_summary`` row."""
        src = self.source(params)
        columns, rows, _ = self.query(src, "SELECT * FROM head_summary ORDER BY layer, head")
        return {
            "columns": columns,
            "rows": _records(columns, rows),
        }

    def grid(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/grid``: one value per stored (layer, head), in layer-major order.

        ``score`` is a score column, ``label`` (the head's label) or, when the store has parses,
        ``syntactic`` (the best gain over the fixed-offset baseline among relations with n ≥ 30),
        or, when it has span probes, ``semantic`` (the best gain over the probe baseline among
        probe kinds with n ≥ 30).
        ``agg`` is ``mean`` (count-weighted, as ``head_summary``), ``median``, ``p90``, ``max`` or ``min``
        over documents.
        """
        from attnstore import catalog
        from attnstore.query import SYNTACTIC_MIN_N

        src = self.source(params)
        score = params.get("score", "prev_token" if "prev_token" in src.scores else src.scores[0])
        agg = params.get("agg", "mean")
        if agg not in AGGREGATES:
            raise ApiError(400, f"Expected agg to be one of {', '.join(AGGREGATES)}. Got {agg!r}.")
        if score == "label":
            sql = "SELECT layer, head, label AS value, label FROM head_summary"
        elif score == "syntactic":
            if not src.has_syntax:
                raise ApiError(
                    400,
                    f"Store {src.name!r} has no syntactic results ({catalog.SYNTAX.what}): "
                    f"{catalog.SYNTAX.remedy}; or pick a score.",
                )
            sql = catalog.grid_sql("syntax", SYNTACTIC_MIN_N)
        elif score == "semantic":
            if not src.has_semantic:
                raise ApiError(
                    400,
                    f"Store {src.name!r} has no span-probe results ({catalog.PROBE.what}): "
                    f"{catalog.PROBE.remedy}; or pick a score.",
                )
            sql = catalog.grid_sql("probe", SYNTACTIC_MIN_N)
        else:
            score = self._score(src, params, "score", score)
            if agg == "mean":
                sql = f"SELECT layer, head, {_ident(score)} AS value, label FROM head_summary"
            else:
                expr = _AGG_SQL[agg].format(c="h." + _ident(score))
                sql = (
                    f"SELECT h.layer, h.head, {expr} AS value, any_value(s.label) AS label "
                    "FROM heads h LEFT JOIN head_summary s USING (layer, head) "
                    "GROUP BY h.layer, h.head"
                )
        _, rows, _ = self.query(src, sql)
        found = {(int(r[0]), int(r[1])): (_jsonable(r[2]), r[3]) for r in rows}
        cells = [
            {
                "layer": layer,
                "head": head,
                "value": found.get((layer, head), (None, None))[0],
                "label": found.get((layer, head), (None, None))[1],
            }
            for layer in src.store.manifest["layers"]
            for head in src.store.manifest["heads"]
        ]
        return {"store": src.index, "score": score, "agg": agg, "cells": cells}

    def head(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/head``: one head's scores with ranks, label, top and per-decile documents."""
        from attnstore import catalog

        src = self.source(params)
        layer, head = self._layer_head(src, params)
        k = _int(params, "k", 10, 1, 100)
        ranked = ", ".join(
            f"{_ident(c)}, rank() OVER (ORDER BY {_ident(c)} DESC NULLS LAST) AS {_ident('rank_' + c)}"
            for c in src.scores
        )
        columns, rows, _ = self.query(
            src,
            f"SELECT * FROM (SELECT layer, head, label, n_docs, {ranked} FROM head_summary) "
            "WHERE layer = ? AND head = ?",
            [layer, head],
        )
        n_heads = len(src.store.manifest["layers"]) * len(src.store.manifest["heads"])
        if not rows:
            raise ApiError(404, f"Layer {layer} head {head} has no scores in store {src.name!r}.")
        row = dict(zip(columns, rows[0], strict=True))
        scores = [
            {"score": c, "value": _jsonable(row[c]), "rank": row["rank_" + c], "of": n_heads}
            for c in src.scores
        ]
        default = next(
            (c for c in ("prev_token", "sink", "induction") if c in src.scores), src.scores[0]
        )
        by = self._score(src, params, "by", default)
        col = _ident(by)
        doc_cols = "h.doc_id, h.{c} AS value, d.n_tokens, left(d.text, 120) AS text"
        _, top, _ = self.query(
            src,
            f"SELECT {doc_cols.format(c=col)} FROM heads h JOIN docs d USING (doc_id) "
            f"WHERE h.layer = ? AND h.head = ? AND h.{col} IS NOT NULL "
            f"ORDER BY h.{col} DESC, h.doc_id LIMIT ?",
            [layer, head, k],
        )
        _, dec, _ = self.query(
            src,
            f"SELECT decile, doc_id, value, n_tokens, text FROM (SELECT *, row_number() OVER "
            "(PARTITION BY decile ORDER BY hash(doc_id), doc_id) AS i FROM (SELECT "
            f"{doc_cols.format(c=col)}, ntile(10) OVER (ORDER BY h.{col}) AS decile "
            f"FROM heads h JOIN docs d USING (doc_id) WHERE h.layer = ? AND h.head = ? "
            f"AND h.{col} IS NOT NULL)) WHERE i <= 3 ORDER BY decile DESC, value DESC",
            [layer, head],
        )
        doc_fields = ("doc_id", "value", "n_tokens", "text")
        syntax: list[dict[str, Any]] = []
        if src.has_syntax:
            scol, srows, _ = self.query(src, catalog.HEAD_ROWS_SQL["syntax"], [layer, head])
            syntax = _records(scol, srows)
        semantic: list[dict[str, Any]] = []
        if src.has_semantic:
            pcol, prows, _ = self.query(src, catalog.HEAD_ROWS_SQL["probe"], [layer, head])
            semantic = _records(pcol, prows)
        return {
            "store": src.index,
            "layer": layer,
            "head": head,
            "label": row["label"],
            "n_docs": row["n_docs"],
            "scores": scores,
            "by": by,
            "top": _records(doc_fields, top),
            "deciles": _records(("decile", *doc_fields), dec),
            "syntax": syntax,
            "semantic": semantic,
        }

    def _doc_tokens(self, src: _Source, doc: int) -> tuple[int, list[str]]:
        _, rows, _ = self.query(src, "SELECT n_tokens, skipped FROM docs WHERE doc_id = ?", [doc])
        if not rows:
            raise ApiError(404, f"No document {doc} in store {src.name!r} ({src.n_docs} stored).")
        if rows[0][1] is not None:
            raise ApiError(404, f"Document {doc} was skipped at extraction ({rows[0][1]}).")
        _, toks, _ = self.query(
            src, "SELECT token FROM tokens WHERE doc_id = ? ORDER BY pos", [doc]
        )
        return int(rows[0][0]), [str(t[0]) for t in toks]

    def doc(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/doc``: one document's text and tokens."""
        src = self.source(params)
        doc = _int(params, "doc")
        n, tokens = self._doc_tokens(src, doc)
        _, rows, _ = self.query(src, "SELECT text, truncated FROM docs WHERE doc_id = ?", [doc])
        return {
            "store": src.index,
            "doc_id": doc,
            "n_tokens": n,
            "text": rows[0][0],
            "truncated": rows[0][1],
            "tokens": tokens,
        }

    def _matrix(self, src: _Source, params: dict[str, str]) -> tuple[np.ndarray, int, int, int]:
        from attnstore.errors import MatrixNotFoundError

        doc = _int(params, "doc")
        layer, head = self._layer_head(src, params)
        key = ("m", src.index, doc, layer, head)
        try:
            m = self.cache.get(key, lambda: src.store.matrix(doc, layer, head))
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        return m, doc, layer, head

    def _tokens_of(self, src: _Source, params: dict[str, str]) -> tuple[int, int, int, int]:
        """``(doc, layer, head, T)`` of a stored matrix, without reading it."""
        from attnstore.errors import MatrixNotFoundError

        doc = _int(params, "doc")
        layer, head = self._layer_head(src, params)
        try:
            return doc, layer, head, src.store.n_tokens(doc)
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None

    def _overview_grid(self, src: _Source, doc: int) -> dict[str, Any] | None:
        if not src.store.manifest.get("overview"):
            return None
        from attnstore.errors import MatrixNotFoundError

        try:
            return src.store.overview_grid(doc)
        except MatrixNotFoundError:
            return None

    def tile(self, params: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """``/api/tile``: float32 little-endian, row-major, the header ``X-Shape: rows,cols``.

        Cell (i, j) of tile (ty, tx) at pooling ``pool`` is the maximum of the matrix over
        queries ``[(ty·256 + i)·pool, … + pool)`` and keys likewise; max keeps one-cell structures
        (a previous-token diagonal, a sink column) visible at any pooling. A tile never decodes the
        whole matrix: when ``pool`` is a multiple of the stored overview's block it is pooled from
        the ``max`` overview (exactly the same values), otherwise from a partial read of its
        ``256 · pool`` query rows.
        """
        from attnstore.errors import MatrixNotFoundError

        src = self.source(params)
        doc, layer, head, t = self._tokens_of(src, params)
        pool = _int(params, "pool", 1, 1, max(1, t))
        if pool & (pool - 1):
            raise ApiError(400, f"Expected pool to be a power of two. Got {pool}.")
        side = -(-t // pool)
        n_tiles = -(-side // TILE)
        ty = _int(params, "ty", 0, 0, n_tiles - 1)
        tx = _int(params, "tx", 0, 0, n_tiles - 1)
        grid = self._overview_grid(src, doc)
        source = "rows"
        if grid is not None and pool % grid["block"] == 0:
            f = pool // grid["block"]
            source = "overview"

            def pooled() -> np.ndarray:
                # the codec's rounding is monotone, so the max of the stored (rounded) values
                # is the rounded max: these cells equal pooling the decoded matrix exactly
                codec = src.store.codec
                ov = codec.decode(codec.encode(src.store.overview(doc, layer, head, "max")))
                m = ov.shape[0]
                padded = np.zeros((side * f, side * f), dtype=np.float32)
                padded[:m, :m] = ov
                out: np.ndarray = padded.reshape(side, f, side, f).max(axis=(1, 3))
                return out

            key: tuple[Any, ...] = ("o", src.index, doc, layer, head, pool)
        else:
            r0, r1 = ty * TILE * pool, min(t, (ty + 1) * TILE * pool)

            def pooled() -> np.ndarray:
                band = src.store.matrix(doc, layer, head, rows=slice(r0, r1))  # [rows, T]
                if pool == 1:
                    return band
                rows = -(-(r1 - r0) // pool)
                padded = np.zeros((rows * pool, side * pool), dtype=np.float32)
                padded[: r1 - r0, :t] = band  # zero edge rows/columns: attention is never negative
                out: np.ndarray = padded.reshape(rows, pool, side, pool).max(axis=(1, 3))
                return out

            key = ("b", src.index, doc, layer, head, pool, ty)
        try:
            image = self.cache.get(key, pooled)
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        y0 = 0 if source == "rows" else ty * TILE
        block = np.ascontiguousarray(
            image[y0 : y0 + TILE, tx * TILE : (tx + 1) * TILE], dtype="<f4"
        )
        headers = {
            "X-Shape": f"{block.shape[0]},{block.shape[1]}",
            "X-Tokens": str(t),
            "X-Pool": str(pool),
            "X-Source": source,
            "Access-Control-Expose-Headers": "X-Shape, X-Tokens, X-Pool, X-Source",
        }
        return block.tobytes(), headers

    def overview(self, params: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """``/api/overview``: the stored ``--overview`` of one head (``kind`` max or mean),
        float32 little-endian ``[M, M]`` with ``X-Shape``, ``X-Block`` (b) and ``X-Tokens``."""
        from attnstore.errors import MatrixNotFoundError

        src = self.source(params)
        doc, layer, head, t = self._tokens_of(src, params)
        kind = params.get("kind", "max")
        if kind not in ("max", "mean"):
            raise ApiError(400, f"Expected kind max or mean. Got {kind[:20]!r}.")
        grid = self._overview_grid(src, doc)
        if grid is None:
            raise ApiError(404, f"doc {doc} has no overview: extract with --overview N.")
        try:
            image = self.cache.get(
                ("ov", src.index, doc, layer, head, kind),
                lambda: src.store.overview(doc, layer, head, kind),
            )
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        headers = {
            "X-Shape": f"{image.shape[0]},{image.shape[1]}",
            "X-Block": str(grid["block"]),
            "X-Tokens": str(t),
            "Access-Control-Expose-Headers": "X-Shape, X-Block, X-Tokens",
        }
        return np.ascontiguousarray(image, dtype="<f4").tobytes(), headers

    def row(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/row``: exact attention of query ``q`` to keys ``0 … q`` (a partial read of that
        row only)."""
        from attnstore.errors import MatrixNotFoundError

        src = self.source(params)
        doc, layer, head, t = self._tokens_of(src, params)
        q = _int(params, "q", None, 0, t - 1)
        try:
            m = src.store.matrix(doc, layer, head, rows=slice(q, q + 1))
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        values = m[0, : q + 1].astype(np.float64).tolist()
        return {"doc": doc, "layer": layer, "head": head, "q": q, "values": values}

    def col(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/col``: exact attention to key ``k`` from queries ``k … T − 1``."""
        src = self.source(params)
        m, doc, layer, head = self._matrix(src, params)
        k = _int(params, "k", None, 0, m.shape[0] - 1)
        values = m[k:, k].astype(np.float64).tolist()
        return {"doc": doc, "layer": layer, "head": head, "k": k, "values": values}

    def pair(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/pair``: the document of ``store`` that holds the text of document ``doc`` of store
        ``from`` (compare across stores pairs documents by text, not by number).

        ``doc_id`` is ``doc`` itself when that document of ``store`` has the same text, else the
        first document with the same text, else ``null``; ``how`` is ``"doc_id"``, ``"text"`` or
        ``null``, and ``same_number`` says whether ``store`` has a document ``doc`` at all.
        """
        src = self.source(params)
        ref = self.source({"store": params.get("from", "0")})
        doc = _int(params, "doc")
        _, rows, _ = self.query(ref, "SELECT text FROM docs WHERE doc_id = ?", [doc])
        if not rows:
            raise ApiError(404, f"Store {ref.name!r} has no document {doc}.")
        text = rows[0][0]
        _, own, _ = self.query(
            src, "SELECT text FROM docs WHERE doc_id = ? AND skipped IS NULL", [doc]
        )
        if own and own[0][0] == text:
            return {"store": src.index, "from": ref.index, "doc": doc, "doc_id": doc,
                    "how": "doc_id", "same_number": True}  # fmt: skip
        _, match, _ = self.query(
            src,
            "SELECT min(doc_id) FROM docs WHERE text = ? AND skipped IS NULL HAVING count(*) > 0",
            [text],
        )
        found = int(match[0][0]) if match and match[0][0] is not None else None
        return {"store": src.index, "from": ref.index, "doc": doc, "doc_id": found,
                "how": None if found is None else "text", "same_number": bool(own)}  # fmt: skip


@contextlib.contextmanager
def _bounded(src: _Source, seconds: float, limit: float) -> Iterator[None]:
    """One query at a time on ``src``'s connection, interrupted after ``seconds``; DuckDB's errors
    as one-line API errors (an interruption names the time ``limit``)."""
    import duckdb

    with src.lock:
        timer = threading.Timer(max(0.0, seconds), src.con.interrupt)
        timer.daemon = True
        try:
            timer.start()
            yield
        except duckdb.InterruptException:
            raise ApiError(400, _too_long(limit)) from None
        except duckdb.Error as err:
            raise ApiError(400, f"{type(err).__name__}: {err}") from None
        finally:
            timer.cancel()


def _relation(src: _Source, sql: str, params: Sequence[Any] | None) -> Any:
    relation = src.con.sql(sql, params=params)
    if relation is None:
        raise ApiError(400, "The statement returned no rows. Expected a SELECT query.")
    return relation


def _too_long(limit: float) -> str:
    return (
        f"The query ran longer than the time limit of {limit:g} s and was stopped. Add a WHERE "
        "clause or a LIMIT, or aggregate before joining."
    )


def _head_within(table: pa.Table, max_bytes: int) -> pa.Table:
    """The longest first rows of ``table`` whose Arrow buffers stay within ``max_bytes``."""
    lo, hi = 0, table.num_rows
    while lo < hi:  # the largest k with table[:k].nbytes <= max_bytes
        mid = (lo + hi + 1) // 2
        if table.slice(0, mid).nbytes <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return table.slice(0, lo)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return out


def _int(
    params: dict[str, str],
    name: str,
    default: int | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> int:
    raw = params.get(name)
    span = f" in {lo}…{hi}" if lo is not None and hi is not None else ""
    if raw is None or raw == "":
        if default is None:
            raise ApiError(400, f"Expected parameter {name!r} (an integer{span}). Got nothing.")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, f"Expected parameter {name!r} as an integer{span}. Got {raw[:40]!r}."
        ) from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"Expected parameter {name!r}{span or ' in range'}. Got {value}.")
    return value


_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "attnstore"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        body = json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def _host_ok(self) -> bool:
        if self.server.server_address[0] not in _LOOPBACK:
            return True  # bound to a public address on purpose: any Host may reach it
        host = (self.headers.get("Host") or "").strip()
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0]
        return name in _LOOPBACK

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the standard library raises itself (an over-long request line or header, a
        malformed request) as the documented JSON ``{"error": ...}``, not its HTML page."""
        self.close_connection = True
        short, _ = self.responses.get(code, ("Error", ""))
        text = f"{message or short} (HTTP {code})."
        if code in (414, 431):
            text = f"{message or short}: the request line or a header is too long (HTTP {code})."
        body = json.dumps({"error": text}).encode()
        try:
            self.send_response(code, short)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            for k, v in _SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:  # the client went away
            pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._json(405, {"error": "Only GET requests are served (the API is read-only)."})

    def do_GET(self) -> None:
        try:
            if not self._host_ok():
                raise ApiError(403, "Requests must address this server by a loopback host name.")
            url = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            if url.path.startswith("/api/"):
                if self.headers.get(API_HEADER) != "1":  # cross-origin no-cors cannot set it
                    raise ApiError(
                        403,
                        f"API requests must carry the header '{API_HEADER}: 1' (the viewer's "
                        "page sends it; a page on another origin cannot).",
                    )
                self._api(url.path[5:], params)
            else:
                self._static(url.path)
        except ApiError as err:
            self._json(err.status, {"error": err.message})
        except BrokenPipeError:  # the browser went away
            pass
        except Exception as err:  # noqa: BLE001 - never a stack trace to the client; the log gets it
            traceback.print_exc(file=sys.stderr)
            self._json(
                500, {"error": f"Internal error ({type(err).__name__}). See the server log."}
            )

    def _api(self, name: str, params: dict[str, str]) -> None:
        viewer = self.server.viewer
        if name in ("tile", "overview"):
            body, headers = viewer.tile(params) if name == "tile" else viewer.overview(params)
            headers["Cache-Control"] = "private, max-age=3600"
            self._send(200, body, "application/octet-stream", headers)
            return
        routes: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
            "meta": viewer.meta,
            "heads": viewer.heads,
            "grid": viewer.grid,
            "head": viewer.head,
            "doc": viewer.doc,
            "row": viewer.row,
            "col": viewer.col,
            "pair": viewer.pair,
            "sql": viewer.user_sql,
        }
        handler = routes.get(name)
        if handler is None:
            raise ApiError(
                404,
                f"No API endpoint /api/{name}. Endpoints: {', '.join(routes)}, tile, overview.",
            )
        self._json(200, handler(params))

    def _static(self, path: str) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        if path not in ("/", "/index.html") and not path.startswith("/static/"):
            raise ApiError(404, f"Nothing at {path[:80]}. The viewer is at /.")
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:  # only the shipped files, by exact name: no path traversal
            raise ApiError(404, f"No static file {name[:80]!r}.")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, files[name].read_bytes(), ctype, {"Cache-Control": "no-cache"})


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], viewer: Viewer, *, verbose: bool) -> None:
        self.viewer = viewer
        self.verbose = verbose
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.viewer.close()


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(
    paths: Sequence[Location | Store],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    verbose: bool = False,
    **viewer_options: Any,
) -> _Server:
    """A ready, not yet running server (``port=0`` picks a free port; see ``.url``)."""
    viewer = Viewer(paths, **viewer_options)
    cls = _Server6 if ":" in host else _Server
    return cls((host, port), viewer, verbose=verbose)


def serve(
    *paths: Location | Store,
    host: str = "127.0.0.1",
    port: int = 8765,
    verbose: bool = False,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the viewer for ``paths`` until interrupted (Ctrl-C); prints or hands over its URL."""
    server = make_server(paths, host=host, port=port, verbose=verbose)
    (ready or (lambda url: print(f"attnstore viewer at {url} (Ctrl-C stops it)", flush=True)))(
        server.url
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
