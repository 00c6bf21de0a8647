"""The corpus level of the sparsity analysis: label thresholds and the ``sparsity_summary`` view
(``schemas/sparsity.md``). Imports nothing of the store, so :mod:`attnstore.query` can build the
view."""

from __future__ import annotations

from typing import Final

from attnstore.index import SPARSITY_COLUMNS

__all__ = ["LONG_QUERIES", "RETRIEVAL_MIN", "RETRIEVAL_MIN_N", "STREAMING_MIN", "summary_sql"]

#: DuoAttention's streaming budget: ``sink`` first tokens plus ``recent`` most recent ones.
_STREAM_BUDGET: Final = 128 + 256
#: Labels of the ``sparsity_summary`` view (schemas/sparsity.md). ``streaming``: at least this share
#: of the mass inside the streaming budget, over documents longer than the budget (shorter ones
#: are inside it whatever the head does).
STREAMING_MIN: Final = 0.95
#: Queries a document needs before its ``stream`` says anything: rows q < 384 see only keys
#: inside the 128 + 256 budget.
LONG_QUERIES: Final = _STREAM_BUDGET
#: ``retrieval``: Wu et al. 2024 call a head a retrieval head from a retrieval score of 0.1, here
#: over at least this many answer tokens.
RETRIEVAL_MIN: Final = 0.1
RETRIEVAL_MIN_N: Final = 10


def summary_sql() -> str:
    """``CREATE VIEW sparsity_summary``: per (layer, head), means weighted by ``n_queries``
    (``retrieval`` by ``n_retrieval``), ``stream_long`` over documents longer than the streaming
    budget, and a label (``retrieval``, ``streaming`` or ``none``)."""
    means = [
        f"sum({c} * n_queries) / nullif(sum(n_queries), 0) AS {c}"
        for c in SPARSITY_COLUMNS
        if c != "retrieval"
    ]
    long = f"CASE WHEN n_queries >= {LONG_QUERIES} THEN n_queries END"
    return (
        "CREATE VIEW sparsity_summary AS WITH m AS (SELECT layer, head, count(*) AS n_docs, "
        + ", ".join(means)
        + f", sum(stream * ({long})) / nullif(sum({long}), 0) AS stream_long, "
        "sum(retrieval * n_retrieval) / nullif(sum(n_retrieval), 0) AS retrieval, "
        f"sum(n_queries)::BIGINT AS n_queries, coalesce(sum({long}), 0)::BIGINT AS n_queries_long, "
        "sum(n_retrieval)::BIGINT AS n_retrieval, count(retrieval)::BIGINT AS n_needles "
        "FROM sparsity GROUP BY layer, head) "
        f"SELECT *, CASE WHEN retrieval >= {RETRIEVAL_MIN} AND n_retrieval >= {RETRIEVAL_MIN_N} "
        f"THEN 'retrieval' WHEN stream_long >= {STREAMING_MIN} THEN 'streaming' ELSE 'none' END "
        "AS label FROM m ORDER BY layer, head"
    )
