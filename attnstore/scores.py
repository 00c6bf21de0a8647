"""Pattern scores per (document, layer, head), as defined in ``schemas/scores.md``.

Every score is a mean over query positions of a per-row quantity, so it can be accumulated over
*blocks of query rows*: extraction computes one layer's probabilities a block of rows at a time and
never holds a whole ``[T, T]`` square per head (:class:`LayerScores`). The arithmetic runs in torch,
on the device of the attention, in float32, before any codec touches the values; sums are float64.

Axis vocabulary: ``doc head q_pos k_pos``. Documents are right-padded, so row ``q < n_tokens[doc]``
only ever sees real keys (causal masking) and padded rows are left out of every mean.

NULL rule: a score whose query set is empty is NaN in the arrays returned here and NULL in Parquet
(``attnstore.index`` converts). NaN never stands for anything else.

Growth laws (B documents of T tokens, H heads, d head dimension; no ``[T, T]`` tensor anywhere):

- :func:`batch_masks`: O(B·T) memory, O(B·T log T) time (one sort per document). The duplicate and
  induction key sets are not stored: a query's previous occurrences are a contiguous run of the
  document's positions sorted by (token, position), enumerated block by block (:func:`key_pairs`).
- :class:`LayerScores` (fed exact probability rows): O(B·H) state; per block of C rows it touches
  only keys ``0 … q0+C`` (the upper triangle is skipped), so a layer costs O(B·H·T²/2) time.
  The duplicate/induction sums cost O(H) per (query, key) pair of the key sets, i.e.
  O(H·Σ_q |D(q)|): linear in T for ordinary text, T²/2 only for a document of one repeated token.
- :func:`online_layer_scores` (queries and keys only, no attention rows): memory one block of
  ``block_bytes`` plus O(B·H·T) for the queries and keys themselves; time O(B·H·T²·(d + c)/2)
  — one ``q·k`` product, one ``exp`` and a few reductions per visible (query, key) element, the
  same order as the fused attention kernel of the forward pass. On a CPU with a C compiler the
  ``exp`` and every reduction of a tile are one compiled loop (:mod:`attnstore.kernels`), plus
  O(B·H·T) float64 for the layer's column and diagonal masses when the sparsity table is read.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "COUNT_COLUMNS",
    "SCORE_COLUMNS",
    "BatchMasks",
    "LayerScores",
    "TileStats",
    "batch_masks",
    "key_pairs",
    "online_layer_scores",
    "score_layer",
]

#: Score columns of the ``heads`` table, in table order.
SCORE_COLUMNS: Final = (
    "prev_token",
    "sink",
    "self",
    "duplicate",
    "induction",
    "entropy",
    "max_weight",
    "mean_distance",
)
#: Size of each score's query set, for corpus-level means weighted by count.
COUNT_COLUMNS: Final = ("n_queries", "n_duplicate", "n_induction")
#: The count column that weights each score in a corpus-level mean (Σ score·count / Σ count).
WEIGHT_COLUMN: Final[dict[str, str]] = {
    name: {"duplicate": "n_duplicate", "induction": "n_induction"}.get(name, "n_queries")
    for name in SCORE_COLUMNS
}

#: Largest number of (doc, query, key) pairs of a key set enumerated at once.
PAIR_CHUNK: Final = 1 << 22
#: Most (doc, query, key) pairs a batch keeps between layers (3 int64 each: 96 MiB).
PAIR_CACHE: Final = 1 << 22


@dataclass(frozen=True)
class BatchMasks:
    """Per-batch query sets shared by every layer and head (built once per batch), O(B·T).

    Occurrence lists: ``order[doc]`` is the document's positions sorted by (token id, position),
    so the earlier occurrences of ``x_q`` are ``order[doc, start[doc, q] : start[doc, q] +
    rank[doc, q]]`` (ascending). The duplicate key set is D(q) = those positions; the induction key
    set is I(q) = {j + 1 : j ∈ D(q), j ≠ q − 1} (the token right after each earlier copy, k = q
    excluded). :func:`key_pairs` enumerates them for a block of rows.
    """

    valid_q: torch.Tensor  # [doc, q_pos] bool: 1 <= q < n_tokens
    dup_rows: torch.Tensor  # [doc, q_pos] bool: q ∈ Q_dup
    ind_rows: torch.Tensor  # [doc, q_pos] bool: q ∈ Q_ind
    n_queries: torch.Tensor  # [doc] int64: |Q1|
    n_duplicate: torch.Tensor  # [doc] int64: |Q_dup|
    n_induction: torch.Tensor  # [doc] int64: |Q_ind|
    log_norm: torch.Tensor  # [q_pos] float32: ln(q + 1), 1 at q = 0 (excluded anyway)
    order: torch.Tensor  # [doc, T] int64: positions sorted by (token id, position)
    start: torch.Tensor  # [doc, q_pos] int64: index in ``order`` of x_q's first occurrence
    rank: torch.Tensor  # [doc, q_pos] int64: |D(q)|, earlier occurrences of x_q (0 on padding)
    n_ind_keys: torch.Tensor  # [doc, q_pos] int64: |I(q)| (0 on padding)
    #: a block's key-sorted pairs (:func:`_block_pairs`), the same for every layer of the batch:
    #: kept while they hold at most :data:`PAIR_CACHE` pairs in all
    pair_cache: dict[tuple[int, int], Any] = field(default_factory=dict, compare=False, repr=False)


#: ``exp`` arguments are clamped to this floor before the exponential. Below it ``e^z`` is a float32
#: denormal (under 2⁻¹²⁶ ≈ 1.2e-38) or 0, and torch's vectorised ``exp`` falls back to a path 20–40×
#: slower for those lanes (masked keys at −inf or −1e30, sink-dominated rows of real models): the
#: clamp changes each such weight by under 1.7e-38, below any float32 row sum's rounding.
EXP_FLOOR: Final = -87.0


def batch_masks(token_ids: torch.Tensor, n_tokens: torch.Tensor) -> BatchMasks:
    """Build the query sets of the spec for a right-padded batch: O(B·T) memory.

    Parameters
    ----------
    token_ids
        ``[doc, q_pos]`` int64 token ids; values past ``n_tokens`` are ignored.
    n_tokens
        ``[doc]`` int64 true lengths.
    """
    import torch

    b, t = token_ids.shape
    device = token_ids.device
    pos = torch.arange(t, device=device)
    in_doc = pos[None, :] < n_tokens[:, None].to(device)  # [doc, pos]
    valid_q = in_doc & (pos[None, :] >= 1)
    # padding gets token id -1 (after shifting real ids up by one) so it never joins a real group
    tok = torch.where(in_doc, token_ids.long() + 1, torch.zeros_like(token_ids, dtype=torch.long))
    sorted_key, order = torch.sort(tok * t + pos[None, :], dim=1)
    tok_sorted = sorted_key // t if t else sorted_key
    idx = pos[None, :].expand(b, t)
    first = torch.ones((b, t), dtype=torch.bool, device=device)
    first[:, 1:] = tok_sorted[:, 1:] != tok_sorted[:, :-1]
    group_start = torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), dim=1).values
    start = torch.empty_like(order).scatter_(1, order, group_start)
    rank = torch.empty_like(order).scatter_(1, order, idx - group_start)
    rank = torch.where(in_doc, rank, torch.zeros_like(rank))
    # I(q) = {j + 1 : j ∈ D(q), j ≠ q - 1}: one fewer key when x_{q-1} == x_q
    repeat_prev = torch.zeros_like(in_doc)
    repeat_prev[:, 1:] = token_ids[:, 1:] == token_ids[:, :-1]
    n_ind_keys = torch.where(in_doc, rank - repeat_prev.long(), torch.zeros_like(rank))
    log_norm = torch.log(pos.to(torch.float32) + 1.0)
    if t:
        log_norm[0] = 1.0
    dup_rows = valid_q & (rank > 0)
    ind_rows = valid_q & (n_ind_keys > 0)
    return BatchMasks(
        valid_q=valid_q,
        dup_rows=dup_rows,
        ind_rows=ind_rows,
        n_queries=valid_q.sum(-1),
        n_duplicate=dup_rows.sum(-1),
        n_induction=ind_rows.sum(-1),
        log_norm=log_norm,
        order=order,
        start=start,
        rank=rank,
        n_ind_keys=n_ind_keys,
    )


def key_pairs(
    masks: BatchMasks, kind: str, q0: int, q1: int, *, max_pairs: int = PAIR_CHUNK
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (doc, q, k) pairs of the duplicate (``kind="dup"``) or induction (``"ind"``) key sets
    for the valid query rows ``q0 … q1 - 1``, in chunks of at most ``max_pairs`` pairs (a single
    row with more keys than that is one chunk). Pairs come grouped by (doc, q), keys ascending.

    Memory is O(pairs of one chunk); no ``[q, k]`` mask is built.
    """
    import torch

    if kind not in ("dup", "ind"):
        raise ValueError(f"Expected kind 'dup' or 'ind'. Got {kind!r}.")
    valid = masks.valid_q[:, q0:q1]
    rank = masks.rank[:, q0:q1]
    n_keys = rank if kind == "dup" else masks.n_ind_keys[:, q0:q1]
    counts = torch.where(valid, rank, torch.zeros_like(rank)).flatten()
    if n_keys.numel() == 0 or not bool((torch.where(valid, n_keys, 0) > 0).any()):
        return
    c = q1 - q0
    cum = torch.cumsum(counts, 0)
    # chunk boundaries over flattened (doc, row) entries, each chunk ≤ max_pairs where possible
    bounds = [0]
    while bounds[-1] < len(counts):
        base = int(cum[bounds[-1] - 1]) if bounds[-1] else 0
        nxt = int(torch.searchsorted(cum, base + max_pairs, right=True))
        bounds.append(max(nxt, bounds[-1] + 1))
    for lo, hi in itertools.pairwise(bounds):
        cnt = counts[lo:hi]
        n = int(cnt.sum())
        if n == 0:
            continue
        flat = torch.repeat_interleave(torch.arange(lo, hi, device=cnt.device), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        offset = torch.arange(n, device=cnt.device) - torch.repeat_interleave(first, cnt)
        doc, row = flat // c, flat % c
        q = row + q0
        j = masks.order[doc, masks.start[doc, q] + offset]  # earlier occurrences of x_q
        if kind == "dup":
            yield doc, q, j
        else:
            keep = j != q - 1
            yield doc[keep], q[keep], j[keep] + 1


def _pair_rows(
    values: torch.Tensor, masks: BatchMasks, kind: str, q0: int, q1: int
) -> torch.Tensor:
    """Σ_{k ∈ key set of q} values[doc, :, q - q0, k] for rows q0 … q1 - 1 → ``[doc, head, C]``."""
    import torch

    b, h, c, _ = values.shape
    out = torch.zeros((b, c, h), dtype=values.dtype, device=values.device)
    for doc, q, k in key_pairs(masks, kind, q0, q1):
        if len(doc):
            row = q - q0
            out.index_put_((doc, row), values[doc, :, row, k], accumulate=True)
    return out.transpose(1, 2)


class LayerScores:
    """Accumulates every score of one layer over blocks of query rows of its probabilities.

    State is O(B·H) sums (plus the batch's O(B·T) :class:`BatchMasks`); each block may come in any
    size and order, but every valid row must come exactly once.

    >>> acc = LayerScores(masks, n_heads)  # doctest: +SKIP
    >>> for q0 in range(0, T, chunk):  # doctest: +SKIP
    ...     acc.add(probs[:, :, q0:q0 + chunk], q0)
    >>> acc.result()["induction"]  # [doc, head] float64, NaN = NULL  # doctest: +SKIP
    """

    def __init__(self, masks: BatchMasks, n_heads: int) -> None:
        import torch

        self.masks = masks
        b, t = masks.valid_q.shape
        dev = masks.valid_q.device
        self._sums = {
            name: torch.zeros((b, n_heads), dtype=torch.float64, device=dev)
            for name in SCORE_COLUMNS
        }
        self._pos = torch.arange(t, device=dev, dtype=torch.float32)
        self._row_masks = {"duplicate": masks.dup_rows, "induction": masks.ind_rows}

    def _add(self, name: str, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Add Σ over the block's rows in ``mask`` of ``rows[doc, head, row]``."""
        import torch

        self._sums[name] += (rows.to(torch.float64) * mask[:, None, :].to(torch.float64)).sum(-1)

    def add_rows(self, q0: int, values: dict[str, torch.Tensor]) -> None:
        """Per-row values ``[doc, head, C]`` of rows ``q0 … q0 + C`` for any of the scores."""
        for name, rows in values.items():
            c = rows.shape[-1]
            mask = self._row_masks.get(name, self.masks.valid_q)[:, q0 : q0 + c]
            self._add(name, rows, mask)

    def add(self, probs: torch.Tensor, q0: int) -> None:
        """Rows ``q0 … q0 + C`` of one layer: ``probs`` is ``[doc, head, C, K]`` float32 with
        ``K ≥ q0 + C`` and zeros above the diagonal (only keys ``0 … q0 + C - 1`` are read)."""
        import torch

        m = self.masks
        c = probs.shape[2]
        q1 = q0 + c
        probs = probs[..., :q1]  # causal: keys past the block's last row are 0
        rows = torch.arange(c, device=probs.device)
        q = rows + q0
        # -Σ p ln p; clamping keeps 0·ln 0 = 0 and is ~2× faster than special.entr (one temporary)
        plogp = probs.clamp_min(torch.finfo(torch.float32).tiny).log_().mul_(probs).sum(-1)
        self.add_rows(
            q0,
            {
                "prev_token": probs[:, :, rows, (q - 1).clamp_min(0)],  # q = 0 is not valid
                "sink": probs[..., 0],
                "self": probs[:, :, rows, q],
                "duplicate": _pair_rows(probs, m, "dup", q0, q1),
                "induction": _pair_rows(probs, m, "ind", q0, q1),
                "entropy": -plogp / m.log_norm[q0:q1],
                "max_weight": probs.amax(-1),
                # Σ_k A[q,k] (q − k) = q Σ_k A[q,k] − Σ_k k A[q,k]
                "mean_distance": q.to(torch.float32) * probs.sum(-1) - probs @ self._pos[:q1],
            },
        )

    def result(self) -> dict[str, np.ndarray]:
        """Score name → float64 ``[doc, head]``; NaN where the query set is empty."""
        m = self.masks
        counts = {
            "duplicate": m.n_duplicate,
            "induction": m.n_induction,
        }
        out = {}
        for name, total in self._sums.items():
            n = counts.get(name, m.n_queries).to(total.dtype)[:, None]
            out[name] = (total / n).cpu().numpy()  # 0/0 -> NaN, the NULL marker
        return out


def score_layer(probs: torch.Tensor, masks: BatchMasks) -> dict[str, np.ndarray]:
    """Every score of the spec for one whole layer ``[doc, head, q_pos, k_pos]`` of a batch."""
    acc = LayerScores(masks, probs.shape[1])
    acc.add(probs, 0)
    return acc.result()


def online_layer_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor | None,
    masks: BatchMasks,
    token_ids: torch.Tensor | None = None,
    *,
    scaling: float,
    softcap: float | None = None,
    block_bytes: int = 1 << 21,
    q_block: int = 256,
    lse: torch.Tensor | None = None,
    tile: Callable[..., None] | None = None,
    stats_levels: tuple[float, ...] | None = None,
    kernel: bool = True,
) -> dict[str, np.ndarray]:
    """Every score from the layer's queries and keys, without materialising its attention.

    Square-ish tiles (at most ``q_block`` query rows; ``block_bytes`` of float32 logits for the
    batch's heads) are visited for keys ``0 … q1 - 1`` only (tiles above the diagonal are never
    computed; the diagonal tile's upper triangle is position arithmetic), from the diagonal down
    to key 0. Each tile's weights are ``p = e^(s − lse)`` with ``lse`` the rows' log-sum-exp:
    given by the forward's own fused kernel (``lse``, free on CPU), else computed by a first pass
    (:func:`row_lse`). The subtraction rides in the ``q·k`` product (queries carry ``−lse`` in an
    extra column, keys a 1). Per row it keeps ``l = Σ p``, ``a = Σ p·ln p``, ``Σ p·k``, the largest
    logit and ``Σ p`` over the duplicate and induction key sets; then, normalising by ``l`` (1 up
    to the kernel's rounding), ``max_weight = e^(max z) / l``, entropy ``ln l − a / l``,
    ``mean_distance = q − Σ p·k / l``; ``prev_token``, ``self`` and ``sink`` are the weights at
    keys q−1, q and 0 over ``l``.

    ``tile(q0, k0, p)``, when given, receives every tile's weights ``p`` (``[doc, head, C, K]``
    float32, rows ``q0 …``, keys ``k0 …``; 0 above the diagonal, outside ``allowed`` and on rows
    past a document's length), the tiles of a block of rows from the diagonal down to ``k0 = 0``:
    what the analyses' tile protocol reads (``schemas/analyses.md``).

    Memory: one tile (≤ ``block_bytes``, times ~3 for its ``exp`` and temporaries) plus O(B·H·C)
    row state and the queries/keys with one extra column, whatever T is; time O(B·H·T²·(d + c)/2):
    one ``q·k`` product, one ``exp`` and a few reductions per visible (query, key) element, the
    order of the fused attention kernel. Exact against the materialised rows (:func:`score_layer`)
    within float32 rounding.

    Parameters
    ----------
    query, key
        ``[doc, head, q_pos, d]`` after rotary embedding, key/value heads already repeated.
    allowed
        ``None`` for plain causal attention over a right-padded batch (what the scores need: a
        valid row never sees padding), or a boolean mask broadcastable to
        ``[doc, head, q_pos, k_pos]``, combined with causality.
    token_ids
        Unused (the key sets come from ``masks``); kept for callers of the old signature.
    lse
        ``[doc, head, q_pos]`` float32, the log-sum-exp of each row's (soft-capped, masked)
        logits; None: computed here.
    stats_levels
        Not None: ``tile`` takes a fourth argument, the tile's :class:`TileStats` (span levels
        ``stats_levels``), wherever the compiled pass runs; elsewhere it gets ``None`` there.
    kernel
        Use the compiled per-tile loop (:mod:`attnstore.kernels`) where it applies (CPU, plain
        causal attention, no soft cap) and builds; False: the torch path, its reference.
    """
    import torch

    del token_ids
    b, h, t, _ = query.shape
    dev = query.device
    acc = LayerScores(masks, h)
    if t == 0:
        return acc.result()
    if lse is None:
        lse = row_lse(
            query, key, allowed, scaling=scaling, softcap=softcap, block_bytes=block_bytes
        )
    lse = lse.float()
    q_block, k_block = _tile_sides(b, h, t, block_bytes, q_block)
    compiled = _kernel() if kernel and kernel_applies(dev, allowed, softcap) else None
    if compiled is not None:  # the loop subtracts lse itself
        q_f, k_f = query.float() * scaling, key.float()
        _kernel_pass(compiled, q_f, k_f, lse, masks, acc, q_block, k_block, tile, stats_levels)
        return acc.result()
    if softcap:  # the cap applies to the logits before lse: no extra column
        q_f, k_f = query.float() * scaling, key.float()
    else:
        q_f = torch.cat([query.float() * scaling, -lse[..., None]], dim=-1)
        k_f = torch.cat([key.float(), key.new_ones((*key.shape[:-1], 1), dtype=torch.float32)], -1)
    kpos = torch.arange(t, device=dev)
    weights = torch.stack([torch.ones(t, device=dev), kpos.float()], dim=-1)  # [T, 2]: Σp, Σp·k
    lengths = (masks.n_queries + 1).tolist()  # a document's length (|Q1| = n − 1)
    short = [(i, int(n)) for i, n in enumerate(lengths) if n < t] if tile else []
    buffers: dict[str, torch.Tensor] = {}
    for q0 in range(0, t, q_block):
        q1 = min(q0 + q_block, t)
        c = q1 - q0
        qpos = torch.arange(q0, q1, device=dev)
        state = torch.zeros((3, b, h, c), device=dev)  # l, a = Σp·z, Σp·k
        zmax = torch.full((b, h, c), -math.inf, device=dev)
        fixed = {"prev": (qpos - 1).clamp_min(0), "self": qpos, "sink": torch.zeros_like(qpos)}
        picked = {name: torch.zeros((b, h, c), device=dev) for name in fixed}
        pairs = _block_pairs(masks, q0, q1)
        sets = torch.zeros((2, b, c, h), device=dev)  # Σp over the duplicate and induction keys
        starts = list(reversed(range(0, q1, k_block)))
        cuts = _pair_cuts(pairs, q1, starts)
        for j, k0 in enumerate(starts):
            k1 = min(k0 + k_block, q1)
            qt, kt = q_f[:, :, q0:q1], k_f[:, :, k0:k1].mT
            z = _tile_buffer(buffers, "z", (b, h, c, k1 - k0), dev)
            torch.matmul(qt, kt, out=z)  # s − lse, [doc, head, C, kw]
            if softcap:
                z = softcap * torch.tanh(z / softcap) - lse[:, :, q0:q1, None]
            hidden = kpos[None, k0:k1] > qpos[:, None] if k1 - 1 > q0 else None
            if hidden is not None:  # the tile reaches above the diagonal
                z.masked_fill_(hidden, -math.inf)
            if allowed is not None:
                z.masked_fill_(~allowed[..., q0:q1, k0:k1], -math.inf)
            zmax = torch.maximum(zmax, z.amax(-1))
            p = torch.exp(z.clamp_min_(EXP_FLOOR), out=_tile_buffer(buffers, "p", z.shape, dev))
            if hidden is not None:
                p.masked_fill_(hidden, 0.0)
            if allowed is not None:
                p.masked_fill_(~allowed[..., q0:q1, k0:k1], 0.0)
            _pick(picked, fixed, p, q0, k0)
            kw = k1 - k0
            sums = p @ weights[k0:k1]  # [doc, head, C, 2]
            state[0] += sums[..., 0]
            state[2] += sums[..., 1]
            state[1] += (p.reshape(-1, 1, kw) @ z.reshape(-1, kw, 1)).view(b, h, c)
            _add_pairs(sets, pairs, cuts, j, p, k0)
            if tile is not None:
                for i, n in short:  # rows past a document's length carry no weight
                    if n < q1:
                        p[i, :, max(n - q0, 0) :] = 0.0
                tile(q0, k0, p) if stats_levels is None else tile(q0, k0, p, None)
            del z, p
        _add_block(acc, masks, q0, picked, torch.cat([state, sets.transpose(2, 3)]), zmax)
    return acc.result()


def _block_pairs(
    masks: BatchMasks, q0: int, q1: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The duplicate and induction (doc, row in the block, key) pairs of rows ``q0 … q1 - 1``,
    sorted by key (each tile takes its keys' run by binary search); computed once per batch
    while the batch's cached pairs stay under :data:`PAIR_CACHE` (every layer asks again)."""
    import torch

    cached = masks.pair_cache.get((q0, q1))
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    pairs = {}
    for kind in ("dup", "ind"):
        found = list(key_pairs(masks, kind, q0, q1, max_pairs=1 << 62))
        if found:
            doc, q, k = found[0]
            order = torch.argsort(k, stable=True)
            pairs[kind] = (doc[order], q[order] - q0, k[order])
    held = sum(len(v[0]) for entry in masks.pair_cache.values() for v in entry.values())
    if held + sum(len(v[0]) for v in pairs.values()) <= PAIR_CACHE:
        masks.pair_cache[(q0, q1)] = pairs
    return pairs


def _pair_cuts(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], q1: int, starts: list[int]
) -> dict[str, list[int]]:
    """Where each tile's keys begin in the key-sorted pairs of a block (rows ending at ``q1``,
    tiles starting at ``starts``, from the diagonal down): tile ``j`` holds pairs
    ``cuts[j + 1] … cuts[j]``."""
    import torch

    return {
        kind: torch.searchsorted(at[2], torch.tensor([q1, *starts], device=at[2].device)).tolist()
        for kind, at in pairs.items()
    }


def _add_pairs(
    sets: torch.Tensor,
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    cuts: dict[str, list[int]],
    j: int,
    p: torch.Tensor,
    k0: int,
    kernel: Any = None,
) -> None:
    """Add to ``sets`` ``[2, doc, C, head]`` the weights of tile ``j`` (``p``, keys ``k0 …``) at
    the duplicate and induction pairs whose key lies in it (through the compiled loop's
    ``pairs`` when ``kernel`` is given)."""
    for slot, kind in enumerate(("dup", "ind")):
        lo, hi = (cuts[kind][j + 1], cuts[kind][j]) if kind in pairs else (0, 0)
        if hi <= lo:
            continue
        if kernel is not None:
            kernel.pairs(p, k0, pairs[kind], lo, hi, sets[slot])
        else:
            doc, row, key_at = (x[lo:hi] for x in pairs[kind])
            sets[slot].index_put_((doc, row), p[doc, :, row, key_at - k0], accumulate=True)


def _pick(
    picked: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], p: torch.Tensor,
    q0: int, k0: int,
) -> None:  # fmt: skip
    """Add the weights at keys q − 1, q and 0 (``fixed``) that lie in tile ``p``."""
    import torch

    b, h, c, kw = p.shape
    k1, q1 = k0 + kw, q0 + c
    for name, at in fixed.items():
        # key 0 lies in the last tile, keys q − 1 and q in the diagonal one(s)
        if (k0 > 0) if name == "sink" else (k1 < q0 - 1 or k0 > q1 - 1):
            continue
        inside = (at >= k0) & (at < k1)
        if bool(inside.any()):
            idx = (at.clamp(k0, k1 - 1) - k0).expand(b, h, c)[..., None]
            got = torch.where(inside, p.gather(-1, idx)[..., 0], 0.0)
            picked[name] += got.to(picked[name].dtype)


def _add_block(
    acc: LayerScores, masks: BatchMasks, q0: int, picked: dict[str, torch.Tensor],
    state: torch.Tensor, zmax: torch.Tensor,
) -> None:  # fmt: skip
    """A finished block of rows: ``state`` holds Σp, Σp·z, Σp·k and the duplicate and induction
    sums (``[5, doc, head, C]``), ``zmax`` each row's largest logit minus its lse."""
    import torch

    c = state.shape[-1]
    qpos = torch.arange(q0, q0 + c, device=state.device)
    l = state[0].clamp_min(torch.finfo(torch.float32).tiny)
    acc.add_rows(
        q0,
        {
            "prev_token": picked["prev"] / l,
            "sink": picked["sink"] / l,
            "self": picked["self"] / l,
            "duplicate": state[3] / l,
            "induction": state[4] / l,
            "entropy": (torch.log(l) - state[1] / l) / masks.log_norm[q0 : q0 + c],
            "max_weight": torch.exp(zmax.clamp_min(EXP_FLOOR)) / l,
            "mean_distance": qpos.to(state.dtype) - state[2] / l,
        },
    )


@dataclass(frozen=True)
class TileStats:
    """What the compiled pass measured besides a tile's weights, for the sparsity table
    (``schemas/sparsity.md``), handed with the tile that completes it: a block of rows (its
    last tile, ``k0 = 0``) or the layer (the last block's last tile). Rows outside a document's
    queries (``q = 0``, ``q ≥ n``) contribute nothing."""

    #: at the block's last tile (k0 = 0): ``[doc, head, R]`` float64 sums over the block's tiles
    #: of p over q − k < 64, q − k < 256, k < 4 and k < min(128, max(q − 255, 0)); else None
    local: torch.Tensor | None
    recent: torch.Tensor | None
    sink4: torch.Tensor | None
    early: torch.Tensor | None
    #: at the block's last tile (k0 = 0), per span level: ``[doc, head, R]`` int64, the smallest
    #: D with Σ_{q-D ≤ k ≤ q} p ≥ level, from the row's float64 sum (−1: not a query); else None
    span: dict[float, torch.Tensor] | None
    #: at the layer's last tile: ``[doc, head, T]`` float64, the layer's column masses Σ_q p and
    #: diagonal masses Σ p over q − k = d (index d); else None
    columns: torch.Tensor | None = None
    diagonals: torch.Tensor | None = None


def _kernel() -> Any:
    from attnstore.kernels import census_kernel

    return census_kernel()


def kernel_applies(device: torch.device, allowed: Any, softcap: float | None) -> bool:
    """Whether :func:`online_layer_scores` runs the compiled pass (:mod:`attnstore.kernels`) for
    a layer on ``device`` with this mask and soft cap: a CPU, plain causal attention (``allowed``
    None), no soft cap, and a loop built in this process."""
    return device.type == "cpu" and allowed is None and not softcap and _kernel() is not None


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged); switched only
    where they differ, since every switch costs an OpenMP worker's spin."""
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kernel_pass(
    kernel: Any,
    q_f: torch.Tensor,
    k_f: torch.Tensor,
    lse: torch.Tensor,
    masks: BatchMasks,
    acc: LayerScores,
    q_block: int,
    k_block: int,
    tile: Callable[..., None] | None,
    levels: tuple[float, ...] | None,
) -> None:
    """:func:`online_layer_scores` through the compiled loop (``attnstore/kernels/census.c``):
    per tile one ``q·k`` product, then one loop writing the weights and adding every row, column,
    diagonal and window sum and the span search. Runs on one thread (torch's threads would spin
    idle beside the loop, doubling its CPU time for nothing). Float64 row state."""
    import torch

    b, h, t, _ = q_f.shape
    n = b * h
    f64 = torch.float64
    lengths = (masks.n_queries + 1).to(torch.int64).contiguous()
    span_levels = tuple(levels or ())
    buffers: dict[str, torch.Tensor] = {}
    from attnstore.kernels import LayerMasses

    layer = LayerMasses(n, t) if levels is not None and tile is not None else None
    with threads(1):
        for q0 in range(0, t, q_block):
            q1 = min(q0 + q_block, t)
            c = q1 - q0
            rows_lse = lse[:, :, q0:q1].reshape(n, c)
            block = kernel.block(n, c, span_levels, layer, rows_lse)
            pairs = _block_pairs(masks, q0, q1)
            sets = torch.zeros((2, b, c, h))  # Σp over the duplicate and induction keys
            starts = list(reversed(range(0, q1, k_block)))
            cuts = _pair_cuts(pairs, q1, starts)
            for j, k0 in enumerate(starts):
                k1 = min(k0 + k_block, q1)
                z = _tile_buffer(buffers, "z", (b, h, c, k1 - k0), q_f.device)
                torch.matmul(q_f[:, :, q0:q1], k_f[:, :, k0:k1].mT, out=z)  # the logits
                kernel.tile(z.view(n, c, k1 - k0), h, lengths, q0, k0, 1, block)
                p = z  # now the weights
                _add_pairs(sets, pairs, cuts, j, p, k0, kernel)
                if tile is None:
                    continue
                if levels is None:
                    tile(q0, k0, p)
                    continue
                last = k0 == 0
                done = last and q1 == t and layer is not None
                stats = TileStats(
                    local=block["loc"].view(b, h, c) if last else None,
                    recent=block["rec"].view(b, h, c) if last else None,
                    sink4=block["sink4"].view(b, h, c) if last else None,
                    early=block["early"].view(b, h, c) if last else None,
                    span=_spans(block, masks, q0, b, h) if last else None,
                    columns=layer.columns.view(b, h, t) if done and layer else None,
                    diagonals=layer.diagonals.view(b, h, t) if done and layer else None,
                )  # fmt: skip
                tile(q0, k0, p, stats)
            state = torch.stack([block["l"], block["pz"], block["pk"]]).view(3, b, h, c)
            zmax = block.zmax.view(b, h, c).to(f64)
            picked = {name: block[name].view(b, h, c) for name in ("prev", "self", "sink")}
            _add_block(acc, masks, q0, picked, torch.cat([state, sets.transpose(2, 3)]), zmax)


