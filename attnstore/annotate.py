"""``attnstore parse`` and ``attnstore probe``: annotations added to a store after extraction.

Both are the one post-hoc pass (:func:`attnstore.analyses.posthoc.analyze`) with a built-in
analysis; they live with their families: :mod:`attnstore.analyses.syntax.annotate` and
:mod:`attnstore.analyses.probes.annotate`.
"""

from __future__ import annotations

from attnstore.analyses.probes.annotate import add_probes
from attnstore.analyses.syntax.annotate import add_parses

__all__ = ["add_parses", "add_probes"]
