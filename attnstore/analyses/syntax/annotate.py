"""``attnstore parse``: add syntactic-head scores to a store that kept its matrices.

Unlike ``extract --parse`` (scores from full-precision attention), this computes them from the
*stored, decoded* matrices (the post-hoc pass :func:`attnstore.analyses.posthoc.analyze` with the
:class:`Syntax` analysis), so the codec's error (≤ 9.9e-6 for the default) can flip an argmax
between near-equal words; the commit record says which (``"source": "decoded"``). Documents that
already have parses are skipped, so the command is resumable like ``extract``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from attnstore import syntax
from attnstore.analyses.posthoc import Context, Item, analyze
from attnstore.analyses.syntax import Syntax
from attnstore.errors import AttnStoreError
from attnstore.store import Store

if TYPE_CHECKING:
    from attnstore.storage import Location

__all__ = ["add_parses"]


def add_parses(
    path: Location | Store, parser: str = syntax.DEFAULT_PARSER, *, batch: int = 16
) -> dict[str, Any]:
    """Parse every stored document without a parse, score heads, commit in batches of ``batch``.

    ``path`` may be an opened :class:`~attnstore.store.Store` (its storage options kept)."""
    store = path if isinstance(path, Store) else Store(path)
    nlp = syntax.load_parser(parser)
    done = set(store.sql("SELECT DISTINCT doc_id FROM words").column(0).to_pylist())
    docs = store.sql(
        "SELECT doc_id, text FROM docs WHERE skipped IS NULL ORDER BY doc_id"
    ).to_pylist()
    todo = [d for d in docs if d["doc_id"] not in done]

    def items() -> Iterator[Item]:
        for d in todo:
            spans = store.token_spans(d["doc_id"])
            if not any(s is not None for s in spans):
                raise AttnStoreError(
                    f"doc_id {d['doc_id']} has no token character offsets (a format 1.0 store, a "
                    "slow tokenizer or the induction probe): words cannot be aligned."
                )
            cutoff = max(s[1] for s in spans if s is not None)
            alignment = syntax.align(syntax.parse_text(nlp, d["text"][:cutoff]), spans, cutoff)
            yield Item(d["doc_id"], Context(alignment=alignment), text=d["text"])

    summary = analyze(store, [Syntax()], items=items(), batch=batch, annotation={"parser": parser})
    return {
        "path": str(store.path),
        "parsed": summary["documents"],
        "already_parsed": len(done),
        "commits": summary["commits"],
    }
