"""The analysis runner: every active analysis over exact row blocks of one batch, checked.

:class:`AnalysisRunner` is what extraction (and the post-hoc :func:`attnstore.analyses.analyze`)
drives: :meth:`~AnalysisRunner.begin` before a batch's forward pass, :meth:`~AnalysisRunner.rows`
for every block of query rows of every stored layer, :meth:`~AnalysisRunner.end` after it. Every
call into an analysis is guarded: whatever it raises, or a table that does not fit its schema,
becomes one :class:`~attnstore.errors.AnalysisError` naming the analysis, raised before the batch's
segment exists, so nothing of that batch is committed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from attnstore import index
from attnstore.analyses.registry import BUILTIN, BUILTIN_TABLES
from attnstore.analyses.tables import TableSpec, spec_for
from attnstore.errors import AnalysisError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from attnstore.abc.analysis import Analysis, Batch

__all__ = ["AnalysisRunner", "builtin_key", "label"]


def label(analysis: Any) -> str:
    """The name an error message gives an analysis: its table name, else its class."""
    name = getattr(analysis, "name", None)
    return name if isinstance(name, str) else type(analysis).__name__


def builtin_key(analysis: Any) -> str | None:
    """The built-in analysis ``analysis`` is an instance of (``"syntax"``, …), else ``None``."""
    path = f"{type(analysis).__module__}:{type(analysis).__qualname__}"
    return next((k for k, v in BUILTIN.items() if v == path), None)


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class AnalysisRunner:
    """Checks a list of analyses once, then runs them batch by batch.

    ``tables`` maps every table the analyses produce to its :class:`TableSpec`; ``plugin_specs``
    are those that are not built-in tables (they are registered in the store before the first
    commit). Names must be unique across analyses and built-in table names are reserved for the
    built-in analysis that owns them.
    """

    def __init__(self, analyses: Sequence[Analysis]) -> None:
        self.analyses: list[Analysis] = []
        self.tables: dict[str, TableSpec] = {}
        self._owner: dict[str, str] = {}
        self.plugin_specs: list[TableSpec] = []
        #: the built-in tables among ``tables`` (owned by a built-in analysis)
        self.builtin: set[str] = set()
        self._causal = True
        for a in analyses:
            who = label(a)
            if getattr(a, "inline", False):  # computed by extraction itself (pattern scores)
                continue
            for attr in ("begin", "rows", "end"):
                if not callable(getattr(a, attr, None)):
                    raise AnalysisError(who, f"Analysis {who!r} has no {attr}() method.")
            name = getattr(a, "name", None)
            if not isinstance(name, str):
                raise AnalysisError(who, f"Analysis {who!r} has no name (a str).")
            extra = getattr(a, "extra_schemas", None) or {}
            owned = BUILTIN_TABLES.get(builtin_key(a) or "", ())
            for table, schema in {name: getattr(a, "schema", None), **dict(extra)}.items():
                if table in self._owner:
                    raise AnalysisError(
                        who,
                        f"Analysis {who!r}: table {table!r} clashes with the analysis "
                        f"{self._owner[table]!r}; each table belongs to one analysis.",
                    )
                if table in owned:
                    spec = TableSpec(table, index.SCHEMAS[table], index.SORT_KEYS[table], who)
                    self.builtin.add(table)
                else:
                    spec = spec_for(who, table, schema)
                    self.plugin_specs.append(spec)
                self.tables[table] = spec
                self._owner[table] = who
            self.analyses.append(a)
        self._active: list[Analysis] = []
        self._doc_ids: pa.Array = pa.array([], pa.int64())

    def __bool__(self) -> bool:
        return bool(self.analyses)

    def applies(self, batch: Batch) -> bool:
        """Whether any analysis runs on ``batch`` (set by :meth:`begin`'s choice)."""
        return any(self._applies(a, batch) for a in self.analyses)

    @staticmethod
    def _applies(a: Analysis, batch: Batch) -> bool:
        test = getattr(a, "applies", None)
        return bool(test(batch)) if callable(test) else bool(batch.doc_ids)

    def begin(self, batch: Batch) -> None:
        self._active = [a for a in self.analyses if self._applies(a, batch)]
        skipped = [int(d.doc_id) for d, _ in batch.skipped]
        self._doc_ids = pa.array([*batch.doc_ids, *skipped], pa.int64())
        self._lengths = batch.lengths
        #: encoders (``info["bidirectional"]``): rows weigh keys on both sides of the diagonal
        self._causal = not batch.info.get("bidirectional")
        for a in self._active:
            self._call(a, "begin", batch)

    @property
    def active(self) -> bool:
        return bool(self._active)

    def rows(self, layer: int, q0: int, probs: torch.Tensor) -> None:
        """Query rows ``q0 …`` of ``layer``; entries past a length (and, in a causal model, above
        the diagonal) are 0."""
        if not self._active:
            return
        import torch

        _, _, q, k = probs.shape
        dev = probs.device
        rows = torch.arange(q0, q0 + q, device=dev)
        keys = torch.arange(k, device=dev)
        lengths = self._lengths.to(dev)
        valid = (rows[None, :, None] < lengths[:, None, None]) & (
            keys[None, None, :] < lengths[:, None, None]
        )
        if self._causal:
            valid = valid & (keys[None, :] <= rows[:, None])[None]
        block = probs.float() * valid[:, None]
        for a in self._active:
            self._call(a, "rows", layer, q0, block)

    @property
    def tiled(self) -> bool:
        """Whether every active analysis reads tiles (``tile()``): then a scores-only run in sdpa
        mode hands them cache-sized tiles of the fused pass instead of materialised row blocks."""
        return bool(self._active) and all(callable(getattr(a, "tile", None)) for a in self._active)

    def tile(
        self, layer: int, q0: int, k0: int, probs: torch.Tensor, stats: Any = None
    ) -> None:
        """One tile of ``layer``: rows ``q0 …``, keys ``k0 …`` (``[doc, head, C, K]`` float32; 0 above
        the diagonal and on rows past a length). The tiles of a block of rows come from the
        diagonal down to ``k0 = 0``, every tile of one block before the next block. ``stats``:
        the census pass's :class:`~attnstore.scores.TileStats` of the tile, for the built-in
        analyses that read them (``tile_stats``), or None."""
        for a in self._active:
            if stats is not None and callable(getattr(a, "tile_stats", None)):
                self._call(a, "tile_stats", layer, q0, k0, probs, stats)
            else:
                self._call(a, "tile", layer, q0, k0, probs)

    @property
    def stats_levels(self) -> tuple[float, ...] | None:
        """The span levels the active analyses read from the census pass's tile statistics
        (``tile_stats`` and ``span_levels``), or None when none reads them."""
        readers = [a for a in self._active if callable(getattr(a, "tile_stats", None))]
        if not readers:
            return None
        return tuple(sorted({float(x) for a in readers for x in getattr(a, "span_levels", ())}))

    def end(self) -> dict[str, pa.Table]:
        """Every active analysis's checked tables of this batch, by table name."""
        out: dict[str, pa.Table] = {}
        for a in self._active:
            who = label(a)
            result = self._call(a, "end")
            names = [t for t, owner in self._owner.items() if owner == who]
            if isinstance(result, pa.Table) and len(names) == 1:
                result = {names[0]: result}
            if not isinstance(result, Mapping) or sorted(result) != sorted(names):
                got = sorted(result) if isinstance(result, Mapping) else type(result).__name__
                raise AnalysisError(
                    who, f"Analysis {who!r}: end() returned {got}; expected a pyarrow.Table"
                    + (f" per table {names}." if len(names) > 1 else ".")
                )  # fmt: skip
            for table, rows in result.items():
                out[table] = self._check(who, self.tables[table], rows)
        self._active = []
        return out

    def _call(self, a: Analysis, method: str, *args: Any) -> Any:
        try:
            return getattr(a, method)(*args)
        except AnalysisError:
            raise
        except Exception as err:  # refused, with the analysis named
            who = label(a)
            raise AnalysisError(
                who, f"Analysis {who!r} raised in {method}(): {_line(err)}"
            ) from err

    def _check(self, who: str, spec: TableSpec, rows: Any) -> pa.Table:
        where = f"Analysis {who!r}: table {spec.name!r}"
        if not isinstance(rows, pa.Table):
            raise AnalysisError(who, f"{where} is a {type(rows).__name__}, not a pyarrow.Table.")
        want = [(f.name, f.type) for f in spec.schema]
        got = [(f.name, f.type) for f in rows.schema]
        if got != want:
            raise AnalysisError(
                who,
                f"{where} does not match its schema: got "
                f"{', '.join(f'{n} {t}' for n, t in got)}; expected "
                f"{', '.join(f'{n} {t}' for n, t in want)}.",
            )
        for f in spec.schema:
            if not f.nullable and rows[f.name].null_count:
                raise AnalysisError(
                    who, f"{where}: column {f.name!r} is not nullable but has nulls."
                )
        if rows.num_rows:
            outside = pc.invert(pc.is_in(rows["doc_id"], value_set=self._doc_ids))
            if pc.any(outside).as_py():
                raise AnalysisError(who, f"{where} has rows of doc_ids that are not in this batch.")
        return rows.cast(spec.schema)
