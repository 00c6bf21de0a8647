"""``attnstore materialize``: the second pass of a two-pass workflow over a large corpus.

First ``attnstore extract --scores-only`` over the whole corpus (the census: tables, no matrices),
then ``materialize STORE --where SQL --out NEW`` re-runs the store's model on just the documents
whose ``heads`` rows match ``SQL`` and stores their matrices for just the layers and heads that
matched, in a new store with the original ``doc_id`` values. The tokens are the stored ones (a
document whose text tokenizes differently today is refused), so ``NEW`` lines up with ``STORE``.

A store holds one layer/head layout (:data:`attnstore.layout.LAYOUT_KEYS`), so the matrices go to
a new store, never into the census itself; the layers × heads stored are the product of the
matched layers and the matched heads (a superset of the matched pairs when they do not form a
grid). Rerunning the same command resumes.
"""

from __future__ import annotations

from typing import Any

from attnstore.errors import AttnStoreError, IncompatibleStoreError, QueryError
from attnstore.extraction import ExtractConfig, ExtractionRun
from attnstore.layout import MANIFEST_NAME
from attnstore.storage import Location, location_text, open_storage
from attnstore.store import Store

__all__ = ["materialize"]


def materialize(
    path: Location | Store,
    where: str,
    out: Location,
    *,
    model: str | None = None,
    batch_size: int = 4,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Store the matrices of the (document, layer, head) rows of ``heads`` matching ``where``.

    ``path`` and ``out`` are folders, URLs or opened :class:`~attnstore.storage.Storage` objects
    (``path`` also an opened :class:`~attnstore.store.Store`); each is opened once.
    """
    from attnstore.corpus import Document

    if batch_size < 1:
        raise AttnStoreError(f"--batch-size must be ≥ 1. Got {batch_size}.")
    src = path if isinstance(path, Store) else Store(path)
    name = str(src.path) if isinstance(path, Store) else location_text(path)
    target = open_storage(out)  # a folder or a URL (s3://…), opened once
    try:
        rows = src.sql(f"SELECT DISTINCT doc_id, layer, head FROM heads WHERE ({where})")
    except QueryError as err:
        raise QueryError(f"--where is applied to the heads table: {err}") from None
    doc_ids = sorted(set(rows["doc_id"].to_pylist()))
    layers = sorted(set(rows["layer"].to_pylist()))
    heads = sorted(set(rows["head"].to_pylist()))
    report: dict[str, Any] = {"from": name, "to": location_text(out), "docs": len(doc_ids),
                              "layers": layers, "heads": heads, "docs_written": 0}  # fmt: skip
    if not doc_ids:
        return report
    resumed = target.exists(MANIFEST_NAME)
    if resumed and set(doc_ids) <= Store(target).doc_ids():
        report["docs_already_materialized"] = len(doc_ids)  # a rerun: no model load
        return report
    from attnstore.modelref import check_available

    check_available(model or src.manifest["model"]["id"])  # an uncached id: before torch loads
    from attnstore.capture import load_model

    loaded = load_model(model or src.manifest["model"]["id"], device=device, progress=progress)
    if loaded.info["id"] != src.manifest["model"]["id"]:
        raise IncompatibleStoreError(
            f"{name!r} was extracted with model {src.manifest['model']['id']!r}; "
            f"{loaded.info['id']!r} was loaded. Pass --model with the store's model."
        )
    config = ExtractConfig.of(
        corpus=f"materialize:{path}", codec=src.manifest["codec"],
        max_length=src.manifest["max_length"], layers=layers, heads=heads,
        batch_size=batch_size, settings={"materialized_from": name, "where": where},
    )  # fmt: skip
    run = ExtractionRun(target, loaded, config, app_id="materialize", commit_every=64,
                        commit_seconds=30)  # fmt: skip
    extractor, writer = run.extractor, run.writer
    done = run.committed()
    todo = [d for d in doc_ids if d not in done]
    texts = {
        r["doc_id"]: r["text"]
        for r in src.sql(
            "SELECT doc_id, text FROM docs WHERE list_contains(?, doc_id)", [todo]
        ).to_pylist()
    }
    for start in range(0, len(todo), batch_size):
        batch = []
        for d in todo[start : start + batch_size]:
            stored = src.token_ids(d).tolist()
            text = texts.get(d)
            doc = (
                Document(d, text) if text is not None else Document(d, "", token_ids=tuple(stored))
            )
            tok = extractor.tokenize(doc)
            if tok.ids != stored:
                raise AttnStoreError(
                    f"doc_id {d}: its text tokenizes to other tokens than the stored ones "
                    "(another tokenizer version?): its matrices would not line up. Nothing of "
                    "this batch was written."
                )
            batch.append(tok)
        writer.commit(extractor.run(batch))
        report["docs_written"] += len(batch)
    writer.close()
    report["docs_already_materialized"] = len(doc_ids) - len(todo)
    return report
