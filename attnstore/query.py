"""SQL over a store's tables with DuckDB (the only module that imports duckdb).

Each query gets a fresh in-memory connection with one view per table (``docs``, ``tokens``,
``heads``) over exactly the committed Parquet parts, plus two views: ``head_summary`` (one row per layer and
head: count-weighted corpus means and a label, see :mod:`attnstore.labels`) and ``syntax_heads``
(per layer, head, relation and direction: n, accuracy, the best fixed-offset baseline and the gain,
shared/spec/syntax.md), so readers never see a batch that is still
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
    from attnstore.scores import SCORE_COLUMNS, WEIGHT_COLUMN

    means = [
        f"sum({c} * {WEIGHT_COLUMN[c]}) / nullif(sum({WEIGHT_COLUMN[c]}), 0) AS {c}"
        for c in SCORE_COLUMNS
    ]
    return (
        "CREATE VIEW head_summary AS WITH m AS (SELECT layer, head, any_value(kv_head) AS kv_head, "
        "count(*) AS n_docs, " + ", ".join(means) + ", sum(n_queries) AS n_queries, "
        "sum(n_duplicate) AS n_duplicate, sum(n_induction) AS n_induction "
        "FROM heads GROUP BY layer, head), "
        # relations where the head beats the best fixed offset by >= 0.10 with n >= 30 (spec)
        "s AS (SELECT layer, head, string_agg(relation || ' ' || direction, ', ' ORDER BY gain DESC) "
        "AS syntactic, arg_max(relation, gain) AS best_relation FROM syntax_heads "
        f"WHERE gain >= {SYNTACTIC_GAIN} AND n >= {SYNTACTIC_MIN_N} GROUP BY layer, head), "
        f"l AS (SELECT m.*, {label_sql()} AS pattern_label, s.syntactic, s.best_relation "
        "FROM m LEFT JOIN s USING (layer, head)) "
        "SELECT * EXCLUDE (pattern_label, best_relation), CASE WHEN pattern_label = 'none' AND "
        "best_relation IS NOT NULL THEN 'syntactic:' || best_relation ELSE pattern_label END "
        "AS label FROM l ORDER BY layer, head"
    )


#: spec/syntax.md: a head is syntactic for a relation when accuracy − baseline ≥ 0.10 "with n
#: large enough to matter"; attnstore labels it so from n ≥ 30 instances over the corpus.
SYNTACTIC_GAIN: Final = 0.10
SYNTACTIC_MIN_N: Final = 30

_SYNTAX_HEADS_SQL: Final = """
CREATE VIEW syntax_heads AS
WITH acc AS (
    SELECT layer, head, relation, direction, sum(n)::BIGINT AS n, sum(correct)::BIGINT AS correct
    FROM syntax GROUP BY layer, head, relation, direction),
base AS (
    SELECT relation, direction, sum(n)::BIGINT AS n_baseline,
        greatest(sum(correct_1), sum(correct_2), sum(correct_3), sum(correct_4), sum(correct_5),
                 sum(correct_6)) / nullif(sum(n), 0) AS baseline,
        list_position([sum(correct_1), sum(correct_2), sum(correct_3), sum(correct_4),
                       sum(correct_5), sum(correct_6)],
                      greatest(sum(correct_1), sum(correct_2), sum(correct_3), sum(correct_4),
                               sum(correct_5), sum(correct_6))) AS baseline_offset
    FROM syntax_baseline GROUP BY relation, direction)
SELECT acc.layer, acc.head, acc.relation, acc.direction, acc.n, acc.correct,
    acc.correct / nullif(acc.n, 0) AS accuracy, base.baseline, base.baseline_offset,
    acc.correct / nullif(acc.n, 0) - base.baseline AS gain
FROM acc JOIN base USING (relation, direction)
ORDER BY acc.relation, acc.direction, acc.layer, acc.head
"""


_DUCKDB_TYPES: Final = {
    "int16": "SMALLINT", "int32": "INTEGER", "int64": "BIGINT", "double": "DOUBLE",
    "string": "VARCHAR", "bool": "BOOLEAN",
}  # fmt: skip


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """A new in-memory connection with the store's views defined (tables and summaries).

    Every table view has exactly the columns of the current format: a column that parts written
    by an older minor version lack reads as NULL.
    """
    con = duckdb.connect(":memory:")
    for name in index.TABLES:
        files = store.files(name)
        if not files:
            con.register(f"_empty_{name}", index.empty_table(name))
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name}")
            continue
        paths = ", ".join(_quote(str(f)) for f in files)
        con.execute(
            f"CREATE VIEW _raw_{name} AS SELECT * FROM read_parquet([{paths}], union_by_name = true)"
        )
        present = {row[0] for row in con.execute(f"DESCRIBE _raw_{name}").fetchall()}
        columns = [
            f'"{f.name}"'
            if f.name in present
            else f'CAST(NULL AS {_DUCKDB_TYPES[str(f.type)]}) AS "{f.name}"'
            for f in index.SCHEMAS[name]
        ]
        con.execute(f"CREATE VIEW {name} AS SELECT {', '.join(columns)} FROM _raw_{name}")
    con.execute(_SYNTAX_HEADS_SQL)
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
