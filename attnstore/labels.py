"""Head labels from documented score thresholds (informative, never stored as data).

A head gets the label whose score clears its threshold by the widest margin, ``"none"`` if no
score does. Thresholds come from the literature (see ``shared/notes/patterns.md``):

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
from collections.abc import Mapping
from typing import Final

__all__ = ["LABELS", "THRESHOLDS", "label_of", "label_sql"]

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


def label_sql() -> str:
    """The same rule as a DuckDB expression over score columns (used by ``head_summary``)."""
    margins = {}
    for label, (column, threshold) in THRESHOLDS.items():
        expr = f"coalesce({column} - {threshold}, -1e9)"
        if label == "diffuse":
            expr = f"CASE WHEN max_weight <= {DIFFUSE_MAX_WEIGHT} THEN {expr} ELSE -1e9 END"
        margins[label] = expr
    best = f"greatest({', '.join(margins.values())})"
    whens = " ".join(f"WHEN {expr} = {best} THEN '{label}'" for label, expr in margins.items())
    return f"CASE WHEN {best} < 0 THEN 'none' {whens} END"
