"""Row-major packing of the causal lower triangle.

A causal ``[T, T]`` attention matrix has ``T (T + 1) / 2`` entries that can be non-zero. They are
stored row after row: row ``q`` holds keys ``0 … q`` and starts at offset ``q (q + 1) / 2``. This is
the layout named ``"tril-rowmajor"`` in the manifest (see ``schemas/README.md``).

>>> import numpy as np
>>> a = np.tril(np.arange(1, 10, dtype=np.float32).reshape(3, 3))
>>> pack_tril(a)
array([1., 4., 5., 7., 8., 9.], dtype=float32)
>>> bool((unpack_tril(pack_tril(a), 3) == a).all())
True
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["pack_tril", "packed_length", "tril_flat_index", "unpack_tril"]


def packed_length(n_tokens: int) -> int:
    """Number of packed values for one ``[n_tokens, n_tokens]`` causal matrix."""
    return n_tokens * (n_tokens + 1) // 2


@functools.lru_cache(maxsize=64)
def tril_flat_index(n_tokens: int) -> np.ndarray:
    """Flat indices (into a row-major ``[n, n]`` square) of the packed lower triangle, in order."""
    rows, cols = np.tril_indices(n_tokens)
    index = rows * n_tokens + cols
    index.setflags(write=False)
    return index


def pack_tril(square: np.ndarray) -> np.ndarray:
    """Pack the lower triangle of ``square[..., T, T]`` into ``[..., T (T + 1) / 2]``."""
    n = square.shape[-1]
    if square.shape[-2] != n:
        raise ValueError(f"Expected square matrices [..., T, T]. Got shape {square.shape} instead.")
    flat = square.reshape(*square.shape[:-2], n * n)
    return flat[..., tril_flat_index(n)]


def unpack_tril(packed: np.ndarray, n_tokens: int) -> np.ndarray:
    """Inverse of :func:`pack_tril`: zeros above the diagonal."""
    expected = packed_length(n_tokens)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"Expected {expected} packed values for T={n_tokens}. Got {packed.shape[-1]} instead."
        )
    out = np.zeros((*packed.shape[:-1], n_tokens * n_tokens), dtype=packed.dtype)
    out[..., tril_flat_index(n_tokens)] = packed
    return out.reshape(*packed.shape[:-1], n_tokens, n_tokens)
