"""The :class:`Extractor`: batches of documents in, checked and encoded segments out.

It chooses the capture path on two tiny padded documents when it is built, runs each batch through
it (:func:`attnstore.capture.paths.forward`), and per block of rows scores the heads, encodes the
stored rows (:mod:`attnstore.capture.codes`), pools overviews and feeds the analyses; the rows of
the batch become a segment (:mod:`attnstore.capture.segment`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from attnstore import bidirectional_scores, scores, syntax
from attnstore.analyses.registry import DEFAULT, load
from attnstore.analyses.runner import AnalysisRunner, builtin_key
from attnstore.capture.codes import (
    _chunk_index,
    _rows_index,
    _SinkMass,
    _store_full_rows,
    _store_lse,
)
from attnstore.capture.model import AttentionWarning, LoadedModel
from attnstore.capture.paths import PATHS, _RowCheck, _Undelivered, forward
from attnstore.capture.recipes import _recipe
from attnstore.capture.segment import analysis_batch, batch_segment
from attnstore.capture.tokens import Tokenized, tokenize
from attnstore.corpus import Document
from attnstore.errors import AttentionCaptureError, ModelError
from attnstore.overview import OverviewPool
from attnstore.packing import packed_length
from attnstore.rows import DocRows, RowSelection
from attnstore.store.streaming import stream_bytes

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.abc.analysis import Analysis
    from attnstore.codecs import Codec
    from attnstore.store.batch import Segment

__all__ = ["VALUES", "Extractor"]

#: what a store's matrices hold (``--values``): post-softmax probabilities or pre-softmax scores
VALUES: Final = ("probs", "logits")


class Extractor:
    """Turns batches of documents into :class:`~attnstore.store.Segment` objects.

    Building one runs two tiny padded documents through the model to choose the capture path
    (:data:`~attnstore.capture.paths.PATHS`); :meth:`run` checks every batch again before returning its segment and raises
    :class:`~attnstore.errors.AttentionCaptureError` when no path delivers exact attention.

    Parameters
    ----------
    loaded
        From :func:`load_model`.
    codec
        How probabilities are stored.
    max_length
        Documents are truncated to this many tokens (and marked ``truncated``).
    layers, heads
        Which layers and query heads to store; default all.
    parser
        A spaCy pipeline name: parse each document and score syntactic heads (schemas/syntax.md).
        Documents that bring a gold parse (CoNLL-U) are scored against it in any case.
    store_matrices
        False for a scores-only census: tables without attention matrices.
    mode
        ``"eager"``: the layer output is computed from the captured probabilities (cheapest on a
        CPU). ``"sdpa"``: the output comes from the fused kernel and the probabilities are
        recomputed from the same queries and keys for capture (fastest on a GPU). ``"auto"``:
        sdpa on CUDA and for a scores-only census without overviews (one fused pass per layer,
        no rows materialised), eager elsewhere. Captured values are identical in both modes.
    chunk_bytes
        Largest block of float32 probabilities alive at once (query rows × keys × heads × docs);
        bounds memory at long contexts.
    analyses
        Analyses (``schemas/analyses.md``) run beside the default ones
        (:data:`attnstore.analyses.registry.DEFAULT`) over every block of exact rows; their tables
        ride in :attr:`Segment.extra <attnstore.store.Segment.extra>`.
    defaults
        The built-in analyses run by default (names; ``None``: the registry's ``DEFAULT``). A
        census without row analyses, e.g. ``("patterns",)``, lets ``--attention sdpa`` score
        without materialising rows (online softmax).
    rows
        ``--rows``: store only these query rows of each document (:mod:`attnstore.rows`).
    overview
        ``--overview N``: pool every head into ``N × N`` max and mean overviews
        (:mod:`attnstore.overview`), with or without matrices.

    Set :attr:`stream` (``StoreWriter.stream``) to write documents bigger than
    :func:`attnstore.store.streaming.stream_bytes` to their own segment as their rows come
    (:mod:`attnstore.store.streaming`) instead of holding their codes in memory.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        codec: Codec,
        max_length: int,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        parser: str | None = None,
        *,
        store_matrices: bool = True,
        mode: str = "auto",
        chunk_bytes: int = 1 << 28,
        values: str = "probs",
        analyses: Sequence[Analysis] = (),
        rows: str | RowSelection | None = None,
        overview: int | None = None,
        defaults: Sequence[str] | None = None,
    ) -> None:
        self.loaded = loaded
        self.rows = RowSelection.parse(rows)
        if overview is not None and overview < 1:
            raise ModelError(f"--overview N needs N ≥ 1. Got {overview}.")
        self.overview = overview
        #: opens a DocStream for a long document (``StoreWriter.stream``); None: keep in memory
        self.stream: Any = None
        self.stream_bytes = stream_bytes()
        given = {builtin_key(a) for a in analyses}
        builtins = [load(n) for n in (DEFAULT if defaults is None else defaults) if n not in given]
        #: every analysis of this run: the defaults, then the caller's (checked once, here)
        self.runner = AnalysisRunner([*builtins, *analyses])
        for analysis in self.runner.analyses:  # optional: hooks on the model (value_norm)
            bind = getattr(analysis, "bind", None)
            if callable(bind):
                bind(loaded.model, loaded.tokenizer)
        self.parser = parser
        self.store_matrices = store_matrices
        if values not in VALUES:
            raise ModelError(f"Expected --values {' or '.join(VALUES)}. Got {values!r}.")
        if values == "logits" and (codec.dtype not in ("float32", "float16") or not store_matrices):
            raise ModelError(
                "--values logits stores raw pre-softmax scores, which need a float codec "
                f"(--codec float32 or float16; got {codec.id!r}) and matrices (not --scores-only)."
            )
        #: what the matrices hold: "probs" (post-softmax) or "logits" (pre-softmax scores, masked
        #: entries -inf, plus each row's log-sum-exp; schemas/README.md)
        self.values = values
        if self.rows is not None and (values == "logits" or loaded.bidirectional):
            raise ModelError(
                "--rows selects query rows of causal probabilities; it cannot be combined with "
                "--values logits or an encoder's (bidirectional) squares. Drop --rows."
            )
        if mode == "auto":
            # a scores-only census without overviews never materialises rows in sdpa mode (the
            # fused pass), which beats eager rows on a CPU too; rows to store are cheapest eager
            census = not store_matrices and overview is None
            mode = "sdpa" if loaded.device.type == "cuda" or census else "eager"
        if mode not in ("eager", "sdpa"):
            raise ModelError(f"Expected attention mode auto, eager or sdpa. Got {mode!r}.")
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self._nlp = syntax.load_parser(parser) if parser else None
        self.codec = codec
        info = loaded.info
        if max_length <= 0:
            raise ModelError(f"--max-length must be a positive number of tokens. Got {max_length}.")
        if loaded.max_positions and max_length > loaded.max_positions:
            raise ModelError(
                f"--max-length {max_length} is larger than the model's context "
                f"({loaded.max_positions} positions). Use --max-length {loaded.max_positions} or less."
            )
        self.max_length = max_length
        self.layers = list(range(info["n_layers"])) if layers is None else sorted(set(layers))
        self.heads = list(range(info["n_heads"])) if heads is None else sorted(set(heads))
        for name, sel, n in (
            ("layer", self.layers, info["n_layers"]),
            ("head", self.heads, info["n_heads"]),
        ):
            bad = [x for x in sel if not 0 <= x < n]
            if bad or not sel:
                raise ModelError(f"Expected {name}s in 0…{n - 1}. Got {bad or 'none'}.")
        self._token_cache: dict[int, str] = {}
        self._calibrating = False
        self._first_use = False
        self._calibrate()

    def tokenize(self, doc: Document) -> Tokenized:
        """Token ids (truncated), their character spans, and the aligned parse if any."""
        return tokenize(
            doc,
            self.loaded.tokenizer,
            self.max_length,
            bidirectional=self.loaded.bidirectional,
            nlp=self._nlp,
        )

    def _packed(self, n: int) -> int:
        """Stored values per head for a document of ``n`` tokens (triangle, or whole square)."""
        return n * n if self.loaded.bidirectional else packed_length(n)

    def _stored(self, n: int) -> int:
        """Stored values per head: the packed matrix, then (``--values logits``) n row LSEs."""
        return self._packed(n) + (n if self.values == "logits" else 0)

    @property
    def _score_columns(self) -> tuple[str, ...]:
        if self.loaded.bidirectional:
            return bidirectional_scores.SCORE_COLUMNS
        return scores.SCORE_COLUMNS

    def _layer_scores(self, masks: scores.BatchMasks, ids: torch.Tensor, n_h: int) -> Any:
        if self.loaded.bidirectional:
            return bidirectional_scores.LayerScores(
                masks, n_h, ids, bidirectional_scores.separator_ids(self.loaded.tokenizer)
            )
        return scores.LayerScores(masks, n_h)

    def _token_strings(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self._token_cache})
        if missing:
            texts = self.loaded.tokenizer.batch_decode([[i] for i in missing])
            self._token_cache.update(zip(missing, texts, strict=True))
        return [self._token_cache[i] for i in ids]

    def _calibrate(self) -> None:
        """Choose the capture path on two tiny padded documents, before anything is written."""
        self._calibrating = True
        try:
            self._calibrate_run()
        finally:
            self._calibrating = False

    def _calibrate_run(self) -> None:
        n_vocab = min(len(self.loaded.tokenizer), int(self.loaded.model.config.vocab_size))
        n = min(6, self.loaded.max_positions or 6)
        ids = [(7 * i + 3) % n_vocab for i in range(n)]
        docs = [
            Tokenized(Document(-1, ""), ids, n),
            Tokenized(Document(-2, ""), ids[: max(1, n // 2)], max(1, n // 2)),
        ]
        self.run(docs)

    @torch.inference_mode()
    def run(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]] = ()
    ) -> Segment:
        """Run one batch (non-empty documents) and build its segment; ``skipped`` rows ride along.

        Every stored layer's attention is checked delivered and normalised before it is encoded
        (module docstring). A path that fails gives way to the next one for good (with a warning);
        when none delivers, :class:`~attnstore.errors.AttentionCaptureError` and no segment.
        """
        loaded = self.loaded
        failures: list[str] = []
        for path in PATHS[PATHS.index(loaded.path) :]:
            if path == "recompute" and not any(_recipe(m) for m in loaded.model.modules()):
                continue
            before = loaded.path
            loaded.use(path)
            self._first_use = self._calibrating or path != before
            try:
                segment = self._run(batch, skipped, path)
            except _Undelivered as why:
                failures.append(f"{path}: {why}")
                continue
            if batch:  # recorded with the commit (Store.commits)
                segment.annotation = {**segment.annotation, "attention": path}
            if path != before:
                warnings.warn(
                    f"{loaded.info['architecture']}: attention now comes through the {path!r} "
                    f"path ({'; '.join(failures)}).",
                    AttentionWarning,
                    stacklevel=2,
                )
            return segment
        arch = loaded.info["architecture"]
        name = arch if loaded.info["id"] == arch else f"{arch} ({loaded.info['id']})"
        hint = (
            " Its attention is computed in {dtype}: try --dtype float32.".format(**loaded.info)
            if loaded.info["dtype"] not in ("float32", None)
            else ""
        )
        raise AttentionCaptureError(
            f"{name}: no capture path delivers its attention exactly, so nothing was written. "
            f"Tried: {'; '.join(failures)}.{hint} attnstore supports the architectures of the "
            "README's capability table; others need their attention routed through "
            "transformers' AttentionInterface or a recipe in attnstore.capture.recipes.",
            failures,
        )

    def _run(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]], path: str
    ) -> Segment:
        loaded = self.loaded
        dev = loaded.device
        n_tok = [len(t.ids) for t in batch]
        b, t_max = len(batch), max(n_tok, default=0)
        n_l, n_h = len(self.layers), len(self.heads)
        doc_rows = [DocRows.of(self.rows, n) for n in n_tok]
        itemsize = np.dtype(self.codec.dtype).itemsize
        # encoders' squares and --values logits (row LSEs after the matrix) stay in memory
        plain = not loaded.bidirectional and self.values == "probs"
        streams: list[Any] = [None] * b
        codes: list[Any] = []
        if self.store_matrices:
            for i, r in enumerate(doc_rows):
                big = n_l * n_h * r.length * itemsize > self.stream_bytes
                if plain and big and self.stream is not None and not self._calibrating:
                    streams[i] = self.stream(r.n_tokens)  # written as rows come
                    codes.append(None)
                else:
                    size = r.length if plain else self._stored(r.n_tokens)
                    codes.append(np.zeros((n_l, n_h, size), dtype=self.codec.dtype))
        pools = (
            {i: OverviewPool(n, self.overview, n_h, dev) for i, n in enumerate(n_tok)}
            if self.overview
            else {}
        )
        overviews = (
            [np.zeros((n_l, n_h, 2, p.m, p.m), dtype=np.float32) for p in pools.values()]
            if self.overview
            else []
        )
        score_arrays = {k: np.full((b, n_l, n_h), np.nan) for k in self._score_columns}
        # analyses (syntax, probes, plug-ins: schemas/analyses.md) see every block of exact rows
        runner = None if self._calibrating else self.runner
        if runner is not None:
            runner.begin(
                analysis_batch(loaded, self.codec, self.layers, self.heads, batch, skipped, t_max)
            )
        if b:
            ids = torch.full((b, t_max), loaded.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((b, t_max), dtype=torch.long)
            for i, t in enumerate(batch):
                ids[i, : len(t.ids)] = torch.tensor(t.ids)
                mask[i, : len(t.ids)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            lengths = torch.tensor(n_tok, device=dev)
            masks = scores.batch_masks(ids, lengths)
            layer_pos = {layer: i for i, layer in enumerate(self.layers)}
            head_index = torch.tensor(self.heads, device=dev)
            all_heads = n_h == loaded.info["n_heads"]
            layer_scores: dict[int, scores.LayerScores] = {}
            check = _RowCheck(
                lengths, t_max, self.codec.max_abs_error,
                masked=self._first_use or path != "function", causal=not loaded.bidirectional,
            )  # fmt: skip
            sink_mass = _SinkMass(masks, n_l, n_h)

            def consume(
                layer: int,
                q0: int,
                probs: torch.Tensor,
                sink: torch.Tensor | None = None,
                logits: torch.Tensor | None = None,
                lse: torch.Tensor | None = None,
            ) -> None:
                li = layer_pos.get(layer)
                if li is None:
                    return
                if not all_heads:
                    probs = probs.index_select(1, head_index)
                    sink = None if sink is None else sink.index_select(1, head_index)
                    logits = None if logits is None else logits.index_select(1, head_index)
                    lse = None if lse is None else lse.index_select(1, head_index)
                probs = probs.float()
                stored = probs
                if self.values == "logits":
                    if logits is None or lse is None:
                        raise _Undelivered(
                            "--values logits needs the layer's pre-softmax scores, which only "
                            "attnstore's attention function computes"
                        )
                    stored = logits.float()
                    _store_lse(codes, li, q0, lse, n_tok, self._packed)
                check.add(layer, q0, probs, sink)
                if sink is not None:
                    sink_mass.add(li, q0, sink)
                acc = layer_scores.get(li)
                if acc is None:
                    acc = layer_scores[li] = self._layer_scores(masks, ids, n_h)
                acc.add(probs, q0)
                c = probs.shape[2]
                if self.store_matrices and loaded.bidirectional:
                    _store_full_rows(codes, self.codec, li, q0, stored, n_tok)
                elif self.store_matrices:
                    # rows q0 … hi of each document, keys 0 … q: a contiguous run of its packed
                    # triangle, gathered straight from the padded block (no per-document square)
                    flat = stored.reshape(b, n_h, c * t_max)
                    for i, n in enumerate(n_tok):
                        hi = min(q0 + c, n)
                        if hi <= q0:
                            continue
                        if doc_rows[i].every:
                            lo, end = q0 * (q0 + 1) // 2, hi * (hi + 1) // 2
                            idx = _chunk_index(q0, hi, t_max, dev)
                        else:  # --rows: only the selected rows of this block
                            lo, end, sel = doc_rows[i].span(q0, hi)
                            if end == lo:
                                continue
                            idx = _rows_index(tuple(sel.tolist()), q0, t_max, dev)
                        encoded = self.codec.encode(flat[i].index_select(1, idx))
                        if streams[i] is not None:
                            streams[i].write(li, encoded)
                        else:
                            codes[i][li, :, lo:end] = encoded
                for i, pool in pools.items():
                    hi = min(q0 + c, n_tok[i])
                    if hi > q0:
                        pool.add(q0, probs[i, :, : hi - q0])
                if runner is not None:
                    runner.rows(layer, q0, probs)

            def done(layer: int) -> None:
                li = layer_pos.get(layer)
                if li is None:
                    return
                for stream in streams:
                    if stream is not None:
                        stream.end_layer(li)
                for j, pool in enumerate(pools.values()):
                    overviews[j][li] = pool.finish()
                for name, values in layer_scores.pop(li).result().items():
                    score_arrays[name][:, li, :] = values

            # the compiled census pass runs on one thread, and switching torch's threads between
            # the forward and the pass per layer costs CPU (OpenMP workers spinning down and
            # waking: 8 × 512 tokens of the default model, ~0.4 s of 8): such a layer's pass waits
            # while the waiting layers' queries and keys stay under chunk_bytes, then they run
            # in one stretch (a layer over the budget alone runs at once; the torch path, at once)
            pending: list[tuple[Any, ...]] = []

            def held() -> int:  # bytes of the waiting layers' queries and keys
                return sum((q.numel() + k.numel()) * q.element_size() for _, q, k, *_ in pending)

            def census(
                layer: int, query: torch.Tensor, key: torch.Tensor,
                allowed: torch.Tensor | None, scaling: float, softcap: float | None,
                lse: torch.Tensor | None,
            ) -> None:  # fmt: skip
                li = layer_pos[layer]
                # tiles of ~2 MB stay in cache (larger ones cost up to 2× on a CPU); a tile's
                # logits and their exp are alive at once (plus small temporaries)
                values = scores.online_layer_scores(
                    query,
                    key,
                    allowed,
                    masks,
                    scaling=scaling,
                    softcap=softcap,
                    # at least 128 × 128 per document and head: smaller tiles (a batch of
                    # many short documents) cost more in per-operation overhead than in cache
                    block_bytes=max(
                        min(self.chunk_bytes // 8, 1 << 21),
                        min(self.chunk_bytes, 4 * query.shape[0] * query.shape[1] * 128 * 128),
                    ),
                    lse=lse,
                    tile=(
                        None
                        if runner is None or not runner.active
                        else lambda q0, k0, p, stats=None: runner.tile(layer, q0, k0, p, stats)
                    ),
                    stats_levels=None if runner is None else runner.stats_levels,
                )
                for name, v in values.items():
                    score_arrays[name][:, li, :] = v

            def flush() -> None:
                if pending:
                    with scores.threads(1):
                        for waiting in pending:
                            census(*waiting)
                    pending.clear()

            def online(
                layer: int, query: torch.Tensor, key: torch.Tensor,
                allowed: torch.Tensor | None, scaling: float, softcap: float | None,
                lse: torch.Tensor | None = None,
            ) -> None:  # fmt: skip
                if layer_pos.get(layer) is None:
                    return
                if not all_heads:
                    query, key = query.index_select(1, head_index), key.index_select(1, head_index)
                    lse = None if lse is None else lse.index_select(1, head_index)
                    allowed = (
                        allowed
                        if allowed is None or allowed.shape[1] == 1
                        else allowed.index_select(1, head_index)
                    )
                args = (layer, query, key, allowed, scaling, softcap, lse)
                if not scores.kernel_applies(query.device, allowed, softcap):
                    flush()  # the waiting layers first
                    census(*args)
                    return
                if held() + (query.numel() + key.numel()) * query.element_size() > self.chunk_bytes:
                    flush()  # the waiting layers first
                pending.append(args)
                if held() > self.chunk_bytes:
                    flush()

            # Scores-only in sdpa mode never materialises attention rows (online softmax).
            use_online = (
                not self.store_matrices
                and self.mode == "sdpa"
                and not (runner is not None and runner.active and not runner.tiled)
                and not self.overview
            )
            forward(
                loaded, path, ids, mask, consume, done, online if use_online else None, check,
                layers=self.layers, mode=self.mode, chunk_bytes=self.chunk_bytes,
                values=self.values, first_use=self._first_use,
            )  # fmt: skip
            flush()  # the layers still waiting for their census pass
            n_dup = masks.n_duplicate.cpu().numpy()
            n_ind = masks.n_induction.cpu().numpy()
            n_q = masks.n_queries.cpu().numpy()
            if sink_mass.seen:
                score_arrays["learned_sink"] = sink_mass.result()
        for i, stream in enumerate(streams):
            if stream is not None:  # every layer streamed: the document's segment is complete
                codes[i] = stream.close()
        segment = batch_segment(
            loaded, self.layers, self.heads, batch, skipped, codes, score_arrays,
            (n_q, n_dup, n_ind) if b else None, self._token_strings,
        )  # fmt: skip
        segment.overviews = overviews
        if runner is not None:  # built-in tables as columns, like every built-in table
            segment.extra = {
                name: table.to_pydict() if name in runner.builtin else table
                for name, table in runner.end().items()
            }
        if any(t.alignment is not None for t in batch):
            segment.annotation = {"parser": self.parser or "gold (corpus)"}
        return segment
