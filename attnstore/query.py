"""SQL over a store's tables with DuckDB (the only module that imports duckdb).

Each query gets a fresh in-memory connection with one view per table (``docs``, ``tokens``,
``heads``) over exactly the committed Parquet parts, plus ``head_summary`` (one row per layer and
head: count-weighted corpus means and a label, see :mod:`attnstore.labels`), so readers never see a batch that is still
being written and take no locks: any number of processes can query a store while it grows.
Only read statements run (``SELECT``/``WITH``/``EXPLAIN``/``DESCRIBE``/``SUMMARIZE``); parameters are
bound by DuckDB (``?`` or ``$name``), never formatted into the SQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import duckdb

from attnstore import index
from attnstore.errors import QueryError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa

    from attnstore.store import Store

__all__ = ["connect", "run"]

_READ_ONLY: Final = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


def _quote(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def _head_summary_sql() -> str:
    """Corpus-level view per (layer, head): count-weighted means (mergeable) and a label."""
    from attnstore.labels import label_sql

    q1 = ("prev_token", "sink", "self", "entropy", "max_weight", "mean_distance")
    means = [f"sum({c} * n_queries) / nullif(sum(n_queries), 0) AS {c}" for c in q1]
    means += [
        "sum(duplicate * n_duplicate) / nullif(sum(n_duplicate), 0) AS duplicate",
        "sum(induction * n_induction) / nullif(sum(n_induction), 0) AS induction",
    ]
    return (
        "CREATE VIEW head_summary AS WITH m AS (SELECT layer, head, any_value(kv_head) AS kv_head, "
        "count(*) AS n_docs, " + ", ".join(means) + ", sum(n_queries) AS n_queries, "
        "sum(n_duplicate) AS n_duplicate, sum(n_induction) AS n_induction "
        "FROM heads GROUP BY layer, head) "
        f"SELECT *, {label_sql()} AS label FROM m ORDER BY layer, head"
    )


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """A new in-memory connection with the store's views defined (tables and ``head_summary``)."""
    con = duckdb.connect(":memory:")
    for name in index.TABLES:
        files = store.files(name)
        if files:
            paths = ", ".join(_quote(str(f)) for f in files)
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{paths}])")
        else:
            con.register(f"_empty_{name}", index.empty_table(name))
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name}")
    con.execute(_head_summary_sql())
    return con


def run(store: Store, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
    """Run one read-only statement; the result as a pyarrow Table."""
    con = connect(store)
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as err:
            raise QueryError(f"Malformed SQL: {err}") from None
        if len(statements) != 1:
            raise QueryError(f"Expected exactly one SQL statement. Got {len(statements)}.")
        kind = statements[0].type
        if kind not in _READ_ONLY:
            raise QueryError(
                f"Only read-only statements run on a store (SELECT, WITH, EXPLAIN, DESCRIBE). "
                f"Got a {kind.name} statement."
            )
        try:
            relation = con.sql(sql, params=params)
            if relation is None:  # pragma: no cover - read statements always return rows
                raise QueryError("The statement returned no result set.")
            # DuckDB 2 calls it to_arrow_table; 1.x returns a Table from arrow().
            fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
            return fetch()
        except duckdb.Error as err:
            raise QueryError(f"{type(err).__name__}: {err}") from None
    finally:
        con.close()
