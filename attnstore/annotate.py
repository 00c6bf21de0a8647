"""``attnstore parse``: add syntactic-head scores to a store that kept its matrices.

Unlike ``extract --parse`` (scores from full-precision attention), this computes them from the
*stored, decoded* matrices, so the codec's error (≤ 9.9e-6 for the default) can flip an argmax
between near-equal words; the commit record says which (``"source": "decoded"``). Documents that
already have parses are skipped, so the command is resumable like ``extract``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from attnstore import syntax
from attnstore.errors import AttnStoreError
from attnstore.store import Segment, Store, StoreWriter

__all__ = ["add_parses"]


def add_parses(
    path: str | os.PathLike[str], parser: str = syntax.DEFAULT_PARSER, *, batch: int = 16
) -> dict[str, Any]:
    """Parse every stored document without a parse, score heads, commit in batches of ``batch``."""
    store = Store(path)
    nlp = syntax.load_parser(parser)
    done = set(store.sql("SELECT DISTINCT doc_id FROM words").column(0).to_pylist())
    docs = store.sql(
        "SELECT doc_id, text FROM docs WHERE skipped IS NULL ORDER BY doc_id"
    ).to_pylist()
    todo = [d for d in docs if d["doc_id"] not in done]
    writer = StoreWriter(store.path, store.manifest)
    layers, heads = store.manifest["layers"], store.manifest["heads"]
    parsed = commits = 0
    for start in range(0, len(todo), batch):
        tables = syntax.SyntaxTables()
        for d in todo[start : start + batch]:
            spans = store.token_spans(d["doc_id"])
            if not any(s is not None for s in spans):
                raise AttnStoreError(
                    f"doc_id {d['doc_id']} has no token character offsets (a format 1.0 store, a "
                    "slow tokenizer or the induction probe): words cannot be aligned."
                )
            cutoff = max(s[1] for s in spans if s is not None)
            alignment = syntax.align(syntax.parse_text(nlp, d["text"][:cutoff]), spans, cutoff)
            inst = syntax.instances(alignment, bidirectional=store.bidirectional)
            tables.add_document(d["doc_id"], alignment, inst)
            probs = torch.from_numpy(store.matrices(d["doc_id"]))
            for li, layer in enumerate(layers):
                correct = syntax.head_counts(probs[li], alignment, inst)
                tables.add_counts(d["doc_id"], layer, heads, inst, correct)
            parsed += 1
        writer.commit(
            Segment(docs={}, tokens={}, heads={}, extra=tables.tables(),
                    annotation={"parser": parser, "source": "decoded"})
        )  # fmt: skip
        commits += 1
    return {
        "path": str(store.path),
        "parsed": parsed,
        "already_parsed": len(done),
        "commits": commits,
    }
