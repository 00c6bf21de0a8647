"""What ``attnstore verify`` finds: :class:`Problem` rows gathered in a :class:`VerifyReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Problem", "VerifyReport"]


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    location: str  # a path relative to the store, with a detail after ':' where useful
    message: str


@dataclass
class VerifyReport:
    path: str
    commits: int = 0
    files_checked: int = 0
    matrices_checked: int = 0
    #: (document, layer, head) overviews whose values were checked (``--overview N``)
    overviews_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def error(self, location: str, message: str) -> None:
        self.problems.append(Problem("error", location, message))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "commits": self.commits,
            "files_checked": self.files_checked,
            "matrices_checked": self.matrices_checked,
            "overviews_checked": self.overviews_checked,
            "problems": [p.__dict__ for p in self.problems],
        }
