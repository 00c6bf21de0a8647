"""Row-major packing of the causal lower triangle.

A causal ``[T, T]`` attention matrix has ``T (T + 1) / 2`` entries that can be non-zero. They are
stored row after row: row ``q`` holds keys ``0 … q`` and starts at offset ``q (q + 1) / 2``. This is
the layout named ``"tril-rowmajor"`` in the manifest (see ``schemas/README.md``). Encoders
(bidirectional attention, format 2.1) store whole squares instead: ``"full-rowmajor"``, row ``q`` at
offset ``q T``; :func:`packed_size`, :func:`pack` and :func:`unpack` take the manifest's packing.

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

__all__ = [
    "FULL",
    "TRIL",
    "pack",
    "pack_tril",
    "packed_length",
    "packed_size",
    "row_index",
    "tril_flat_index",
    "unpack",
    "unpack_logits",
    "unpack_tril",
]

#: Causal lower triangles, row q holding keys 0 … q (every store before 2.1, every decoder).
TRIL = "tril-rowmajor"
#: Whole ``[T, T]`` squares, row after row (bidirectional attention of encoders; since 2.1).
FULL = "full-rowmajor"


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


def packed_size(n_tokens: int, packing: str = TRIL) -> int:
    """Stored values per head of one document of ``n_tokens`` tokens in layout ``packing``."""
    if packing == FULL:
        return n_tokens * n_tokens
    if packing != TRIL:
        raise ValueError(f"Expected packing {TRIL!r} or {FULL!r}. Got {packing!r} instead.")
    return packed_length(n_tokens)


def pack(square: np.ndarray, packing: str = TRIL) -> np.ndarray:
    """``square[..., T, T]`` → ``[..., packed_size(T)]`` in layout ``packing``."""
    if packing == FULL:
        n = square.shape[-1]
        return square.reshape(*square.shape[:-2], n * n)
    packed_size(0, packing)  # checks the name
    return pack_tril(square)


def unpack(packed: np.ndarray, n_tokens: int, packing: str = TRIL) -> np.ndarray:
    """Inverse of :func:`pack`."""
    if packing == FULL:
        if packed.shape[-1] != n_tokens * n_tokens:
            raise ValueError(
                f"Expected {n_tokens * n_tokens} values for T={n_tokens}. "
                f"Got {packed.shape[-1]} instead."
            )
        return packed.reshape(*packed.shape[:-1], n_tokens, n_tokens)
    packed_size(0, packing)
    return unpack_tril(packed, n_tokens)


@functools.lru_cache(maxsize=64)
def row_index(n_tokens: int, packing: str = TRIL) -> np.ndarray:
    """The query row of every packed value (``--values logits`` subtracts each row's LSE)."""
    n = np.arange(n_tokens)
    rows = np.repeat(n, n_tokens) if packing == FULL else np.repeat(n, n + 1)
    rows.setflags(write=False)
    return rows


def unpack_logits(packed: np.ndarray, n_tokens: int, packing: str = TRIL) -> np.ndarray:
    """:func:`unpack` for pre-softmax scores: entries that are not stored are −inf."""
    if packing == FULL:
        return unpack(packed, n_tokens, packing)
    out = np.full((*packed.shape[:-1], n_tokens * n_tokens), -np.inf, dtype=packed.dtype)
    out[..., tril_flat_index(n_tokens)] = packed
    return out.reshape(*packed.shape[:-1], n_tokens, n_tokens)
