"""``attnstore probe``: span-probe items added to a store later, scored from its decoded matrices
(the post-hoc pass :func:`attnstore.analyses.posthoc.analyze` with the :class:`Probes` analysis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from attnstore.analyses.posthoc import Context, Item, analyze
from attnstore.analyses.probes import Probes
from attnstore.corpus import read_corpus
from attnstore.errors import AttnStoreError, CorpusError
from attnstore.probes import align
from attnstore.store import Store

if TYPE_CHECKING:
    from attnstore.storage import Location

__all__ = ["add_probes"]


def add_probes(
    path: Location | Store,
    corpus: str,
    *,
    text_field: str = "text",
    batch: int = 16,
) -> dict[str, Any]:
    """Score the probe items of ``corpus`` against a store that kept its matrices.

    The corpus must hold the stored documents' texts in the same order (``doc_id`` = position);
    documents that already have probes are skipped, so the command resumes. Scores come from the
    decoded matrices: with the lossless codec they equal extraction-time scores; with a lossy one
    an argmax between near-equal keys can flip (the commit records ``"source": "decoded"``).
    ``path`` may be an opened :class:`~attnstore.store.Store` (its storage options kept).
    """
    store = path if isinstance(path, Store) else Store(path)
    if not store.manifest.get("matrices", True):
        raise AttnStoreError(
            f"{store.path} was extracted with --scores-only: it has no matrices to score probes "
            "from. Extract with the probe corpus instead (attnstore extract --corpus ...)."
        )
    if corpus.startswith("probe:"):
        raise CorpusError(
            f"Built-in probe corpora ({corpus!r}) depend on the model's tokenizer and are scored "
            f"at extraction: attnstore extract --out NEW.attn --corpus {corpus}."
        )
    docs = {
        int(r["doc_id"]): r for r in store.sql("SELECT doc_id, text, skipped FROM docs").to_pylist()
    }
    done = set(store.sql("SELECT DISTINCT doc_id FROM probes").column(0).to_pylist())
    report: dict[str, Any] = {"path": str(store.path), "documents": 0, "items": 0, "skipped_items": 0,
              "already_probed": 0, "not_in_store": 0, "commits": 0}  # fmt: skip

    def items() -> Iterator[Item]:
        for doc in read_corpus(corpus, text_field=text_field):
            if not doc.probes:
                continue
            row = docs.get(doc.doc_id)
            if row is None:
                report["not_in_store"] += 1
                continue
            if doc.doc_id in done:
                report["already_probed"] += 1
                continue
            if row["text"] != doc.text:
                raise CorpusError(
                    f"Document {doc.doc_id} of {corpus!r} differs from the stored text of doc_id "
                    f"{doc.doc_id}: probes must annotate the stored texts, in the stored order."
                )
            if row["skipped"] is not None:
                aligned = align(doc.probes, [])
                yield Item(doc.doc_id, skipped=doc)
            else:
                spans = store.token_spans(doc.doc_id)
                if not any(s is not None for s in spans):
                    raise AttnStoreError(
                        f"doc_id {doc.doc_id} has no token character offsets (a format 1.0 store "
                        "or a slow tokenizer): probe spans cannot be aligned."
                    )
                aligned = align(doc.probes, spans)
                yield Item(doc.doc_id, Context(probe_items=tuple(aligned)), text=doc.text)
            report["documents"] += 1
            report["items"] += len(aligned)
            report["skipped_items"] += sum(a.skipped is not None for a in aligned)

    summary = analyze(
        store, [Probes()], items=items(), batch=batch, annotation={"probe_corpus": corpus}
    )
    report["commits"] = summary["commits"]
    return report