def _spans(block: Any, masks: BatchMasks, q0: int, b: int, h: int) -> dict[float, torch.Tensor]:
    """A finished block's spans per level ``[doc, head, R]`` (−1 off the queries); a query row with
    weight that never reaches a level is not a softmax row: refused."""
    import torch

    c = block.shape[1]
    valid = masks.valid_q[:, q0 : q0 + c].cpu()[:, None, :].expand(b, h, c)
    mass = block["mass"].view(b, h, c)
    out = {}
    for j, level in enumerate(block.levels):
        d = block.span[j].view(b, h, c)
        short = valid & (d < 0) & (mass > 0)
        if bool(short.any()):
            raise ValueError(
                f"a row of the tile path has mass {float(mass[short].max()):.6g}, "
                f"below span level {level}: tiles must hold softmax rows (mass 1)"
            )
        out[level] = torch.where(valid, d.clamp_min(0), -1)
    return out


def _tile_sides(
    b: int, h: int, t: int, block_bytes: int, q_block: int = 256
) -> tuple[int, int]:
    """Rows and keys of a square-ish tile of ≤ ``block_bytes`` float32 logits for ``b`` documents
    and ``h`` heads (thin tiles waste the matmul; wide diagonal ones compute more of the upper
    triangle)."""
    per_head = max(1, block_bytes // (4 * b * h))
    rows = max(1, min(q_block, t, max(16, math.isqrt(per_head))))
    return rows, max(16, per_head // rows)


def _tile_buffer(
    buffers: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """A reused float32 buffer of ``shape``: a fresh multi-megabyte allocation per tile is returned
    to the system when freed and faulted in again page by page, which costs more than the ``exp``
    that fills it."""
    import torch

    n = math.prod(shape)
    buf = buffers.get(name)
    if buf is None or buf.numel() < n:
        buf = buffers[name] = torch.empty(n, dtype=torch.float32, device=device)
    return buf[:n].view(shape)


def row_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor | None,
    *,
    scaling: float,
    softcap: float | None = None,
    block_bytes: int = 1 << 21,
) -> torch.Tensor:
    """The log-sum-exp ``[doc, head, q_pos]`` of each causal row's logits (masked by ``allowed``),
    by the online recurrence over tiles of ≤ ``block_bytes``: one ``q·k`` product and one ``exp``
    per visible element, memory one tile. Rows with no visible key get −inf. What
    :func:`online_layer_scores` computes when the forward's kernel gives no ``lse``."""
    import torch

    b, h, t, _ = query.shape
    dev = query.device
    q_f, k_f = query.float() * scaling, key.float()
    q_block, k_block = _tile_sides(b, h, t, block_bytes)
    kpos = torch.arange(t, device=dev)
    out = torch.empty((b, h, t), device=dev)
    for q0 in range(0, t, q_block):
        q1 = min(q0 + q_block, t)
        m = torch.full((b, h, q1 - q0), -math.inf, device=dev)
        l = torch.zeros_like(m)
        for k0 in range(0, q1, k_block):
            k1 = min(k0 + k_block, q1)
            s = torch.matmul(q_f[:, :, q0:q1], k_f[:, :, k0:k1].mT)
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            if k1 - 1 > q0:
                s.masked_fill_(kpos[None, k0:k1] > kpos[q0:q1, None], -math.inf)
            if allowed is not None:
                s.masked_fill_(~allowed[..., q0:q1, k0:k1], -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            base = torch.where(torch.isfinite(m_new), m_new, 0.0)
            l = l * torch.exp((m - base).clamp_min(EXP_FLOOR)).masked_fill_(m == -math.inf, 0.0)
            l += (
                torch.exp((s - base[..., None]).clamp_min_(EXP_FLOOR))
                .masked_fill_(s == -math.inf, 0.0)
                .sum(-1)
            )
            m = m_new
        out[:, :, q0:q1] = torch.where(
            l > 0, torch.log(l) + torch.where(torch.isfinite(m), m, 0.0), -math.inf
        )
    return out
