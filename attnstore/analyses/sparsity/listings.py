"""``heads --sparsity`` and ``heads --retrieval``: the sparsity analysis's listings, registered in
the catalog of head listings so an empty listing says what to run wherever it is shown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnstore.index import SPARSITY_COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa

    from attnstore.store import Store

__all__ = ["best_retrieval_heads", "sparsity_heads"]


def _register_listings() -> None:
    """``heads --sparsity`` and ``heads --retrieval`` in the catalog of head listings, so an empty
    listing says what to run wherever it is shown."""
    from attnstore.catalog import LISTINGS, Listing, register

    if "sparsity" not in LISTINGS:
        register(
            Listing(
                name="sparsity", view="sparsity_summary",
                source_count="SELECT count(*) FROM sparsity", what="sparsity rows",
                remedy="extract again (the sparsity analysis runs at extraction)",
                unit="queries", group="head",
            )
        )  # fmt: skip
    if "retrieval" not in LISTINGS:
        register(
            Listing(
                name="retrieval", view="sparsity_summary",
                source_count="SELECT count(*) FROM needles", what="needle documents",
                remedy="extract with --corpus 'probe:needle?tokens=2048&count=10' and a "
                "--max-length of at least its tokens to score retrieval heads",
                unit="answer tokens", group="head",
            )
        )  # fmt: skip


_register_listings()


def best_retrieval_heads(store: Store, *, top: int = 10) -> pa.Table:
    """The ``top`` heads with the highest corpus ``retrieval`` score (``sparsity_summary``).

    Raises :class:`~attnstore.errors.QueryError` saying why when there is nothing to list.
    """
    from attnstore.catalog import require
    from attnstore.errors import QueryError

    require(store, "retrieval")
    scored = store.sql("SELECT count(*) FROM sparsity WHERE n_retrieval > 0").column(0)[0]
    if not scored.as_py():
        raise QueryError(
            "This store has needle documents but no retrieval scores: their answers were not "
            "stored (truncated by --max-length?) or the store has no sparsity rows."
        )
    return store.sql(
        "SELECT layer, head, round(retrieval, 4) AS retrieval, n_retrieval, n_needles, "
        "round(stream_long, 4) AS stream_long, round(span90, 1) AS span90, label "
        "FROM sparsity_summary WHERE n_retrieval > 0 "
        "ORDER BY retrieval DESC, layer, head LIMIT ?",
        [top],
    )


def sparsity_heads(store: Store, *, top: int | None = None) -> pa.Table:
    """Every head's corpus sparsity statistics; with ``top``, the ``top`` most streaming heads
    (highest ``stream_long``, then ``stream``)."""
    from attnstore.catalog import require

    require(store, "sparsity")
    cols = ", ".join(
        f"round({c}, {1 if c.startswith('span') else 4}) AS {c}"
        for c in (*SPARSITY_COLUMNS[:-1], "stream_long", "retrieval")
    )
    sql = f"SELECT layer, head, n_docs, {cols}, n_queries, n_retrieval, label FROM sparsity_summary"
    if top is None:
        return store.sql(sql + " ORDER BY layer, head")
    return store.sql(
        sql + " ORDER BY stream_long DESC NULLS LAST, stream DESC NULLS LAST, layer, head LIMIT ?",
        [top],
    )
