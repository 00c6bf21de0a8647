"""Syntactic heads (``schemas/syntax.md``) as an analysis: ``words``, ``syntax``, ``syntax_baseline``.

A document that carries a parse aligned to its tokens (``extract --parse``, a CoNLL-U corpus, or
``attnstore parse``) contributes its words and, per (layer, head, relation, direction), how often
the head's most attended word is the dependency's other end. The parsing and scoring are
:mod:`attnstore.syntax`; the views over these tables are ``syntax_heads`` (:mod:`attnstore.query`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from attnstore import index, syntax
from attnstore.analyses.tables import builtin_tables

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from attnstore.abc.analysis import Batch

__all__ = ["Syntax"]

#: The tables this analysis owns.
TABLES = ("syntax", "words", "syntax_baseline")


class Syntax:
    """Scores syntactic heads of the documents of a batch that carry an aligned parse
    (``Batch.documents[i].alignment``)."""

    name: str = "syntax"
    schema: pa.Schema = index.SYNTAX
    extra_schemas: ClassVar[dict[str, pa.Schema]] = {
        "words": index.WORDS,
        "syntax_baseline": index.SYNTAX_BASELINE,
    }

    def applies(self, batch: Batch) -> bool:
        return any(getattr(d, "alignment", None) is not None for d in batch.documents)

    def begin(self, batch: Batch) -> None:
        lengths = [int(n) for n in batch.lengths.tolist()]
        self._heads = list(batch.heads)
        self._t = int(batch.token_ids.shape[1]) if batch.token_ids.ndim == 2 else 0
        bidi = bool(batch.info.get("bidirectional"))  # encoders: both directions (syntax.md)
        self._parsed = [
            (i, batch.doc_ids[i], d.alignment, syntax.instances(d.alignment, bidirectional=bidi),
             lengths[i])
            for i, d in enumerate(batch.documents)
            if getattr(d, "alignment", None) is not None
        ]
        self._tables = syntax.SyntaxTables()
        for _, doc_id, alignment, inst, _ in self._parsed:
            self._tables.add_document(doc_id, alignment, inst)
        self._word_att: dict[tuple[int, int], torch.Tensor] = {}

    def rows(self, layer: int, q0: int, probs: torch.Tensor) -> None:
        c = probs.shape[2]
        for i, _, alignment, _, n in self._parsed:
            hi = min(q0 + c, n)
            if hi > q0:
                part = syntax.word_attention(probs[i, :, : hi - q0, :n], alignment, q0)
                key = (layer, i)
                self._word_att[key] = self._word_att[key] + part if key in self._word_att else part
        if q0 + c >= self._t:  # the layer's last block
            for i, doc_id, _, inst, _ in self._parsed:
                correct = syntax.counts_from_word_attention(self._word_att.pop((layer, i)), inst)
                self._tables.add_counts(doc_id, layer, self._heads, inst, correct)

    def end(self) -> dict[str, pa.Table]:
        return builtin_tables(self._tables.tables(), TABLES)
