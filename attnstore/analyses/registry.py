"""Which analyses exist: the built-in ones (known in code) and those of the entry point group.

``attnstore.analyses`` (:data:`~attnstore.abc.analysis.ENTRY_POINT_GROUP`) is the group under which
a package registers an analysis class (constructed with no arguments). The built-in families are
registered under the same group in attnstore's own ``pyproject.toml``, and are also listed here in
:data:`BUILTIN` so they work from a source checkout whose metadata predates them.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Final

from attnstore.abc.analysis import ENTRY_POINT_GROUP
from attnstore.errors import AnalysisError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.abc.analysis import Analysis

__all__ = ["BUILTIN", "BUILTIN_TABLES", "DEFAULT", "available", "load", "resolve"]

#: The built-in analyses: entry point name → ``module:Class``.
BUILTIN: Final[dict[str, str]] = {
    "patterns": "attnstore.analyses.patterns:Patterns",
    "syntax": "attnstore.analyses.syntax:Syntax",
    "probes": "attnstore.analyses.probes:Probes",
    "sparsity": "attnstore.analyses.sparsity:Sparsity",
    "value_norm": "attnstore.analyses.value_norm:ValueNorm",
}
#: The built-in tables each built-in analysis owns (no other analysis may use these names).
BUILTIN_TABLES: Final[dict[str, tuple[str, ...]]] = {
    "patterns": ("heads",),
    "syntax": ("syntax", "words", "syntax_baseline"),
    "probes": ("probes", "probe_scores"),
    "sparsity": ("sparsity", "needles"),
}
#: The analyses every extraction runs (each decides per batch whether it applies: ``syntax``
#: when documents carry a parse, ``probes`` when they carry probe items). Add a built-in name here
#: to run it by default.
DEFAULT: Final[tuple[str, ...]] = ("patterns", "syntax", "probes", "sparsity")
_NAME: Final = re.compile(r"^[a-z][a-z0-9_]*$")


def available() -> dict[str, str]:
    """Every registered analysis: name → ``module:Class`` (entry points, then the built-ins)."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTIN}


def load(name: str) -> Analysis:
    """A new instance of the analysis registered as ``name``; :class:`AnalysisError` if unknown,
    if a third-party entry point claims a built-in's name, or if it cannot be constructed."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AnalysisError(str(name), f"Analysis name {name!r} is not [a-z][a-z0-9_]*.")
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in BUILTIN and name in found and found[name].value != BUILTIN[name]:
        raise AnalysisError(
            name,
            f"Analysis {name!r} of {found[name].value} clashes with the built-in analysis "
            f"{name!r}; register it under another name.",
        )
    target = BUILTIN.get(name) or (found[name].value if name in found else None)
    if target is None:
        known = ", ".join(sorted(available())) or "none"
        raise AnalysisError(name, f"Unknown analysis {name!r}. Registered analyses: {known}.")
    module, _, attr = target.partition(":")
    try:
        cls: Any = importlib.import_module(module)
        for part in attr.split("."):
            cls = getattr(cls, part)
        instance = cls()
    except Exception as err:  # a broken plug-in is refused with its name
        raise AnalysisError(
            name, f"Analysis {name!r} ({target}) cannot be loaded: {type(err).__name__}: {err}"
        ) from err
    return instance  # type: ignore[no-any-return]


def resolve(analyses: Sequence[str | Analysis]) -> list[Analysis]:
    """Names (loaded) and instances (kept), in order."""
    return [load(a) if isinstance(a, str) else a for a in analyses]
