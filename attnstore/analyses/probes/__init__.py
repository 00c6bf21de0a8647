"""Span probes (``schemas/probes.md``) as an analysis: ``probes`` and ``probe_scores``.

A document that carries probe items (a ``.jsonl`` corpus with spans, the built-in ``probe:``
corpora, or ``attnstore probe``) contributes one ``probes`` row per item and, per (item, layer,
head), the attention mass on its targets and distractors. The items and their scoring are
:mod:`attnstore.probes`; the view over these tables is ``probe_heads`` (:mod:`attnstore.query`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from attnstore import index, probes
from attnstore.analyses.tables import builtin_tables

if TYPE_CHECKING:
    import pyarrow as pa

    from attnstore.abc.analysis import Batch

__all__ = ["Probes"]

#: The tables this analysis owns.
TABLES = ("probes", "probe_scores")


class Probes:
    """Scores the probe items of a batch's documents (``Batch.documents[i].probe_items``); items
    of skipped documents are listed with ``skipped`` set."""

    name: str = "probes"
    schema: pa.Schema = index.PROBES
    extra_schemas: ClassVar[dict[str, pa.Schema]] = {"probe_scores": index.PROBE_SCORES}

    def applies(self, batch: Batch) -> bool:
        return any(getattr(d, "probe_items", None) is not None for d in batch.documents) or any(
            d.probes for d, _ in batch.skipped
        )

    def begin(self, batch: Batch) -> None:
        lengths = [int(n) for n in batch.lengths.tolist()]
        self._heads = list(batch.heads)
        self._t = int(batch.token_ids.shape[1]) if batch.token_ids.ndim == 2 else 0
        self._probed = [
            (i, batch.doc_ids[i], probes.DocumentScorer(d.probe_items), lengths[i])
            for i, d in enumerate(batch.documents)
            if getattr(d, "probe_items", None) is not None
        ]
        self._tables = probes.ProbeTables()
        for _, doc_id, scorer, _ in self._probed:
            self._tables.add_document(doc_id, scorer.aligned)
        for d, _ in batch.skipped:
            if d.probes:
                self._tables.add_document(d.doc_id, probes.align(d.probes, []))

    def rows(self, layer: int, q0: int, probs: torch.Tensor) -> None:
        c = probs.shape[2]
        for i, _, scorer, n in self._probed:
            rows = scorer.rows_in(q0, min(q0 + c, n))
            if rows:
                at = torch.tensor([r - q0 for r in rows], device=probs.device)
                block = probs[i].index_select(1, at)[:, :, :n]
                scorer.add_rows(layer, rows, block.double().cpu().numpy())
        if q0 + c >= self._t:  # the layer's last block
            for _, doc_id, scorer, _ in self._probed:
                self._tables.add_scores(doc_id, layer, self._heads, scorer.finish(layer))

    def end(self) -> dict[str, pa.Table]:
        return builtin_tables(self._tables.tables(), TABLES)
