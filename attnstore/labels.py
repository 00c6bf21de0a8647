"""Head labels from documented score thresholds (informative, never stored as data).

A head gets the label whose score clears its threshold by the widest margin, ``"none"`` if no
score does. Thresholds come from the literature (scores are defined in ``schemas/scores.md``):

============== ======================= ==================================================
label          rule                     source
============== ======================= ==================================================
induction      induction ≥ 0.4          ARENA induction detector, on the probe corpus
previous-token prev_token ≥ 0.4         ARENA ``prev_attn_detector``
duplicate      duplicate ≥ 0.4          by analogy with ARENA (no canonical value)
self           self ≥ 0.4               ARENA ``current_attn_detector``
sink           sink ≥ 0.4               ARENA ``first_attn_detector`` (Gu et al. use 0.3)
diffuse        entropy ≥ 0.8 and        Clark et al. 2019: broad heads put at most 10% on
               max_weight ≤ 0.1         any one token
============== ======================= ==================================================

The same rule is available in SQL (the ``head_summary`` view) and in Python (:func:`label_of`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["LABELS", "PREFIXES", "THRESHOLDS", "check_label", "label_of", "label_sql", "margin_sql"]

#: label → (score column, threshold)
THRESHOLDS: Final[dict[str, tuple[str, float]]] = {
    "induction": ("induction", 0.4),
    "previous-token": ("prev_token", 0.4),
    "duplicate": ("duplicate", 0.4),
    "self": ("self", 0.4),
    "sink": ("sink", 0.4),
    "diffuse": ("entropy", 0.8),
}
DIFFUSE_MAX_WEIGHT: Final = 0.1
#: Class index order for training labels: "none" is 0.
LABELS: Final = ("none", *THRESHOLDS)
#: schemas/probes.md: ``semantic:<kind>`` needs gain ≥ 0.20 over n ≥ 30 items and
#: mass_target ≥ max(0.10, 2 · mass_distractor) (accuracy alone can come from tiny masses).
SEMANTIC_GAIN: Final = 0.20
SEMANTIC_MIN_N: Final = 30
SEMANTIC_MIN_MASS: Final = 0.10
SEMANTIC_MASS_RATIO: Final = 2
#: Labels of heads scored against annotations: ``syntactic:<relation>`` (parsed stores) and
#: ``semantic:<kind>`` (stores with probes).
PREFIXES: Final = ("syntactic", "semantic")


def _margin(label: str, scores: Mapping[str, float | None]) -> float:
    column, threshold = THRESHOLDS[label]
    value = scores.get(column)
    if value is None or math.isnan(value):
        return -math.inf
    if label == "diffuse":
        weight = scores.get("max_weight")
        if weight is None or math.isnan(weight) or weight > DIFFUSE_MAX_WEIGHT:
            return -math.inf
    return value - threshold


def label_of(scores: Mapping[str, float | None]) -> str:
    """The label of one head from its scores (a row of ``heads`` or ``head_summary``).

    >>> label_of({"induction": 0.9, "prev_token": 0.5, "sink": 0.1})
    'induction'
    >>> label_of({"prev_token": 0.1, "sink": 0.2})
    'none'
    """
    best = max(THRESHOLDS, key=lambda label: _margin(label, scores))
    return best if _margin(best, scores) >= 0 else "none"


def _margins_sql() -> dict[str, str]:
    margins = {}
    for label, (column, threshold) in THRESHOLDS.items():
        expr = f"coalesce({column} - {threshold}, -1e9)"
        if label == "diffuse":
            expr = f"CASE WHEN max_weight <= {DIFFUSE_MAX_WEIGHT} THEN {expr} ELSE -1e9 END"
        margins[label] = expr
    return margins


def margin_sql() -> str:
    """How far a head's clearest pattern score is above its label's threshold, as a DuckDB
    expression over score columns: ≥ 0 for a pattern label, negative otherwise, NULL when no
    score can be computed. ``attnstore heads --top K`` ranks by it when no ``--score`` is given."""
    best = f"greatest({', '.join(_margins_sql().values())})"
    return f"CASE WHEN {best} <= -1e8 THEN NULL ELSE {best} END"


def check_label(label: str, present: Iterable[str] = ()) -> str:
    """``label`` if it is a pattern label, ``none``, or an annotation label found in ``present``
    (the labels and ``syntactic:``/``semantic:`` names a store knows); else
    :class:`~attnstore.errors.UnknownLabelError` listing the valid ones.

    >>> check_label("induction")
    'induction'
    >>> check_label("inductoin")
    Traceback (most recent call last):
    ...
    attnstore.errors.UnknownLabelError: Unknown label 'inductoin'. Expected one of: none, induction, previous-token, duplicate, self, sink, diffuse, syntactic:<relation> (none in this store), semantic:<kind> (none in this store).
    """
    from attnstore.errors import UnknownLabelError

    known = set(present)
    if label in LABELS or label in known:
        return label
    valid = list(LABELS)
    for prefix, what in zip(PREFIXES, ("relation", "kind"), strict=True):
        names = sorted(x for x in known if x.startswith(f"{prefix}:"))
        valid.append(f"{prefix}:<{what}> ({', '.join(names) if names else 'none in this store'})")
    raise UnknownLabelError(label, valid)


def label_sql() -> str:
    """The same rule as a DuckDB expression over score columns (used by ``head_summary``)."""
    margins = _margins_sql()
    best = f"greatest({', '.join(margins.values())})"
    whens = " ".join(f"WHEN {expr} = {best} THEN '{label}'" for label, expr in margins.items())
    return f"CASE WHEN {best} < 0 THEN 'none' {whens} END"
