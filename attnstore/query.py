"""SQL over a store's tables with DuckDB (the only module that imports duckdb).

Each query gets a fresh in-memory connection with one table per store table (``docs``, ``tokens``,
``heads``, …) over exactly the store's committed snapshot (lazy Arrow datasets), plus the views: ``head_summary`` (one row per layer and
head: count-weighted corpus means and a label, see :mod:`attnstore.labels`) and ``syntax_heads``
(per layer, head, relation and direction: n, accuracy, the best fixed-offset baseline and the gain,
schemas/syntax.md) and ``probe_heads`` (per probe kind, layer and head: accuracy, baseline, gain,
masses, Wilson bound, schemas/probes.md) and ``sparsity_summary`` (per layer and head: the
``sparsity`` statistics weighted by ``n_queries``, ``retrieval`` by ``n_retrieval``, and a
``streaming``/``retrieval`` label, schemas/sparsity.md), so readers never see a batch that is still
being written and take no locks: any number of processes can query a store while it grows.
Only read statements run (``SELECT``/``WITH``/``EXPLAIN``/``DESCRIBE``/``SUMMARIZE``); parameters are
bound by DuckDB (``?`` or ``$name``), never formatted into the SQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

import duckdb

from attnstore.analyses.sparsity.views import summary_sql
from attnstore.errors import QueryError
from attnstore.sqlpolicy import READ_ONLY, check_statement, lock_down

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pyarrow as pa

__all__ = ["Tables", "connect", "run", "session"]


class Tables(Protocol):
    """What SQL reads from a store (a :class:`~attnstore.store.Store` is one): its tables' names
    and schemas, and each table as a lazy Arrow dataset of its snapshot."""

    @property
    def schemas(self) -> Mapping[str, pa.Schema]: ...

    def dataset(self, name: str) -> Any: ...


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
        "AS syntactic, arg_max(relation, gain) AS best_relation, max(gain) AS syntactic_gain "
        f"FROM syntax_heads WHERE gain >= {SYNTACTIC_GAIN} AND n >= {SYNTACTIC_MIN_N} "
        f"GROUP BY layer, head), p AS ({_semantic_sql()}), "
        f"l AS (SELECT m.*, {label_sql()} AS pattern_label, s.syntactic, s.best_relation, "
        "s.syntactic_gain, p.semantic, p.best_kind, p.semantic_gain "
        "FROM m LEFT JOIN s USING (layer, head) LEFT JOIN p USING (layer, head)) "
        "SELECT * EXCLUDE (pattern_label, best_relation, syntactic_gain, best_kind, semantic_gain), "
        # schemas/probes.md: between a syntactic and a semantic label the larger gain wins
        "CASE WHEN pattern_label = 'none' AND best_kind IS NOT NULL AND (best_relation IS NULL "
        "OR semantic_gain > syntactic_gain) THEN 'semantic:' || best_kind "
        "WHEN pattern_label = 'none' AND best_relation IS NOT NULL THEN 'syntactic:' || "
        "best_relation ELSE pattern_label END AS label FROM l ORDER BY layer, head"
    )


def _semantic_sql() -> str:
    """Per (layer, head): the probe kinds a head qualifies for (schemas/probes.md), best first."""
    from attnstore.labels import (
        SEMANTIC_GAIN,
        SEMANTIC_MASS_RATIO,
        SEMANTIC_MIN_MASS,
        SEMANTIC_MIN_N,
    )

    return (
        "SELECT layer, head, string_agg(kind, ', ' ORDER BY gain DESC) AS semantic, "
        "arg_max(kind, gain) AS best_kind, max(gain) AS semantic_gain FROM probe_heads "
        f"WHERE gain >= {SEMANTIC_GAIN} AND n >= {SEMANTIC_MIN_N} AND mass_target >= "
        f"greatest({SEMANTIC_MIN_MASS}, {SEMANTIC_MASS_RATIO} * mass_distractor) "
        "GROUP BY layer, head"
    )


#: schemas/probes.md: per (kind, layer, head) over the corpus. ``n`` counts items with a
#: non-NULL ``correct``; masses are means over non-skipped items; the baseline is the better of
#: ``nearest`` and ``first`` over the same n items; ``accuracy_low`` is the 95% Wilson lower bound.
_PROBE_HEADS_SQL: Final = """
CREATE VIEW probe_heads AS
WITH a AS (
    SELECT p.kind, s.layer, s.head, count(s.correct)::BIGINT AS n,
        avg(s.correct::DOUBLE) AS accuracy, avg(s.strict_correct::DOUBLE) AS strict_accuracy,
        avg(s.mass_target) AS mass_target, avg(s.mass_distractor) AS mass_distractor,
        avg(CASE WHEN s.correct IS NOT NULL THEN p.nearest_correct::DOUBLE END) AS nearest,
        avg(CASE WHEN s.correct IS NOT NULL THEN p.first_correct::DOUBLE END) AS first
    FROM probe_scores s JOIN probes p USING (doc_id, item)
    GROUP BY p.kind, s.layer, s.head),
