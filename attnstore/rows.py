"""Row selection (``--rows``) and where each stored query row lives in a document's packed data.

A row selection is a comma-separated list of Python slices *relative to each document*
(``"-64:"`` the last 64 query rows, ``"0:128,-64:"``, ``"::8"``), resolved against each document's
length ``T``. Stored rows keep the row-major packed order of :mod:`attnstore.packing` but only for the
selected rows: row ``r`` contributes its keys ``0 … r``, rows in increasing order. With every row
selected this is exactly the ``"tril-rowmajor"`` triangle, so stores without ``--rows`` are unchanged.

>>> sel = RowSelection.parse("0:2,-1:")
>>> DocRows.of(sel, 5).rows.tolist(), DocRows.of(sel, 5).length
([0, 1, 4], 8)
>>> DocRows.of(None, 3).length  # every row: the packed triangle
6
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import numpy as np

from attnstore.errors import AttnStoreError, MatrixNotFoundError
from attnstore.packing import packed_length

__all__ = ["DocRows", "RowSelection", "RowSpecError", "RowsNotStoredError"]

_SLICE: Final = re.compile(r"^\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?)?$")


class RowSpecError(AttnStoreError, ValueError):
    """A ``--rows`` specification that is not a list of Python slices."""


class RowsNotStoredError(MatrixNotFoundError):
    """A read asked for query rows that the store's ``--rows`` selection did not keep."""


@dataclass(frozen=True)
class RowSelection:
    """Parsed ``--rows``: slices (or single rows) applied to each document's ``range(T)``."""

    parts: tuple[tuple[int | None, int | None, int | None, bool], ...]
    spec: str

    @classmethod
    def parse(cls, spec: str | RowSelection | None) -> RowSelection | None:
        """``None``/empty → ``None`` (every row); else the parsed selection or :class:`RowSpecError`."""
        if spec is None or isinstance(spec, RowSelection):
            return spec
        text = str(spec).strip()
        if not text or text in (":", "::"):
            return None
        parts = []
        for item in text.split(","):
            m = _SLICE.match(item)
            if not m or not item.strip():
                raise RowSpecError(
                    f"--rows takes Python slices relative to each document, separated by commas "
                    f"(e.g. '-64:', '0:128,-64:', '::8', '5'). Got {item.strip()!r} in {text!r}."
                )
            start, stop, step = (None if g is None else int(g) for g in m.groups())
            single = ":" not in item
            if step == 0:
                raise RowSpecError(f"--rows: a slice step cannot be zero. Got {item.strip()!r}.")
            if step is not None and step < 0:
                raise RowSpecError(
                    f"--rows: rows are stored in increasing order; use a positive step. "
                    f"Got {item.strip()!r}."
                )
            parts.append((start, stop, step, single))
        return cls(tuple(parts), ",".join(p.strip() for p in text.split(",")))

    def rows(self, n_tokens: int) -> np.ndarray:
        """The selected rows of a document of ``n_tokens`` tokens: sorted, unique, int64."""
        keep = np.zeros(n_tokens, dtype=bool)
        for start, stop, step, single in self.parts:
            if single:
                assert start is not None
                r = start + n_tokens if start < 0 else start
                if 0 <= r < n_tokens:
                    keep[r] = True
            else:
                keep[slice(start, stop, step)] = True
        return np.flatnonzero(keep).astype(np.int64)

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class DocRows:
    """The stored rows of one document and their offsets in its packed data."""

    n_tokens: int
    #: stored query rows, increasing
    rows: np.ndarray
    #: ``starts[k]``: packed offset of ``rows[k]``; ``starts[-1]`` the total length
    starts: np.ndarray
    every: bool

    @classmethod
    def of(cls, selection: RowSelection | None, n_tokens: int) -> DocRows:
        if selection is None:
            rows = np.arange(n_tokens, dtype=np.int64)
            every = True
        else:
            rows = selection.rows(n_tokens)
            every = len(rows) == n_tokens
        starts = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(rows + 1, out=starts[1:])
        return cls(n_tokens, rows, starts, every)

    @property
    def length(self) -> int:
        """Packed values of the stored rows (``packed_length(T)`` when every row is stored)."""
        return int(self.starts[-1])

    def span(self, start: int, stop: int) -> tuple[int, int, np.ndarray]:
        """Stored rows within ``start … stop - 1``: ``(offset, end, rows)`` in the packed data."""
        k0, k1 = np.searchsorted(self.rows, [start, stop])
        return int(self.starts[k0]), int(self.starts[k1]), self.rows[k0:k1]

    def require(self, start: int, stop: int) -> tuple[int, int]:
        """Packed ``(offset, end)`` of rows ``start … stop - 1``, all of which must be stored."""
        if self.every:
            return packed_length(start), packed_length(stop)
        lo, hi, rows = self.span(start, stop)
        if len(rows) != stop - start:
            missing = sorted(set(range(start, stop)) - set(rows.tolist()))
            shown = ", ".join(map(str, missing[:8])) + (" …" if len(missing) > 8 else "")
            raise RowsNotStoredError(
                f"Query rows {shown} of this document (T={self.n_tokens}) were not stored: the "
                f"store keeps only rows {self.describe()}. Read stored rows (Store.stored_rows) "
                "or extract again with another --rows."
            )
        return lo, hi

    def describe(self) -> str:
        """The stored rows as ranges, e.g. ``0…127, 448…511``."""
        if not len(self.rows):
            return "none"
        breaks = np.flatnonzero(np.diff(self.rows) != 1)
        firsts = np.concatenate([[0], breaks + 1])
        lasts = np.concatenate([breaks, [len(self.rows) - 1]])
        out = [
            f"{self.rows[a]}" if a == b else f"{self.rows[a]}…{self.rows[b]}"
            for a, b in zip(firsts.tolist(), lasts.tolist(), strict=True)
        ]
        return ", ".join(out[:6]) + (" …" if len(out) > 6 else "")
