"""The served stores: each one's reader and its locked DuckDB connection (:class:`Source`), and
the queries the pages run on it, one at a time and interrupted after a time limit (:class:`ViewerCore`,
the base of :class:`~attnstore.viewer.api.Viewer`)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from attnstore.errors import AttnStoreError
from attnstore.query import connect
from attnstore.sqlpolicy import lock_down
from attnstore.storage import location_text
from attnstore.store import Store
from attnstore.viewer.cache import CACHE_BYTES, MatrixCache
from attnstore.viewer.params import ApiError, int_param

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import duckdb

    from attnstore.storage import Location

__all__ = ["ROW_CAP", "SQL_TIME_LIMIT", "Source", "ViewerCore", "bounded", "relation_of"]

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
#: Columns of ``head_summary`` that are identifiers or counts, not scores.
_NOT_SCORES: Final = frozenset({"layer", "head", "kv_head", "n_docs"})


@dataclass
class Source:
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


class ViewerCore:
    """The stores a viewer serves, by position (``store=0``, ``store=1`` …), and the page queries."""

    def __init__(
        self,
        paths: Sequence[Location | Store],
        *,
        time_limit: float = SQL_TIME_LIMIT,
        row_cap: int = ROW_CAP,
        memory_limit: str = "2GB",
        result_bytes: int = RESULT_BYTES,
    ) -> None:
        if not paths:
            raise AttnStoreError("Expected at least one store to serve. Got none.")
        self.time_limit = time_limit
        self.row_cap = row_cap
        self.result_bytes = result_bytes
        self._sql_slots = threading.BoundedSemaphore(SQL_CONCURRENCY)
        self.sources: list[Source] = []
        self.cache = MatrixCache(CACHE_BYTES)
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
                Source(i, name, store, con, scores, bool(n_syntax), bool(n_probe), int(n_docs))
            )

    def close(self) -> None:
        for src in self.sources:
            src.con.close()

    # -- parameters ------------------------------------------------------------------------
    def source(self, params: dict[str, str]) -> Source:
        i = int_param(params, "store", 0, 0, len(self.sources) - 1)
        return self.sources[i]

    def _layer_head(self, src: Source, params: dict[str, str]) -> tuple[int, int]:
        layers, heads = src.store.manifest["layers"], src.store.manifest["heads"]
        layer = int_param(params, "layer")
        head = int_param(params, "head")
        if layer not in layers:
            raise ApiError(404, f"No layer {layer} in store {src.name!r}. Stored layers: {layers}.")
        if head not in heads:
            raise ApiError(404, f"No head {head} in store {src.name!r}. Stored heads: {heads}.")
        return layer, head

    def _score(self, src: Source, params: dict[str, str], name: str, default: str) -> str:
        score = params.get(name, default)
        if score not in src.scores:
            raise ApiError(
                400, f"Expected {name} to be one of {', '.join(src.scores)}. Got {score!r}."
            )
        return score

    # -- SQL -----------------------------------------------------------------------------------
    def query(
        self,
        src: Source,
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
        with bounded(src, time_limit, time_limit):
            relation = relation_of(src, sql, params)
            if cap is not None:
                relation = relation.limit(cap + 1)
            columns = list(relation.columns)
            rows = relation.fetchall()
        truncated = cap is not None and len(rows) > cap
        return columns, rows[:cap] if cap is not None else rows, truncated


@contextlib.contextmanager
def bounded(src: Source, seconds: float, limit: float) -> Iterator[None]:
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
            raise ApiError(400, too_long(limit)) from None
        except duckdb.Error as err:
            raise ApiError(400, f"{type(err).__name__}: {err}") from None
        finally:
            timer.cancel()


def relation_of(src: Source, sql: str, params: Sequence[Any] | None) -> Any:
    relation = src.con.sql(sql, params=params)
    if relation is None:
        raise ApiError(400, "The statement returned no rows. Expected a SELECT query.")
    return relation


def too_long(limit: float) -> str:
    return (
        f"The query ran longer than the time limit of {limit:g} s and was stopped. Add a WHERE "
        "clause or a LIMIT, or aggregate before joining."
    )
