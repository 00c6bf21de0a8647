"""Pattern scores per (document, layer, head), as defined in ``shared/spec/scores.md``.

All scores are means over query positions of a per-row quantity, computed here for a whole padded
batch of one layer at once, from the float32 probabilities before any codec touches them.

Axis vocabulary: ``doc head q_pos k_pos``. ``probs`` is ``[doc, head, q_pos, k_pos]``; documents are
right-padded, so row ``q < n_tokens[doc]`` only ever sees real keys (causal masking) and padded rows
are simply left out of every mean.

NULL rule: a score whose query set is empty is NaN in the arrays returned here and NULL in Parquet
(``attnstore.index`` converts). NaN never stands for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["COUNT_COLUMNS", "SCORE_COLUMNS", "BatchMasks", "batch_masks", "score_layer"]

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


@dataclass(frozen=True)
class BatchMasks:
    """Per-batch masks shared by every layer and head (built once per batch)."""

    valid_q: torch.Tensor  # [doc, q_pos] bool: 1 <= q < n_tokens
    dup: torch.Tensor  # [doc, q_pos, k_pos] bool: k < q, x_k == x_q, q valid
    ind: torch.Tensor  # [doc, q_pos, k_pos] bool: 1 <= k < q, x_{k-1} == x_q, q valid
    n_queries: torch.Tensor  # [doc] int64: |Q1|
    n_duplicate: torch.Tensor  # [doc] int64: |Q_dup|
    n_induction: torch.Tensor  # [doc] int64: |Q_ind|
    log_norm: torch.Tensor  # [q_pos] float32: ln(q + 1), 1 at q = 0 (excluded anyway)


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
    return BatchMasks(
        valid_q=valid_q,
        dup=dup,
        ind=ind,
        n_queries=valid_q.sum(-1),
        n_duplicate=dup.any(-1).sum(-1),
        n_induction=ind.any(-1).sum(-1),
        log_norm=log_norm,
    )


def _mean_over(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``rows[doc, head, q]`` over ``mask[doc, q]``; NaN where the mask is empty."""
    import torch

    m = mask[:, None, :].to(torch.float64)
    total = (rows.to(torch.float64) * m).sum(-1)
    count = m.sum(-1)
    return total / count  # 0/0 -> NaN, the NULL marker


def score_layer(probs: torch.Tensor, masks: BatchMasks) -> dict[str, np.ndarray]:
    """Every score of the spec for one layer of a batch.

    Parameters
    ----------
    probs
        ``[doc, head, q_pos, k_pos]`` float32 attention probabilities (causal, right-padded).
    masks
        :func:`batch_masks` of the same batch.

    Returns
    -------
    dict
        Score name → float64 ``[doc, head]`` array, NaN where the score is NULL.
    """
    import torch

    _, _, t, _ = probs.shape
    pos = torch.arange(t, device=probs.device, dtype=torch.float32)
    zero = torch.zeros_like(probs[..., :1, 0])
    prev = torch.cat([zero, probs.diagonal(offset=-1, dim1=-2, dim2=-1)], dim=-1)
    rowsum = probs.sum(-1)
    # Σ_k A[q,k] (q − k) = q Σ_k A[q,k] − Σ_k k A[q,k]
    distance = pos * rowsum - probs @ pos
    entropy = torch.special.entr(probs).sum(-1) / masks.log_norm
    rows = {
        "prev_token": (prev, masks.valid_q),
        "sink": (probs[..., :, 0], masks.valid_q),
        "self": (probs.diagonal(dim1=-2, dim2=-1), masks.valid_q),
        # Σ_k A[q,k]·mask[q,k] as a batched contraction: no [doc, head, q, k] temporary
        "duplicate": (
            torch.einsum("bhqk,bqk->bhq", probs, masks.dup.to(probs.dtype)),
            masks.dup.any(-1),
        ),
        "induction": (
            torch.einsum("bhqk,bqk->bhq", probs, masks.ind.to(probs.dtype)),
            masks.ind.any(-1),
        ),
        "entropy": (entropy, masks.valid_q),
        "max_weight": (probs.amax(-1), masks.valid_q),
        "mean_distance": (distance, masks.valid_q),
    }
    return {name: _mean_over(r, m).cpu().numpy() for name, (r, m) in rows.items()}
