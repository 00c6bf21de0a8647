"""``/api/sql``: a user's read-only SELECT on a store, bounded in time, rows, bytes and concurrency."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from attnstore.viewer.core import (
    SQL_CONCURRENCY,
    Source,
    ViewerCore,
    bounded,
    relation_of,
    too_long,
)
from attnstore.viewer.params import ApiError
from attnstore.viewer.values import jsonable

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa

__all__ = ["UserSql"]


class UserSql(ViewerCore):
    """``/api/sql``."""

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
                    raise ApiError(400, too_long(self.time_limit))
                record = dict(zip(names, map(jsonable, row.values()), strict=True))
                size += len(json.dumps(record, ensure_ascii=False, allow_nan=False)) + 1
                if size > self.result_bytes:
                    truncated = True
                    break
                rows.append(record)
            if time.perf_counter() > deadline:
                raise ApiError(400, too_long(self.time_limit))
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
        self, src: Source, sql: str, params: Sequence[Any] | None, cap: int, deadline: float
    ) -> pa.Table:
        """User SQL as an Arrow table of ≤ ``cap`` rows, interrupted at ``deadline``."""
        with bounded(src, deadline - time.perf_counter(), self.time_limit):
            relation = relation_of(src, sql, params).limit(cap)
            fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
            table: pa.Table = fetch()
        return table


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
