"""Pattern scores of bidirectional (encoder) attention, as defined in ``schemas/scores.md``.

An encoder's (BERT family) row ``q`` weighs every real key of the document, before and after ``q``.
The causal scores of :mod:`attnstore.scores` assume ``A[q, k] = 0`` for ``k > q``; this module scores
whole squares instead, with the same query sets and count columns (``n_queries = T − 1``) so that
corpus-level means merge the same way. What changes (schemas/scores.md, "Bidirectional attention"):

- ``next_token`` = mean over q ∈ {0 … T−2} of ``A[q, q+1]`` (as many rows as ``prev_token``);
- ``sep`` = mean over Q1 of the mass on separator tokens (the tokenizer's ``sep_token``, [SEP]);
  NULL when the tokenizer has none or the document holds none;
- ``entropy`` is normalised by ln T (every row sees T keys), ``mean_distance`` is Σ_k A[q,k]·|q−k|;
- ``duplicate`` and ``induction`` keep their definitions (earlier copies only, k < q).

Like :class:`attnstore.scores.LayerScores`, it accumulates one layer over blocks of query rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np

from attnstore import scores

if TYPE_CHECKING:
    import torch

__all__ = ["EXTRA_COLUMNS", "SCORE_COLUMNS", "LayerScores", "score_layer", "separator_ids"]

#: Columns of ``heads`` that only bidirectional attention fills (NULL for causal models).
EXTRA_COLUMNS: Final = ("next_token", "sep")
#: Every score column a bidirectional store fills.
SCORE_COLUMNS: Final = (*scores.SCORE_COLUMNS, *EXTRA_COLUMNS)


def separator_ids(tokenizer: Any) -> tuple[int, ...]:
    """The separator token ids of ``tokenizer`` ([SEP] for BERT, ``</s>`` for RoBERTa)."""
    sep = getattr(tokenizer, "sep_token_id", None)
    return () if sep is None else (int(sep),)


class LayerScores:
    """Accumulates the bidirectional scores of one layer over blocks of query rows.

    ``token_ids`` ``[doc, q_pos]`` (right-padded) locate separators and repeated tokens;
    ``separators`` are the separator token ids (empty: ``sep`` is NULL).
    """

    def __init__(
        self,
        masks: scores.BatchMasks,
        n_heads: int,
        token_ids: torch.Tensor,
        separators: tuple[int, ...] = (),
    ) -> None:
        import torch

        self.masks = masks
        b, t = masks.valid_q.shape
        dev = masks.valid_q.device
        self.n_tokens = masks.n_queries + (masks.n_queries > 0).to(masks.n_queries.dtype)
        pos = torch.arange(t, device=dev)
        self._pos = pos
        in_doc = pos[None, :] < self.n_tokens[:, None]
        in_doc = in_doc | (pos[None, :] == 0)  # a one-token document still has row 0
        self._in_doc = in_doc  # [doc, pos]
        # rows q with q + 1 < T: the query set of next_token (as many rows as Q1)
        self._next_q = (pos[None, :] + 1) < self.n_tokens[:, None]
        is_sep = torch.zeros_like(in_doc)
        for sep in separators:
            is_sep |= token_ids == sep
        self._is_sep = is_sep & in_doc  # [doc, key]
        self._has_sep = bool(separators) and self._is_sep.any(-1)  # [doc] or False
        before = pos[None, :] < pos[:, None]  # [q, k]
        same = token_ids[:, :, None] == token_ids[:, None, :]
        prev_same = torch.zeros_like(same)
        prev_same[:, :, 1:] = same[:, :, :-1]
        valid = masks.valid_q[:, :, None]
        self._dup = (same & before[None] & valid).float()  # [doc, q, k]
        self._ind = (prev_same & before[None] & valid & (pos[None, None, :] >= 1)).float()
        # ln T per document (every row sees T keys); 1 where T < 2 (no rows are scored anyway)
        n = self.n_tokens.to(torch.float32)
        self._log_t = torch.where(n >= 2, torch.log(n.clamp_min(2.0)), torch.ones_like(n))
        self._sums = {
            name: torch.zeros((b, n_heads), dtype=torch.float64, device=dev)
            for name in SCORE_COLUMNS
        }

    def _add(self, name: str, rows: torch.Tensor, mask: torch.Tensor) -> None:
        import torch

        self._sums[name] += (rows.to(torch.float64) * mask[:, None, :].to(torch.float64)).sum(-1)

    def add(self, probs: torch.Tensor, q0: int) -> None:
        """Rows ``q0 … q0 + C``: ``probs`` ``[doc, head, C, k_pos]`` float32 (whole rows)."""
        import torch

        m = self.masks
        _, _, c, t_k = probs.shape
        rows = torch.arange(c, device=probs.device)
        q = rows + q0
        valid = m.valid_q[:, q0 : q0 + c]
        self._add("prev_token", probs[:, :, rows, (q - 1).clamp_min(0)], valid)
        self._add(
            "next_token",
            probs[:, :, rows, (q + 1).clamp_max(t_k - 1)],
            self._next_q[:, q0 : q0 + c],
        )
        self._add("self", probs[:, :, rows, q], valid)
        self._add("sink", probs[..., 0], valid)
        sep = torch.einsum("bhqk,bk->bhq", probs, self._is_sep[:, :t_k].to(probs.dtype))
        self._add("sep", sep, valid)
        dup = torch.einsum("bhqk,bqk->bhq", probs, self._dup[:, q0 : q0 + c, :t_k])
        self._add("duplicate", dup, m.dup_rows[:, q0 : q0 + c])
        ind = torch.einsum("bhqk,bqk->bhq", probs, self._ind[:, q0 : q0 + c, :t_k])
        self._add("induction", ind, m.ind_rows[:, q0 : q0 + c])
        plogp = (probs * torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
        self._add("entropy", -plogp / self._log_t[:, None, None], valid)
        self._add("max_weight", probs.amax(-1), valid)
        dist = (q[:, None] - self._pos[None, :t_k]).abs().to(probs.dtype)  # [C, key]
        self._add("mean_distance", (probs * dist).sum(-1), valid)

    def result(self) -> dict[str, np.ndarray]:
        """Score name → float64 ``[doc, head]``; NaN (NULL) where the query set is empty."""
        m = self.masks
        counts = {"duplicate": m.n_duplicate, "induction": m.n_induction}
        out = {}
        for name, total in self._sums.items():
            n = counts.get(name, m.n_queries).to(total.dtype)[:, None]
            out[name] = (total / n).cpu().numpy()
        has_sep = self._has_sep
        if has_sep is False:
            out["sep"][:] = np.nan
        else:
            out["sep"][~has_sep.cpu().numpy()] = np.nan
        return out


def score_layer(
    probs: torch.Tensor,
    masks: scores.BatchMasks,
    token_ids: torch.Tensor,
    separators: tuple[int, ...] = (),
) -> dict[str, np.ndarray]:
    """Every bidirectional score for one whole layer ``[doc, head, q_pos, k_pos]`` of a batch."""
    acc = LayerScores(masks, probs.shape[1], token_ids, separators)
    acc.add(probs, 0)
    return acc.result()
