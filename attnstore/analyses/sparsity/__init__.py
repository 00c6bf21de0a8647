"""The ``sparsity`` analysis: where each head's attention goes by position (``schemas/sparsity.md``).

One row per (document, layer, head): the mass on the first four tokens (``sink4``), on a 64-token
recent window (``local64``), inside DuoAttention's streaming budget (``stream``), how far back a head
reaches (``span50``, ``span90``), the share of mass on the heaviest 1% of keys (``vertical1``) and of
offsets (``slash1``), and the needle probe's ``retrieval`` score. A second table, ``needles``, holds
one row per needle document (``probe:needle``, :mod:`attnstore.needles`): where its value and its
copied answer are, in token positions.

Everything is computed exactly from blocks of query rows, in memory linear in the document's length:
per layer and document, column masses ``[H, n]`` and diagonal masses ``[H, n]`` accumulate block by
block (float64) and the other columns are sums over rows. Within a block, each row's float64
cumulative sum from the diagonal backwards gives the row mass, both windows and ``span`` (by a
binary search); the diagonal masses are a strided (skewed) view of the reversed rows. No
``[T, T]`` state is kept across blocks, a layer's state is dropped as soon as its last block has
arrived, and the work buffers are at most one block (in float64) wide.

The analysis needs ``Batch.documents[i]`` to be the capture's ``Tokenized`` object of document ``i``
(for ``.doc.needle`` and ``.spans``) only for needle documents; without it every ``retrieval`` is
NULL and ``needles`` stays empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pyarrow as pa

from attnstore.index import NEEDLES, SPARSITY, SPARSITY_COLUMNS

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import torch

    from attnstore.abc.analysis import Batch
    from attnstore.needles import Needle
    from attnstore.scores import TileStats

__all__ = [
    "COLUMNS",
    "LONG_QUERIES",
    "NEEDLES_SCHEMA",
    "RETRIEVAL_MIN",
    "RETRIEVAL_MIN_N",
    "SCHEMA",
    "STREAMING_MIN",
    "Sparsity",
    "align_needle",
    "summary_sql",
    "top_count",
]

#: StreamingLLM's sink tokens.
SINK_TOKENS: Final = 4
#: The recent window of ``local64``, the diagonal included.
LOCAL_WINDOW: Final = 64
#: DuoAttention's streaming budget: ``sink`` first tokens plus ``recent`` most recent ones.
STREAM_SINK: Final = 128
STREAM_RECENT: Final = 256
#: ``span50`` and ``span90``.
SPAN_LEVELS: Final = (0.5, 0.9)
#: Score columns of the ``sparsity`` table, in order.
COLUMNS: Final = SPARSITY_COLUMNS
#: float64 elements per head chunk of a block (bounds the working memory of one call).
_CHUNK_ELEMENTS: Final = 1 << 22
#: Tile path: rows whose running mass plus a tile's float32 sum come within this of a span level
#: get that tile's exact float64 cumulative sum (a float32 sum of one tile row errs by ~1e-7).
_SPAN_MARGIN: Final = 1e-5

SCHEMA: Final = SPARSITY
NEEDLES_SCHEMA: Final = NEEDLES


def top_count(n: int) -> int:
    """``m = ⌈0.01·n⌉`` of ``vertical1`` and ``slash1``, in integers (no float rounding).

    >>> top_count(100), top_count(101), top_count(300), top_count(1)
    (1, 2, 3, 1)
    """
    return (n + 99) // 100


@dataclass(frozen=True)
class AlignedNeedle:
    """A needle's spans in token positions (inclusive; None when not among the stored tokens)."""

    value: tuple[int, int] | None
    answer: tuple[int, int] | None
    #: the answer and value hold the same token ids and the answer is stored: ``retrieval`` scored
    scorable: bool


def _overlapping(spans: Sequence[tuple[int, int] | None], span: tuple[int, int]) -> list[int]:
    start, end = span
    return [i for i, s in enumerate(spans) if s is not None and s[0] < end and s[1] > start]


