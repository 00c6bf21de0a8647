"""Captured blocks of rows into what is stored: each document's codes (a packed triangle, an
encoder's whole square, ``--values logits``' row log-sum-exps) and the ``learned_sink`` column."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore import scores
    from attnstore.codecs import Codec

__all__: list[str] = []


class _SinkMass:
    """The ``learned_sink`` column of ``heads``: per (document, layer, head), the mean over the
    query rows q ≥ 1 of the mass the model's learned sink logit takes (= 1 − Σ_k A[q, k])."""

    def __init__(self, masks: scores.BatchMasks, n_layers: int, n_heads: int) -> None:
        b = masks.valid_q.shape[0]
        self.masks = masks
        self.sums = torch.zeros((b, n_layers, n_heads), dtype=torch.float64)
        self.seen = False

    def add(self, li: int, q0: int, sink: torch.Tensor) -> None:
        c = sink.shape[2]
        valid = self.masks.valid_q[:, None, q0 : q0 + c].to(torch.float64)
        self.sums[:, li] += (sink.double() * valid).sum(-1).cpu()
        self.seen = True

    def result(self) -> np.ndarray:
        n = self.masks.n_queries.cpu().to(torch.float64)[:, None, None]
        return (self.sums / n).numpy()  # 0/0 → NaN, the NULL marker


def _store_full_rows(
    codes: list[np.ndarray],
    codec: Codec,
    li: int,
    q0: int,
    probs: torch.Tensor,
    n_tok: Sequence[int],
) -> None:
    """Encoder layout (``packing: "full-rowmajor"``): rows ``q0 …`` of each document's whole
    ``[n, n]`` square, row after row, into its codes ``[layer, head, n·n]``."""
    c = probs.shape[2]
    for i, n in enumerate(n_tok):
        hi = min(q0 + c, n)
        if hi > q0:
            block = probs[i, :, : hi - q0, :n].reshape(probs.shape[1], (hi - q0) * n)
            codes[i][li, :, q0 * n : hi * n] = codec.encode(block)


def _store_lse(
    codes: list[np.ndarray],
    li: int,
    q0: int,
    lse: torch.Tensor,
    n_tok: Sequence[int],
    packed: Any,
) -> None:
    """``--values logits``: rows ``q0 …``'s log-sum-exp (``[doc, head, C]``) after each document's
    packed logits, so ``exp(logit − lse)`` gives the probabilities back exactly."""
    c = lse.shape[2]
    for i, n in enumerate(n_tok):
        hi = min(q0 + c, n)
        if hi > q0:
            base = packed(n)
            codes[i][li, :, base + q0 : base + hi] = lse[i, :, : hi - q0].float().cpu().numpy()


@functools.lru_cache(maxsize=256)
def _rows_index(rows: tuple[int, ...], q0: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into a ``[C, width]`` block of rows ``q0 …`` for the packed values of its
    query rows ``rows`` (global, increasing): row ``r`` holds keys ``0 … r``."""
    r = np.asarray(rows, dtype=np.int64)
    lengths = r + 1
    local = np.repeat(r - q0, lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    return torch.from_numpy(local * width + cols).to(device)


@functools.lru_cache(maxsize=256)
def _chunk_index(q0: int, hi: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into a ``[C, width]`` block of rows ``q0 …`` for packed rows ``q0 … hi - 1``."""
    rows, cols = np.tril_indices(hi)
    keep = rows >= q0
    return torch.from_numpy((rows[keep] - q0) * width + cols[keep]).to(device)
