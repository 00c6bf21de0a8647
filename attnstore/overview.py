"""Overviews (``--overview N``): a pooled N × N picture of every head, computed as rows stream by.

For a document of ``T`` tokens the cells are blocks of ``b = ⌈T / N⌉`` query rows and keys, and
there are ``M = ⌈T / b⌉ ≤ N`` of them a side (``M = T`` and ``b = 1`` when ``T ≤ N``). Two kinds:

``max``
    the block's largest probability (keeps one-cell structures such as a previous-token diagonal
    or a sink column visible at any size);
``mean``
    the block's summed attention mass divided by its number of query rows, so each overview row
    sums to 1 (it is the mean attention row of those queries, pooled over keys).

Overviews are computed from the float32 probabilities before they are encoded (so their error is
float32 rounding, not the codec's) and stored as float32 (``schemas/README.md``). The pooling is a
block consumer like the issue-19 analyses: :meth:`OverviewPool.add` receives one block of query
rows of one layer, :meth:`OverviewPool.finish` ends the layer. It keeps ``2 · heads · M²`` floats.

>>> import numpy as np
>>> a = np.tril(np.ones((5, 5), dtype=np.float32)); a /= a.sum(1, keepdims=True)
>>> mx, mean = pool_matrix(a, 2)
>>> grid(5, 2), mean.sum(1).round(6).tolist()
((3, 2), [1.0, 1.0])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["KINDS", "OverviewPool", "grid", "pool_matrix", "pool_packed"]

#: Overview kinds, in the order of the stored array's third axis.
KINDS: Final = ("max", "mean")


def grid(n_tokens: int, size: int) -> tuple[int, int]:
    """``(b, M)``: rows/keys per cell and cells a side for a ``T = n_tokens`` document."""
    if size < 1:
        raise ValueError(f"An overview needs N ≥ 1. Got {size}.")
    b = max(1, -(-n_tokens // size))
    return b, -(-n_tokens // b)


def pool_matrix(matrix: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference pooling of full ``[..., T, T]`` matrices: ``(max, mean)``, each ``[..., M, M]``."""
    t = matrix.shape[-1]
    b, m = grid(t, size)
    padded = np.zeros((*matrix.shape[:-2], m * b, m * b), dtype=np.float64)
    padded[..., :t, :t] = matrix
    blocks = padded.reshape(*matrix.shape[:-2], m, b, m, b)
    counts = np.full(m, b, dtype=np.float64)
    counts[-1] = t - (m - 1) * b
    mx = blocks.max(axis=(-3, -1)).astype(np.float32)
    mean = (blocks.sum(axis=(-3, -1)) / counts[:, None]).astype(np.float32)
    return mx, mean


def pool_packed(
    packed: np.ndarray,
    rows: np.ndarray,
    starts: np.ndarray,
    widths: np.ndarray,
    size: int,
    n_tokens: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pool_matrix` of stored rows without unpacking them (``attnstore verify``).

    ``packed [..., S]`` holds query row ``rows[k]`` at ``starts[k] … starts[k] + widths[k]`` (its
    keys ``0 … widths[k] − 1``), the rows one after the other (any packing of
    :mod:`attnstore.packing`, with or without ``--rows``). Returns ``(max, mean, complete)``:
    the pooled ``[..., M, M]`` pictures and, per row of cells, whether every query row of the
    block is among ``rows`` (only those rows of cells equal the overview of the whole matrix).

    >>> a = np.tril(np.ones((5, 5))); a /= a.sum(1, keepdims=True)
    >>> n = np.arange(5); starts = np.concatenate([[0], np.cumsum(n + 1)])
    >>> mx, mean, complete = pool_packed(a[np.tril_indices(5)], n, starts[:-1], n + 1, 2, 5)
    >>> bool(np.allclose(mean, pool_matrix(a, 2)[1])), complete.tolist()
    (True, [True, True])
    """
    b, m = grid(n_tokens, size)
    lead = packed.shape[:-1]
    per_row = -(-widths // b)  # key blocks each stored row spans: one contiguous run each
    row_of_run = np.repeat(np.arange(len(rows)), per_row)
    key_block = np.arange(int(per_row.sum())) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    cell = (rows[row_of_run] // b) * m + key_block
    mx = np.zeros((m * m, *lead), dtype=np.float64)
    total = np.zeros_like(mx)
    if len(cell):  # the runs tile the stored rows: reduceat pools each, .at adds them to cells
        run_start = starts[row_of_run] + key_block * b
        values = packed[..., : int(starts[-1] + widths[-1])]  # a view: no float64 copy
        run_max = np.maximum.reduceat(values, run_start, -1).astype(np.float64)
        np.maximum.at(mx, cell, np.moveaxis(run_max, -1, 0))
        run_sum = np.add.reduceat(values, run_start, -1, dtype=np.float64)
        np.add.at(total, cell, np.moveaxis(run_sum, -1, 0))
    counts = np.full(m, b, dtype=np.float64)
    counts[-1] = n_tokens - (m - 1) * b
    complete = np.bincount(rows // b, minlength=m)[:m] == counts
    mean = total.reshape(m, m, *lead) / counts[:, None].reshape(m, 1, *([1] * len(lead)))
    return (
        np.moveaxis(mx.reshape(m, m, *lead), (0, 1), (-2, -1)),
        np.moveaxis(mean, (0, 1), (-2, -1)),
        complete,
    )


class OverviewPool:
    """Pools one document's rows of one layer at a time (torch, on the probabilities' device)."""

    def __init__(self, n_tokens: int, size: int, n_heads: int, device: torch.device) -> None:
        import torch

        self.n = n_tokens
        self.b, self.m = grid(n_tokens, size)
        self.n_heads = n_heads
        self.device = device
        self._max = torch.zeros((n_heads, self.m, self.m), dtype=torch.float32, device=device)
        self._sum = torch.zeros_like(self._max)
        counts = torch.full((self.m,), float(self.b), dtype=torch.float32, device=device)
        counts[-1] = float(n_tokens - (self.m - 1) * self.b)
        self._counts = counts

    def add(self, q0: int, probs: torch.Tensor) -> None:
        """Rows ``q0 … q0 + C`` of this document: ``probs [head, C, ≥T]`` (real rows only)."""
        import torch

        n, b, m = self.n, self.b, self.m
        c = probs.shape[1]
        if c == 0:
            return
        keys = probs[:, :, :n].float()
        if m * b != n:
            keys = torch.nn.functional.pad(keys, (0, m * b - n))
        keys = keys.reshape(self.n_heads, c, m, b)
        kmax, ksum = keys.amax(-1), keys.sum(-1)  # [head, C, M]
        block = torch.div(torch.arange(q0, q0 + c, device=probs.device), b, rounding_mode="floor")
        index = block[None, :, None].expand(self.n_heads, c, m)
        self._max.scatter_reduce_(1, index, kmax, reduce="amax", include_self=True)
        self._sum.index_add_(1, block, ksum)

    def finish(self) -> np.ndarray:
        """The layer's overviews ``[head, 2 (max, mean), M, M]`` float32; resets for the next."""
        import torch

        mean = self._sum / self._counts[None, :, None]
        out = torch.stack([self._max, mean], dim=1).cpu().numpy()
        self._max.zero_()
        self._sum.zero_()
        return out
