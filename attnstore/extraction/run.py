"""One extraction run: a loaded model, its :class:`~attnstore.capture.Extractor`, the store's
manifest and a :class:`~attnstore.store.StoreWriter` on one opened storage.

Every driver builds an :class:`ExtractionRun` and feeds it batches from :func:`document_batches`:
``attnstore.extract`` (through a background writer thread), the Ray actors of
:mod:`attnstore.cluster`, and :mod:`attnstore.materialize`. The plug-in tables of the run's
analyses are registered in the store before its first batch.
"""

from __future__ import annotations

import datetime as _dt
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnstore.extraction.config import DEFAULT_MAX_LENGTH, ExtractConfig
from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING, PACKING_FULL, Manifest
from attnstore.store.reader import Store
from attnstore.store.writer import DEFAULT_APP_ID, StoreWriter
from attnstore.version import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.capture import Extractor, LoadedModel, Tokenized
    from attnstore.corpus import Document
    from attnstore.storage import Storage
    from attnstore.store import Segment

__all__ = ["ExtractReport", "ExtractionRun", "build_manifest", "document_batches"]


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


def document_batches(
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


def build_manifest(
    loaded: LoadedModel,
    extractor: Extractor,
    corpus: str,
    text_field: str,
    parse: str | None,
    created_at: str | None = None,
) -> Manifest:
    """The manifest of a store written by ``extractor`` (``created_at`` fixed by a caller whose
    many writers must create byte-identical manifests, e.g. :mod:`attnstore.cluster`)."""
    from attnstore.modelref import quantization

    manifest: Manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"attnstore {__version__}",
        "created_at": created_at or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": loaded.info,
        "tokenizer": loaded.tokenizer_info,
        "codec": extractor.codec.get_config(),
        "packing": PACKING_FULL if loaded.bidirectional else PACKING,
        "max_length": extractor.max_length,
        "layers": extractor.layers,
        "heads": extractor.heads,
        "matrices": extractor.store_matrices,
        "attention": "bidirectional" if loaded.bidirectional else "causal",
        "values": extractor.values,
        "settings": {
            "attention_mode": extractor.mode,
            "parser": parse,
            "corpus": corpus,
            "text_field": text_field,
            # the capture path chosen when the Extractor was built (capture.PATHS)
            "attention": {"function": "capture", "output_attentions": "eager"}.get(
                loaded.path, loaded.path
            ),
            # the default model is 4-bit (GGUF Q4_1), de-quantised to run: not the released weights
            "model_quantization": quantization(loaded.info["id"]),
            # rows sum to 1 − the mass of a learned sink logit (GPT-OSS; heads.learned_sink)
            "learned_sinks": loaded.learned_sinks,
        },
    }
    if extractor.rows is not None:  # 2.1: only the selected query rows are stored
        manifest["rows"] = str(extractor.rows)
    if extractor.overview:  # 2.1: N × N overviews of every head
        manifest["overview"] = extractor.overview
    return manifest


class ExtractionRun:
    """A model, an extractor and a writer into one store, built from an :class:`ExtractConfig`.

    Parameters
    ----------
    storage
        The store's opened storage (:func:`attnstore.storage.open_storage`): a folder or an
        object-store prefix with its options; every read and write of the run goes through it.
    loaded
        The model (:func:`attnstore.capture.load_model`).
    config
        The run's settings.
    app_id, commit_every, commit_seconds
        The writer's identity and flush cadence (:class:`~attnstore.store.StoreWriter`).
    created_at
        Fixed by a driver whose many writers must create byte-identical manifests (Ray).
    """

    def __init__(
        self,
        storage: Storage,
        loaded: LoadedModel,
        config: ExtractConfig,
        *,
        app_id: str = DEFAULT_APP_ID,
        commit_every: int = 1,
        commit_seconds: float | None = None,
        created_at: str | None = None,
    ) -> None:
        from attnstore.analyses.registry import DEFAULT, resolve
        from attnstore.capture import Extractor
        from attnstore.codecs import get_codec
        from attnstore.rows import RowSelection

        self.storage = storage
        self.loaded = loaded
        self.config = config
        max_length = config.max_length
        if max_length is None:  # 512, or the model's whole context when that is shorter
            max_length = min(DEFAULT_MAX_LENGTH, loaded.max_positions or DEFAULT_MAX_LENGTH)
        self.extractor: Extractor = Extractor(
            loaded, get_codec(config.codec), max_length, config.layers, config.heads,
            parser=config.parse, store_matrices=not config.scores_only, mode=config.attention,
            values=config.values, analyses=resolve(config.analyses),
            defaults=[n for n in DEFAULT if n not in config.skip_analyses],
            rows=RowSelection.parse(config.rows), overview=config.overview,
        )  # fmt: skip
        manifest = build_manifest(
            loaded, self.extractor, config.corpus or "", config.text_field, config.parse,
            created_at,
        )  # fmt: skip
        if config.settings:
            manifest["settings"] = {**manifest["settings"], **config.settings}
        self.manifest = manifest
        self.writer = StoreWriter(
            storage, manifest, allow_different=config.allow_different, app_id=app_id,
            commit_every=commit_every, commit_seconds=commit_seconds,
        )  # fmt: skip
        # before the first batch with their rows, so readers know the tables' schemas
        self.writer.register(self.extractor.runner.plugin_specs)
        self.extractor.stream = self.writer.stream  # long documents: written as their rows come

    def committed(self) -> set[int]:
        """The doc_ids committed to the store now (stored or skipped)."""
        return Store(self.storage).doc_ids()

    def batches(
        self, docs: Iterator[Document], done: set[int], report: ExtractReport
    ) -> Iterator[tuple[list[Tokenized], list[tuple[Document, str]]]]:
        """:func:`document_batches` with this run's extractor and batch size."""
        return document_batches(docs, self.extractor, done, self.config.batch_size, report)

    def segment(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]] = ()
    ) -> Segment:
        """Run one batch through the model and its analyses."""
        return self.extractor.run(batch, skipped)

    def commit(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]] = ()
    ) -> None:
        """Run one batch and hand its segment to the writer."""
        self.writer.commit(self.segment(batch, skipped))
