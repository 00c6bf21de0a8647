"""Analyses: attention rows in, table rows out, while the model runs (``schemas/analyses.md``).

The protocol (:class:`Analysis`, :class:`Batch`) is in :mod:`attnstore.abc.analysis`; this package
holds the machinery and the built-in families, each in its own sub-package:

- :mod:`attnstore.analyses.registry`: the registered analyses (entry point group
  ``attnstore.analyses`` plus the built-ins), :func:`load` by name;
- :mod:`attnstore.analyses.tables`: plug-in tables registered in the store (``analyses/<table>.json``);
- :mod:`attnstore.analyses.runner`: the runner extraction drives, checking every analysis;
- :mod:`attnstore.analyses.posthoc`: any analysis over a store's decoded matrices
  (``attnstore analyze``, ``parse``, ``probe``);
- :mod:`attnstore.analyses.patterns`, :mod:`~attnstore.analyses.syntax`,
  :mod:`~attnstore.analyses.probes`, :mod:`~attnstore.analyses.sparsity` (with the needle
  probe's retrieval score, ``schemas/sparsity.md``), :mod:`~attnstore.analyses.value_norm`: the
  built-in families.

Importing this package is light (no torch, no store): the store imports its table registry.
"""

from __future__ import annotations

from attnstore.abc.analysis import ENTRY_POINT_GROUP, Analysis, Batch
from attnstore.analyses.registry import BUILTIN, DEFAULT, available, load

__all__ = ["BUILTIN", "DEFAULT", "ENTRY_POINT_GROUP", "Analysis", "Batch", "available", "load"]
