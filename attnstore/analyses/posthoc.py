"""Any analysis over a store's stored (decoded) matrices: the one post-hoc pass.

``attnstore analyze STORE --analysis NAME`` runs a registered analysis over every stored document
that has no rows in its tables yet; ``attnstore parse`` (syntactic heads) and ``attnstore probe``
(span probes) are the same pass with a per-document context (the parse, the probe items). Each
document is one :class:`~attnstore.abc.analysis.Batch` of one, its matrices delivered as one block
per layer; the rows are committed every ``batch`` documents through a writer on the store's own
opened storage (its options kept), so a rerun resumes.

Scores from decoded matrices equal extraction-time ones with the lossless codec; with a lossy one
an argmax between near-equal keys can flip (the commit records ``"source": "decoded"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from attnstore.abc.analysis import Batch
from attnstore.analyses.registry import resolve
from attnstore.analyses.runner import AnalysisRunner
from attnstore.errors import AnalysisError, AttnStoreError
from attnstore.store.batch import Segment
from attnstore.store.writer import StoreWriter

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.abc.analysis import Analysis
    from attnstore.store import Store

__all__ = ["Context", "Item", "analyze"]


@dataclass(frozen=True)
class Context:
    """What the built-in families read of a document (``Batch.documents``)."""

    alignment: Any = None
    probe_items: Any = None


@dataclass(frozen=True)
class Item:
    """One document to analyse: a stored one (its matrices are read), or a skipped one
    (``skipped``: a :class:`~attnstore.corpus.Document`, listed without matrices)."""

    doc_id: int
    context: Any = None
    text: str | None = None
    skipped: Any = None


def analyze(
    store: Store,
    analyses: Sequence[str | Analysis],
    *,
    items: Iterable[Item] | None = None,
    batch: int = 16,
    annotation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``analyses`` over the decoded matrices of ``store`` (an opened store) and commit their
    tables. ``items`` default: every stored document without rows in the analyses' tables."""
    runner = AnalysisRunner(resolve(analyses))
    if not runner:
        raise AnalysisError("", "No analysis to run (pass at least one with --analysis NAME).")
    if not store.manifest.get("matrices", True):
        raise AttnStoreError(
            f"{store.path} was extracted with --scores-only: it has no matrices to analyse. "
            "Extract again with the analysis (attnstore extract --analysis NAME)."
        )
    writer = StoreWriter(store.storage, store.manifest)
    writer.register(runner.plugin_specs)
    store.refresh()  # the registered tables read (empty) from now on
    todo = _todo(store, runner) if items is None else iter(items)
    report: dict[str, Any] = {"path": str(store.path), "documents": 0, "commits": 0,
                              "tables": sorted(runner.tables)}  # fmt: skip
    pending: dict[str, list[pa.Table]] = {}
    n_pending = 0
    record = {"source": "decoded", **(annotation or {})}
    for item in todo:
        for name, table in _one(store, runner, item).items():
            pending.setdefault(name, []).append(table)
        report["documents"] += 1
        n_pending += 1
        if n_pending >= batch:
            report["commits"] += _commit(writer, pending, record)
            pending, n_pending = {}, 0
    report["commits"] += _commit(writer, pending, record)
    writer.close()
    store.refresh()
    return report


def _todo(store: Store, runner: AnalysisRunner) -> Iterator[Item]:
    done: set[int] = set()
    for name in runner.tables:
        done.update(store.sql(f'SELECT DISTINCT doc_id FROM "{name}"').column(0).to_pylist())
    rows = store.sql(
        "SELECT doc_id, text FROM docs WHERE skipped IS NULL ORDER BY doc_id"
    ).to_pylist()
    return (Item(r["doc_id"], text=r["text"]) for r in rows if r["doc_id"] not in done)


def _one(store: Store, runner: AnalysisRunner, item: Item) -> dict[str, pa.Table]:
    m = store.manifest
    layers, heads = m["layers"], m["heads"]
    common: dict[str, Any] = {
        "n_layers": m["model"]["n_layers"],
        "n_heads": m["model"]["n_heads"],
        "device": torch.device("cpu"),
        "layers": tuple(layers),
        "heads": tuple(heads),
        "info": {"model": m["model"]["id"], "codec": m["codec"], "source": "decoded"},
    }
    if item.skipped is not None:
        runner.begin(Batch(doc_ids=[], token_ids=torch.zeros((0, 0), dtype=torch.long),
                           lengths=torch.zeros(0, dtype=torch.long), texts=[],
                           skipped=((item.skipped, "skipped"),), **common))  # fmt: skip
        return runner.end()
    ids = torch.as_tensor(store.token_ids(item.doc_id), dtype=torch.long)
    text = item.text
    if text is None:
        text = store.sql("SELECT text FROM docs WHERE doc_id = ?", [item.doc_id]).column(0)[0]
    runner.begin(
        Batch(doc_ids=[item.doc_id], token_ids=ids[None], lengths=torch.tensor([len(ids)]),
              texts=[str(text)], documents=(item.context,), **common)
    )  # fmt: skip
    probs = torch.from_numpy(store.matrices(item.doc_id))
    for li, layer in enumerate(layers):
        runner.rows(layer, 0, probs[li][None])
    return runner.end()


def _commit(writer: StoreWriter, pending: dict[str, list[pa.Table]], record: dict[str, Any]) -> int:
    if not pending:
        return 0
    extra = {name: pa.concat_tables(parts) for name, parts in pending.items()}
    writer.commit(Segment(docs={}, tokens={}, heads={}, extra=extra, annotation=record))
    return 1