def align_needle(
    needle: Needle, spans: Sequence[tuple[int, int] | None] | None, ids: Sequence[int]
) -> AlignedNeedle:
    """The token positions of a needle's value and answer: the stored tokens (``ids``, with their
    character ``spans``) that overlap each character span.

    >>> from attnstore.needles import Needle
    >>> align_needle(Needle(0.5, (0, 2), (6, 8)), [(0, 2), (2, 6), (6, 8)], [7, 3, 7])
    AlignedNeedle(value=(0, 0), answer=(2, 2), scorable=True)
    """
    if spans is None:
        return AlignedNeedle(None, None, False)
    spans = spans[: len(ids)]
    found = []
    for span in (needle.value, needle.answer):
        pos = _overlapping(spans, span)
        # a span cut by truncation is not stored whole: treat it as not stored
        whole = bool(pos) and max((s[1] for s in spans if s is not None), default=0) >= span[1]
        found.append((pos[0], pos[-1]) if whole else None)
    value, answer = found
    scorable = (
        value is not None
        and answer is not None
        and value[1] < answer[0]
        and list(ids[value[0] : value[1] + 1]) == list(ids[answer[0] : answer[1] + 1])
    )
    return AlignedNeedle(value, answer, scorable)


@dataclass
class _Doc:
    index: int  # row in the batch
    doc_id: int
    n: int
    #: retrieval: answer positions, their ids, and a value-position mask over the tokens
    answers: list[int] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)
    is_value: Any = None  # bool tensor [n] on the device
    ids: Any = None  # int64 tensor [n] on the device