b AS (SELECT *, greatest(nearest, first) AS baseline, 1.959963984540054 AS z FROM a)
SELECT kind, layer, head, n, accuracy, strict_accuracy, mass_target, mass_distractor, baseline,
    accuracy - baseline AS gain,
    (accuracy + z * z / (2 * n) - z * sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)))
        / (1 + z * z / n) AS accuracy_low
FROM b
ORDER BY kind, layer, head
"""

#: schemas/syntax.md: a head is syntactic for a relation when accuracy − baseline ≥ 0.10 "with n
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


def connect(store: Tables) -> duckdb.DuckDBPyConnection:
    """A new in-memory connection with the store's tables and summary views defined.

    Each table is the store's lazy pyarrow Dataset of its current snapshot
    (:meth:`attnstore.store.Store.dataset`), registered under the table's name: DuckDB pushes
    filters and projections into it, so files and row groups that cannot match are never read,
    and nothing is loaded at connect time. Every table has exactly the columns of the current
    format: a column that parts written by an older minor version lack reads as NULL.
    """
    con = duckdb.connect(":memory:")
    for name in store.schemas:  # built-in tables, then the store's plug-in tables (analyses)
        con.register(name, store.dataset(name))
    con.execute(_SYNTAX_HEADS_SQL)
    con.execute(_PROBE_HEADS_SQL)
    con.execute(_head_summary_sql())
    con.execute(summary_sql())
    return con


def session(
    store: Tables, *, threads: int | None = None, memory_limit: str | None = None
) -> duckdb.DuckDBPyConnection:
    """A new in-memory connection over ``store``'s tables and views, locked down
    (:func:`attnstore.sqlpolicy.lock_down`)."""
    con = connect(store)
    try:
        lock_down(con, threads=threads, memory_limit=memory_limit)
    except BaseException:
        con.close()
        raise
    return con


def run(store: Tables, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
    """Run one read-only statement; the result as a pyarrow Table.

    The statement sees the store and nothing else (:mod:`attnstore.sqlpolicy`): file access, the
    temporary folder, extensions and configuration are switched off once the views exist, so even
    ``EXPLAIN ANALYZE COPY …`` or ``read_text(…)`` cannot reach the file system.
    """
    con = session(store)  # the one read-only policy (attnstore.sqlpolicy), shared with the viewer
    try:
        check_statement(con, sql, READ_ONLY)
        try:
            relation = con.sql(sql, params=params)
            if relation is None:  # pragma: no cover - read statements always return rows
                raise QueryError("The statement returned no result set.")
            # DuckDB 2 calls it to_arrow_table; 1.x returns a Table from arrow().
            fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
            return fetch()
        except duckdb.Error as err:
            from attnstore.paths import damaged_file_message

            raise QueryError(damaged_file_message(err) or f"{type(err).__name__}: {err}") from None
    finally:
        con.close()
