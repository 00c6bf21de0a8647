"""Pattern scores per (document, layer, head), as defined in ``schemas/scores.md``.

Every score is a mean over query positions of a per-row quantity, so it can be accumulated over
*query chunks*: extraction computes one layer's probabilities a block of rows at a time and never
holds a whole ``[T, T]`` square per head (:class:`LayerScores`). The arithmetic runs in torch, on the
device of the attention, in float32, before any codec touches the values; sums are float64.

Axis vocabulary: ``doc head q_pos k_pos``. Documents are right-padded, so row ``q < n_tokens[doc]``
only ever sees real keys (causal masking) and padded rows are left out of every mean.

NULL rule: a score whose query set is empty is NaN in the arrays returned here and NULL in Parquet
(``attnstore.index`` converts). NaN never stands for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "COUNT_COLUMNS",
    "SCORE_COLUMNS",
    "BatchMasks",
    "LayerScores",
    "batch_masks",
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


@dataclass(frozen=True)
class BatchMasks:
    """Per-batch query sets shared by every layer and head (built once per batch).

    The duplicate and induction key sets are sparse (a token repeats a handful of times), so they
    are kept as index pairs, sorted by query position, rather than as ``[doc, q, k]`` masks.
    """

    valid_q: torch.Tensor  # [doc, q_pos] bool: 1 <= q < n_tokens
    dup_rows: torch.Tensor  # [doc, q_pos] bool: q ∈ Q_dup
    ind_rows: torch.Tensor  # [doc, q_pos] bool: q ∈ Q_ind
    dup_pairs: torch.Tensor  # [nnz, 3] int64 (doc, q, k), k < q, x_k == x_q; sorted by q
    ind_pairs: torch.Tensor  # [nnz, 3] int64 (doc, q, k), 1 <= k < q, x_{k-1} == x_q; sorted by q
    n_queries: torch.Tensor  # [doc] int64: |Q1|
    n_duplicate: torch.Tensor  # [doc] int64: |Q_dup|
    n_induction: torch.Tensor  # [doc] int64: |Q_ind|
    log_norm: torch.Tensor  # [q_pos] float32: ln(q + 1), 1 at q = 0 (excluded anyway)


def _sorted_pairs(mask: torch.Tensor) -> torch.Tensor:
    pairs = mask.nonzero()
    return pairs[pairs[:, 1].argsort(stable=True)]


def batch_masks(token_ids: torch.Tensor, n_tokens: torch.Tensor) -> BatchMasks:
    """Build the query sets of the spec for a right-padded batch.

    Parameters
    ----------
    token_ids
        ``[doc, q_pos]`` int64 token ids; values past ``n_tokens`` are ignored.
    n_tokens
        ``[doc]`` int64 true lengths.
    """
    import torch

    _, t = token_ids.shape
    device = token_ids.device
    pos = torch.arange(t, device=device)
    in_doc = pos[None, :] < n_tokens[:, None]  # [doc, pos]
    valid_q = in_doc & (pos[None, :] >= 1)
    before = pos[None, :] < pos[:, None]  # [q, k]: k < q
    same = token_ids[:, :, None] == token_ids[:, None, :]  # [doc, q, k]: x_q == x_k
    dup = same & before[None] & valid_q[:, :, None]
    # x_{k-1} == x_q  <=>  same[q, k-1]; shift along k by one, k = 0 never qualifies.
    prev_same = torch.zeros_like(same)
    prev_same[:, :, 1:] = same[:, :, :-1]
    ind = prev_same & before[None] & valid_q[:, :, None]
    log_norm = torch.log(pos.to(torch.float32) + 1.0)
    log_norm[0] = 1.0
    dup_rows, ind_rows = dup.any(-1), ind.any(-1)
    return BatchMasks(
        valid_q=valid_q,
        dup_rows=dup_rows,
        ind_rows=ind_rows,
        dup_pairs=_sorted_pairs(dup),
        ind_pairs=_sorted_pairs(ind),
        n_queries=valid_q.sum(-1),
        n_duplicate=dup_rows.sum(-1),
        n_induction=ind_rows.sum(-1),
        log_norm=log_norm,
    )


class LayerScores:
    """Accumulates every score of one layer over query chunks of its probabilities.

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

    def _add(self, name: str, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Add Σ over the chunk's rows in ``mask`` of ``rows[doc, head, row]``."""
        import torch

        self._sums[name] += (rows.to(torch.float64) * mask[:, None, :].to(torch.float64)).sum(-1)

    def _sparse_rows(self, probs: torch.Tensor, pairs: torch.Tensor, q0: int) -> torch.Tensor:
        """Σ_k A[q, k] over the (doc, q, k) pairs whose q lies in this chunk → [doc, head, row]."""
        import torch

        b, h, c, _ = probs.shape
        lo = int(torch.searchsorted(pairs[:, 1].contiguous(), q0))
        hi = int(torch.searchsorted(pairs[:, 1].contiguous(), q0 + c))
        sel = pairs[lo:hi]
        out = torch.zeros((b, c, h), dtype=probs.dtype, device=probs.device)
        if len(sel):
            doc, row, key = sel[:, 0], sel[:, 1] - q0, sel[:, 2]
            values = probs[doc, :, row, key]  # [nnz, head]
            out.index_put_((doc, row), values, accumulate=True)
        return out.transpose(1, 2)

    def add(self, probs: torch.Tensor, q0: int) -> None:
        """Rows ``q0 … q0 + C`` of one layer: ``probs`` is ``[doc, head, C, k_pos]`` float32."""
        import torch

        m = self.masks
        c = probs.shape[2]
        valid = m.valid_q[:, q0 : q0 + c]
        rows = torch.arange(c, device=probs.device)
        q = rows + q0
        prev = probs[:, :, rows, (q - 1).clamp_min(0)]  # A[q, q-1]; q = 0 is not a valid row
        self._add("prev_token", prev, valid)
        self._add("sink", probs[..., 0], valid)
        self._add("self", probs[:, :, rows, q], valid)
        self._add(
            "duplicate", self._sparse_rows(probs, m.dup_pairs, q0), m.dup_rows[:, q0 : q0 + c]
        )
        self._add(
            "induction", self._sparse_rows(probs, m.ind_pairs, q0), m.ind_rows[:, q0 : q0 + c]
        )
        # -Σ p ln p; clamping keeps 0·ln 0 = 0 and is ~2× faster than special.entr
        plogp = (probs * torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
        self._add("entropy", -plogp / m.log_norm[q0 : q0 + c], valid)
        self._add("max_weight", probs.amax(-1), valid)
        # Σ_k A[q,k] (q − k) = q Σ_k A[q,k] − Σ_k k A[q,k]
        self._add("mean_distance", q.to(torch.float32) * probs.sum(-1) - probs @ self._pos, valid)

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
    allowed: torch.Tensor,
    masks: BatchMasks,
    token_ids: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    key_block: int = 256,
) -> dict[str, np.ndarray]:
    """Every score without materialising the attention rows: one online-softmax pass over key blocks.

    The reference (exact, any device) for a fused kernel beside the sdpa forward. Per row it keeps
    the running max ``m`` and normaliser ``l = Σ e^(s−m)``, and rescales running sums of
    ``e^(s−m)·s`` (entropy), ``e^(s−m)·(q−k)`` (distance) and ``e^(s−m)`` over the duplicate and
    induction key sets; ``prev_token``/``self``/``sink`` come from the logits at k = q−1, q, 0 and
    ``max_weight`` is ``1 / l``. Peak memory is one ``[doc, head, q_pos, key_block]`` block.

    Parameters
    ----------
    query, key
        ``[doc, head, q_pos, d]`` after rotary embedding, key/value heads already repeated.
    allowed
        Boolean mask broadcastable to ``[doc, head, q_pos, k_pos]`` (causal and padding).
    token_ids
        ``[doc, q_pos]`` int64, for the duplicate and induction sets.
    """
    import torch

    b, h, t, _ = query.shape
    q_f = query.float()
    dev = query.device
    neg = float("-inf")
    m = torch.full((b, h, t), neg, device=dev)
    sums = {k: torch.zeros((b, h, t), device=dev) for k in ("l", "ent", "dist", "dup", "ind")}
    pos = torch.arange(t, device=dev)
    at = {"prev": (pos - 1).clamp_min(0), "self": pos, "sink": torch.zeros_like(pos)}
    picked = {name: torch.full((b, h, t), neg, device=dev) for name in at}
    for k0 in range(0, t, key_block):
        k1 = min(k0 + key_block, t)
        s = torch.matmul(q_f, key[:, :, k0:k1].float().transpose(-1, -2)) * scaling
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        ok = allowed[..., :, k0:k1].expand(b, h, t, k1 - k0)
        s = s.masked_fill(~ok, neg)
        for name, k_of_q in at.items():  # logits at the fixed keys that fall in this block
            inside = (k_of_q >= k0) & (k_of_q < k1)
            if inside.any():
                vals = s.gather(-1, (k_of_q.clamp(k0, k1 - 1) - k0).expand(b, h, t)[..., None])[
                    ..., 0
                ]
                picked[name] = torch.where(inside, vals, picked[name])
        m_new = torch.maximum(m, s.amax(-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        scale = torch.exp(m - safe)  # rescales the running sums to the new max (0 when m = −inf)
        e = torch.exp(s - safe[..., None])
        keys = torch.arange(k0, k1, device=dev)
        same = token_ids[:, :, None] == token_ids[:, None, k0:k1]  # [doc, q, k]: x_q == x_k
        prev_same = token_ids[:, :, None] == token_ids[:, None, max(k0 - 1, 0) : k1 - 1]
        if k0 == 0:  # k = 0 has no previous token
            prev_same = torch.cat([torch.zeros_like(same[..., :1]), prev_same], dim=-1)
        before = keys[None, :] < pos[:, None]
        ind_ok = (prev_same & before & (keys[None, :] >= 1)).to(e.dtype)
        dup_ok = (same & before).to(e.dtype)
        sums["l"] = sums["l"] * scale + e.sum(-1)
        sums["ent"] = sums["ent"] * scale + torch.where(ok, e * s, torch.zeros_like(s)).sum(-1)
        sums["dist"] = sums["dist"] * scale + (e * (pos[:, None] - keys[None, :]).to(e.dtype)).sum(
            -1
        )
        sums["dup"] = sums["dup"] * scale + torch.einsum("bhqk,bqk->bhq", e, dup_ok)
        sums["ind"] = sums["ind"] * scale + torch.einsum("bhqk,bqk->bhq", e, ind_ok)
        m = m_new
    l = sums["l"].clamp_min(torch.finfo(torch.float32).tiny)
    safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)

    def prob(logit: torch.Tensor) -> torch.Tensor:
        return torch.exp(logit - safe_m) / l

    rows = {
        "prev_token": prob(picked["prev"]),
        "sink": prob(picked["sink"]),
        "self": prob(picked["self"]),
        "duplicate": sums["dup"] / l,
        "induction": sums["ind"] / l,
        "entropy": (safe_m + torch.log(l) - sums["ent"] / l) / masks.log_norm,
        "max_weight": 1.0 / l,
        "mean_distance": sums["dist"] / l,
    }
    acc = LayerScores(masks, h)
    row_masks = {"duplicate": masks.dup_rows, "induction": masks.ind_rows}
    for name, values in rows.items():
        acc._add(name, values, row_masks.get(name, masks.valid_q))
    return acc.result()