@dataclass
class _Layer:
    """Accumulators of one layer over every document of the batch."""

    sums: dict[str, Any]  # column → float64 [B, H] (sink4, local64, stream, span50, span90)
    cols: list[Any]  # per document: float64 [H, n] column masses (None when n < 2)
    diags: list[Any]  # per document: float64 [H, n] diagonal masses
    hits: Any  # int64 [B, H]
    #: the tile path (:meth:`Sparsity.tile`): the block of rows in progress and, per document,
    #: its rows' running state (:class:`_Run`)
    block: int = -1
    runs: dict[int, _Run] = field(default_factory=dict)
    #: per needle document (batch index) whose answer rows lie in the block: (rows in the block,
    #: wanted ids, best value, best key) of the running argmax
    answers: dict[int, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """One document's rows of the block in progress on the tile path (rows ``lo …``)."""

    lo: int
    mass: Any  # float64 [H, R]: Σ of the row's tiles seen so far (the diagonal's and below)
    span: dict[float, Any]  # level → int64 [H, R]: D_p where found
    found: dict[float, Any]  # level → bool [H, R]


class Sparsity:
    """The ``sparsity`` and ``needles`` tables of ``schemas/sparsity.md`` (an analysis).

    Constructed with no arguments. Call :meth:`begin` with a batch, :meth:`rows` for every layer
    and block of query rows, :meth:`end` for ``{"sparsity": …, "needles": …}``.
    """

    name = "sparsity"
    schema = SCHEMA
    extra_schemas: Final = {"needles": NEEDLES_SCHEMA}
    #: the levels whose spans :meth:`tile_stats` reads from the census pass
    span_levels: Final = SPAN_LEVELS

    def __init__(self) -> None:
        self._docs: list[_Doc] = []
        self._layers: dict[int, _Layer] = {}
        self._heads: tuple[int, ...] = ()
        self._length = 0
        self._device: Any = None
        self._rows: dict[str, list[Any]] = {}
        self._needles: list[dict[str, Any]] = []
        self._work: dict[str, Any] = {}  # float64 work buffers (see _buffer)

    # -- protocol --------------------------------------------------------------------------------
    def applies(self, batch: Batch) -> bool:
        """Causal models only: every statistic of ``schemas/sparsity.md`` reads rows that end at
        the diagonal (an encoder's rows weigh keys on both sides)."""
        return bool(batch.doc_ids) and not batch.info.get("bidirectional")

    def begin(self, batch: Batch) -> None:
        import torch

        self._docs, self._layers, self._needles = [], {}, []
        self._rows = {c: [] for c in SCHEMA.names}
        self._heads = tuple(batch.heads) or tuple(range(batch.n_heads))
        self._length = int(batch.token_ids.shape[1])
        self._device = batch.device
        lengths = [int(x) for x in batch.lengths.tolist()]
        for i, doc_id in enumerate(batch.doc_ids):
            doc = _Doc(i, int(doc_id), lengths[i])
            tokenized = batch.documents[i] if i < len(batch.documents) else None
            needle = getattr(getattr(tokenized, "doc", None), "needle", None)
            if needle is not None:
                ids = [int(x) for x in batch.token_ids[i, : doc.n].tolist()]
                aligned = align_needle(needle, getattr(tokenized, "spans", None), ids)
                self._needles.append(_needle_row(doc.doc_id, needle.depth, aligned))
                if aligned.scorable and aligned.value and aligned.answer:
                    doc.answers = list(range(aligned.answer[0], aligned.answer[1] + 1))
                    doc.answer_ids = [ids[a] for a in doc.answers]
                    is_value = torch.zeros(doc.n, dtype=torch.bool)
                    is_value[aligned.value[0] : aligned.value[1] + 1] = True
                    doc.is_value = is_value.to(batch.device)
                    doc.ids = torch.tensor(ids, dtype=torch.int64, device=batch.device)
            self._docs.append(doc)

    def rows(self, layer: int, q0: int, probs: torch.Tensor) -> None:
        import torch

        state = self._layers.get(layer)
        if state is None:
            state = self._layers[layer] = self._new_layer(probs.shape[1], probs.device)
        q_end = q0 + probs.shape[2]
        with torch.no_grad():
            for doc in self._docs:
                lo, hi = max(q0, 1), min(q_end, doc.n)
                if lo < hi:
                    self._block(state, doc, probs[doc.index, :, lo - q0 : hi - q0, :hi], lo)
                if doc.answers:
                    self._retrieval(state, doc, q0, probs)
        if q_end >= self._length:
            self._finish(layer)

    def tile(self, layer: int, q0: int, k0: int, probs: torch.Tensor) -> None:
        """The tile protocol (``schemas/analyses.md``): rows ``q0 …``, keys ``k0 …`` of ``layer``,
        float32 ``[B, H, R, K]``, the tiles of a block of rows from the diagonal down to key 0.

        Per tile: column masses (a sum over rows), diagonal masses (the tile copied into a skewed
        buffer in which each column is one diagonal, then summed over rows), the windows of
        ``local64``/``stream`` (a few columns of that buffer), ``sink4`` and the ``stream`` sink part
        (the first keys). ``span`` keeps each row's mass from the diagonal down to this tile in
        float64; in the tile where it reaches ``p`` (rows of a causal softmax have mass 1, up to
        the kernel's float32 rounding) that row's float64 cumulative sum from the diagonal gives
        ``D_p``. Memory: O(H·(R·K + n)), time O(H·R·K) per tile.
        """
        import torch

        state = self._block_state(layer, q0, probs)
        n_rows, n_keys = probs.shape[2], probs.shape[3]
        q1 = q0 + n_rows
        with torch.no_grad():
            for doc in self._docs:
                lo, hi = max(q0, 1), min(q1, doc.n)
                if lo < hi and k0 < hi:
                    k_end = min(k0 + n_keys, hi)
                    p = probs[doc.index, :, lo - q0 : hi - q0, : k_end - k0]
                    self._tile(state, doc, p, lo, k0)
                if doc.answers:
                    self._retrieval_tile(state, doc, q0, k0, probs)
            self._tile_done(state, layer, k0, q1)

    def _block_state(self, layer: int, q0: int, probs: torch.Tensor) -> _Layer:
        """The layer's state for a tile of the block of rows from ``q0`` (a new block resets the
        block's running state)."""
        state = self._layers.get(layer)
        if state is None:
            state = self._layers[layer] = self._new_layer(probs.shape[1], probs.device)
        if state.block != q0:
            state.block, state.runs, state.answers = q0, {}, {}
        return state

    def _tile_done(self, state: _Layer, layer: int, k0: int, q1: int) -> None:
        """After a tile: the block's last one (``k0 = 0``) closes the block, the layer's last
        block (rows up to ``q1`` = the batch's length) the layer."""
        if k0 == 0:
            self._close_block(state)
            if q1 >= self._length:
                self._finish(layer)

    def _tile(self, state: _Layer, doc: _Doc, p: torch.Tensor, lo: int, k0: int) -> None:
        import torch

        n_heads, n_rows, n_keys = p.shape
        dev = p.device
        i, sums = doc.index, state.sums
        state.cols[i][:, k0 : k0 + n_keys] += p.sum(1)
        # skewed copy: head x, row j at flat offset (x·R + j)·W + R − 1 with W = K + R − 1; read as
        # [H, R, W] with row stride W + 1, column c holds A[q_j, q_j − d] with d = top − c for
        # every row j (zeros elsewhere: the gaps between rows are never written)
        width = n_keys + n_rows - 1
        buf = self._skew(n_heads, n_rows, n_keys, dev)
        buf.as_strided((n_heads, n_rows, n_keys), (n_rows * width, width, 1), n_rows - 1).copy_(p)
        skew = buf.as_strided((n_heads, n_rows, width), (n_rows * width, width + 1, 1), 0)
        top = lo + n_rows - 1 - k0  # d of column 0
        last = min(width - 1, top)  # columns 0 … last have d ≥ 0
        state.diags[i][:, top - last : top + 1] += skew.sum(1)[:, : last + 1].flip(-1)

        def band(size: int) -> torch.Tensor | None:  # Σ_{0 ≤ d < size} per row, [H, R]
            first = max(0, top - size + 1)
            return skew[:, :, first : last + 1].sum(-1) if first <= last else None

        local = band(LOCAL_WINDOW)
        if local is not None:
            sums["local64"][i] += local.sum(-1)
        recent = band(STREAM_RECENT)
        if recent is not None:
            sums["stream"][i] += recent.sum(-1)
        self._first_keys(state, doc, p, lo, k0)
        qs = torch.arange(lo, lo + n_rows, device=dev)
        run = state.runs.get(i)
        if run is None:
            zeros = torch.zeros((n_heads, n_rows), dtype=torch.float64, device=dev)
            run = state.runs[i] = _Run(
                lo,
                zeros,
                {lv: torch.zeros_like(zeros, dtype=torch.int64) for lv in SPAN_LEVELS},
                {lv: torch.zeros_like(zeros, dtype=torch.bool) for lv in SPAN_LEVELS},
            )
        mass = run.mass + p.sum(-1)
        for level in SPAN_LEVELS:
            found = run.found[level]
            near = ~found & (mass >= level - _SPAN_MARGIN)
            if not bool(near.any()):
                continue
            hs, rs = near.nonzero(as_tuple=True)
            # each row's float64 sum from the diagonal down: its keys in decreasing order (those
            # above the diagonal come first and are 0), j ↦ k = k0 + K − 1 − j, d = q − k
            exact = p[hs, rs].flip(-1).to(torch.float64).cumsum(-1) + run.mass[hs, rs, None]
            reached = exact >= level
            hit = reached.any(-1)
            d = qs[rs] - (k0 + n_keys - 1) + reached.to(torch.int8).argmax(-1)
            run.span[level][hs[hit], rs[hit]] = d[hit]
            found[hs[hit], rs[hit]] = True
            mass[hs, rs] = exact[:, -1]
        run.mass = mass

    @staticmethod
    def _first_keys(state: _Layer, doc: _Doc, p: torch.Tensor, lo: int, k0: int) -> None:
        """``sink4`` and the sink part of ``stream`` from the first keys, when the tile ``p``
        (``[H, R, K]``, rows ``lo …``, keys ``k0 …``) holds them."""
        import torch

        sums, i, n_keys = state.sums, doc.index, p.shape[2]
        if k0 < STREAM_SINK:  # Σ_{k < m} with m = min(128, q − 255): keys outside the recent window
            w = min(n_keys, STREAM_SINK - k0)
            qs = torch.arange(lo, lo + p.shape[1], device=p.device)
            sink_end = (qs - (STREAM_RECENT - 1)).clamp(min=0, max=STREAM_SINK)
            keys = torch.arange(k0, k0 + w, device=p.device)
            outside = keys[None, :] < sink_end[:, None]
            sums["stream"][i] += (p[:, :, :w] * outside).sum((1, 2))
        if k0 < SINK_TOKENS:
            sums["sink4"][i] += p[:, :, : SINK_TOKENS - k0].sum((1, 2))

    def tile_stats(
        self, layer: int, q0: int, k0: int, probs: torch.Tensor, stats: TileStats | None
    ) -> None:
        """:meth:`tile` with what the compiled census pass already measured
        (:class:`attnstore.scores.TileStats`: window and first-key masses and spans of a block of
        rows at its last tile, the layer's column and diagonal masses at its last tile), so only
        the needle rows are read from ``probs`` here. ``stats`` None: :meth:`tile`."""
        import torch

        if stats is None:
            self.tile(layer, q0, k0, probs)
            return
        state = self._block_state(layer, q0, probs)
        with torch.no_grad():
            for doc in self._docs:
                if doc.answers:
                    self._retrieval_tile(state, doc, q0, k0, probs)
                if stats.columns is not None and stats.diagonals is not None and doc.n >= 2:
                    state.cols[doc.index] += stats.columns[doc.index, :, : doc.n]
                    state.diags[doc.index] += stats.diagonals[doc.index, :, : doc.n]
            sums = state.sums  # rows outside a document's queries hold 0 in the stats
            if stats.local is not None:  # the block's last tile
                assert stats.recent is not None
                assert stats.early is not None
                assert stats.sink4 is not None
                sums["local64"] += stats.local.sum(-1)
                sums["stream"] += (stats.recent + stats.early).sum(-1)
                sums["sink4"] += stats.sink4.sum(-1)
            for level, d in (stats.span or {}).items():
                sums[f"span{round(level * 100)}"] += d.clamp_min(0).sum(-1).to(torch.float64)
            self._tile_done(state, layer, k0, q0 + probs.shape[2])

    def _skew(self, n_heads: int, n_rows: int, n_keys: int, device: Any) -> torch.Tensor:
        """The zeroed float32 buffer of :meth:`_tile`'s skewed copy for one tile shape, reused
        while the shape repeats (the gaps stay zero: only the rows are rewritten)."""
        import torch

        key = (n_heads, n_rows, n_keys)
        cache = self._work.setdefault("skew", {})
        buf: torch.Tensor | None = cache.get(key)
        if buf is None or buf.device != torch.device(device):
            if len(cache) >= 4:
                cache.clear()
            size = n_heads * n_rows * (n_keys + n_rows - 1) + n_rows
            buf = cache[key] = torch.zeros(size, dtype=torch.float32, device=device)
        return buf

    def _retrieval_tile(
        self, state: _Layer, doc: _Doc, q0: int, k0: int, probs: torch.Tensor
    ) -> None:
        """The running argmax (lowest key on ties) of the answer rows in this tile's block."""
        import torch

        n_rows, n_keys = probs.shape[2], probs.shape[3]
        if doc.index not in state.answers:
            mine = [(a, t) for a, t in zip(doc.answers, doc.answer_ids, strict=True)
                    if q0 <= a - 1 < q0 + n_rows]  # fmt: skip
            if not mine:
                state.answers[doc.index] = ()
                return
            rows = torch.tensor([a - 1 - q0 for a, _ in mine], device=probs.device)
            want = torch.tensor([t for _, t in mine], device=probs.device)
            best = torch.full((probs.shape[1], len(mine)), -1.0, device=probs.device)
            at = torch.zeros_like(best, dtype=torch.int64)
            state.answers[doc.index] = (rows, want, best, at)
        if not state.answers[doc.index]:
            return
        rows, want, best, at = state.answers[doc.index]
        width = min(n_keys, doc.n - k0)
        if width <= 0:
            return
        value, index = probs[doc.index, :, rows, :width].max(-1)
        better = value >= best  # tiles come with decreasing keys: a tie goes to the lower key
        best[better], at[better] = value[better], index[better] + k0

    def _close_block(self, state: _Layer) -> None:
        """The block of rows is complete: its rows' spans and retrieval hits join the sums."""
        import torch

        for i, found in state.answers.items():
            if found:
                doc = self._docs[i]
                _, want, _, at = found
                state.hits[doc.index] += _hits(doc, at, want)
        for i, run in state.runs.items():
            for level in SPAN_LEVELS:
                # rows without mass reach 0 at D = 0 (as on the row path); a row with some mass
                # that never reaches p is not a softmax row: refused, not guessed
                short = ~run.found[level] & (run.mass > 0)
                if bool(short.any()):
                    raise ValueError(
                        f"a row of the tile path has mass {float(run.mass[short].max()):.6g}, "
                        f"below span level {level}: tiles must hold softmax rows (mass 1)"
                    )
                span = torch.where(run.found[level], run.span[level], 0)
                state.sums[f"span{round(level * 100)}"][i] += span.sum(-1).to(torch.float64)
        state.runs, state.answers = {}, {}

    def end(self) -> Mapping[str, pa.Table]:
        for layer in sorted(self._layers):
            self._finish(layer)
        self._work = {}
        sparsity = _table(SCHEMA, self._rows)
        needles = pa.Table.from_pylist(self._needles, schema=NEEDLES_SCHEMA)
        return {
            "sparsity": sparsity.sort_by(
                [("doc_id", "ascending"), ("layer", "ascending"), ("head", "ascending")]
            ),
            "needles": needles.sort_by("doc_id"),
        }

    # -- accumulation ------------------------------------------------------------------------------
    def _new_layer(self, n_heads: int, device: Any) -> _Layer:
        import torch

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        b = len(self._docs)
        keys = ("sink4", "local64", "stream", *(f"span{round(p * 100)}" for p in SPAN_LEVELS))
        return _Layer(
            sums={k: zeros(b, n_heads) for k in keys},
            cols=[zeros(n_heads, d.n) if d.n >= 2 else None for d in self._docs],
            diags=[zeros(n_heads, d.n) if d.n >= 2 else None for d in self._docs],
            hits=torch.zeros(b, n_heads, dtype=torch.int64, device=device),
        )

    def _block(self, state: _Layer, doc: _Doc, block: torch.Tensor, lo: int) -> None:
        """Rows ``lo …`` of one document (``block``: float32 ``[H, R, K]``, K = lo + R: keys up to
        the block's last row; entries above the diagonal are 0).

        Each row is reversed (key ``k`` at ``j = K-1-k``) into a zero-padded float64 buffer ``g``
        of R + K columns; its cumulative sum ``c[j] = Σ_{k ≥ K-1-j} A[q, k]`` is, from the diagonal
        ``j = K-1-q`` on, the sum from the diagonal backwards that ``span`` is defined by (the
        zeros above the diagonal add nothing), and its last value is the row mass. Windows are
        read off it; the diagonal masses are a strided view of ``g`` (row ``r`` shifted by ``r``).
        """
        import torch

        n_heads, n_rows, n_keys = block.shape
        dev = block.device
        qs = torch.arange(lo, lo + n_rows, device=dev)
        diag = n_keys - 1 - qs  # j of the diagonal in each reversed row, [R]

        def window(width: int) -> torch.Tensor:  # index of Σ_{q-width+1 ≤ k ≤ q} in c
            return (diag + width - 1).clamp(max=n_keys - 1)

        # stream = Σ over the last 256 keys + Σ_{k < m} with m = min(128, q-255) (0 if q < 256)
        sink_end = (qs - (STREAM_RECENT - 1)).clamp(min=0, max=STREAM_SINK)
        where = {
            "local64": window(LOCAL_WINDOW),
            "recent": window(STREAM_RECENT),
            "outside": n_keys - 1 - sink_end,  # c there: Σ_{k ≥ m}
        }
        width = n_keys + n_rows
        sums, i = state.sums, doc.index
        step = max(1, _CHUNK_ELEMENTS // max(1, n_rows * width))
        for h0 in range(0, n_heads, step):
            h1 = min(n_heads, h0 + step)
            h = h1 - h0
            g = self._buffer("g", (h, n_rows, width), dev)
            g[..., n_keys:] = 0.0
            g[..., :n_keys] = block[h0:h1].flip(-1)
            c = torch.cumsum(g[..., :n_keys], -1, out=self._buffer("c", (h, n_rows, n_keys), dev))
            mass = c[..., -1]  # r_q, [h, R]

            def read(index: torch.Tensor, c: torch.Tensor = c, h: int = h) -> torch.Tensor:
                return c.gather(-1, index[None, :, None].expand(h, n_rows, 1))[..., 0]

            sums["sink4"][i, h0:h1] += block[h0:h1, :, :SINK_TOKENS].to(torch.float64).sum((1, 2))
            sums["local64"][i, h0:h1] += read(where["local64"]).sum(-1)
            stream = read(where["recent"]) + (mass - read(where["outside"]))
            sums["stream"][i, h0:h1] += stream.sum(-1)
            for p in SPAN_LEVELS:
                # the first j with c[j] ≥ p·r_q (c is non-decreasing): D = j - diag
                first = torch.searchsorted(c, (p * mass)[..., None])[..., 0]
                span = (first - diag[None, :]).clamp(min=0)
                sums[f"span{round(p * 100)}"][i, h0:h1] += span.sum(-1).to(torch.float64)
            state.cols[i][h0:h1, :n_keys] += g[..., :n_keys].sum(1).flip(-1)
            # (r, d) ↦ g[r, diag_r + d] = A[q_r, q_r - d]: row stride width-1, offset diag_0
            shifted = g.as_strided(
                (h, n_rows, n_keys),
                (n_rows * width, width - 1, 1),
                g.storage_offset() + n_keys - 1 - lo,
            )
            state.diags[i][h0:h1, :n_keys] += shifted.sum(1)

    def _buffer(self, name: str, shape: tuple[int, ...], device: Any) -> torch.Tensor:
        """A float64 work buffer of ``shape``, reused across calls (first-touch page faults of a
        fresh allocation cost as much as the arithmetic); at most one block's size."""
        import torch

        size = int(np.prod(shape))
        buf = self._work.get(name)
        if buf is None or buf.numel() < size or buf.device != torch.device(device):
            buf = self._work[name] = torch.empty(size, dtype=torch.float64, device=device)
        return buf[:size].view(shape)

    def _retrieval(self, state: _Layer, doc: _Doc, q0: int, probs: torch.Tensor) -> None:
        """Hits of the answer positions whose query row ``a - 1`` lies in this block."""
        import torch

        q_end = q0 + probs.shape[2]
        mine = [(a, t) for a, t in zip(doc.answers, doc.answer_ids, strict=True)
                if q0 <= a - 1 < q_end]  # fmt: skip
        if not mine:
            return
        rows = torch.tensor([a - 1 - q0 for a, _ in mine], device=probs.device)
        n_keys = min(probs.shape[3], doc.n)
        # [H, m, K]: entries above the diagonal are 0, so the first maximum is at k ≤ q
        best = probs[doc.index, :, rows, :n_keys].argmax(dim=-1)
        want = torch.tensor([t for _, t in mine], device=probs.device)
        state.hits[doc.index] += _hits(doc, best, want)

    def _finish(self, layer: int) -> None:
        """Turn one layer's accumulators into rows and drop them."""
        import torch

        state = self._layers.pop(layer, None)
        if state is None:
            return
        n_heads = state.hits.shape[1]
        sums = {k: v.cpu().numpy() for k, v in state.sums.items()}
        hits = state.hits.cpu().numpy()
        for doc in self._docs:
            i, nq = doc.index, doc.n - 1
            values: dict[str, np.ndarray] = {}
            nan = np.full(n_heads, np.nan)
            if doc.n < 2:
                values = dict.fromkeys(COLUMNS, nan)
            else:
                for key, total in sums.items():
                    values[key] = total[i] / nq
                m = top_count(doc.n)
                for name, masses in (("vertical1", state.cols[i]), ("slash1", state.diags[i])):
                    total_mass = masses.sum(-1)
                    top = torch.topk(masses, m, dim=-1).values.sum(-1)
                    share = (top / total_mass).cpu().numpy()
                    values[name] = np.where(total_mass.cpu().numpy() > 0, share, np.nan)
                values["retrieval"] = hits[i] / len(doc.answers) if doc.answers else nan
            rows = self._rows
            rows["doc_id"].append(np.full(n_heads, doc.doc_id, np.int64))
            rows["layer"].append(np.full(n_heads, layer, np.int32))
            rows["head"].append(np.asarray(self._heads[:n_heads], np.int32))
            for c in COLUMNS:
                rows[c].append(np.asarray(values[c], np.float64))
            rows["n_queries"].append(np.full(n_heads, max(nq, 0), np.int32))
            n_ret = len(doc.answers) if doc.n >= 2 else 0
            rows["n_retrieval"].append(np.full(n_heads, n_ret, np.int32))


def _hits(doc: _Doc, best: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per head, how many answer rows' first argmax key ``best`` ``[H, m]`` lies in the value and
    holds the answer token ``want`` ``[m]``."""
    hit: torch.Tensor = doc.is_value[best] & (doc.ids[best] == want[None, :])
    return hit.sum(-1)


def _needle_row(doc_id: int, depth: float, aligned: AlignedNeedle) -> dict[str, Any]:
    value, answer = aligned.value or (None, None), aligned.answer or (None, None)
    return {
        "doc_id": doc_id, "depth": float(depth), "value_first": value[0], "value_last": value[1],
        "answer_first": answer[0], "answer_last": answer[1],
    }  # fmt: skip


def _table(schema: pa.Schema, columns: dict[str, list[Any]]) -> pa.Table:
    """Columns (lists of numpy chunks) → a table of ``schema``; NaN in float columns is NULL."""
    arrays = []
    for f in schema:
        chunks = columns.get(f.name) or []
        values = np.concatenate(chunks) if chunks else np.zeros(0, f.type.to_pandas_dtype())
        if pa.types.is_floating(f.type):
            arrays.append(pa.array(values, type=f.type, mask=np.isnan(values)))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# ------------------------------------------------------------------------------------------------
# corpus level: the sparsity_summary view (the CLI listings: attnstore.analyses.sparsity.listings)
# ------------------------------------------------------------------------------------------------


from attnstore.analyses.sparsity.views import (
    LONG_QUERIES,
    RETRIEVAL_MIN,
    RETRIEVAL_MIN_N,
    STREAMING_MIN,
    summary_sql,
)
