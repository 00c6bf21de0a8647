"""PyTorch access to a store: one item per selected (doc, layer, head).

Torch is imported by this module only. The dataset holds the store, opened once, and its selection
(plain numpy arrays). A :class:`~attnstore.store.Store` snapshot is plain data, so the dataset
pickles into ``DataLoader`` workers, which read through it without opening the store again.

Examples
--------
>>> from torch.utils.data import DataLoader
>>> ds = AttentionDataset("demo.attn", where="layer >= 12", labels=True, seed=0)  # doctest: +SKIP
>>> loader = DataLoader(ds, batch_size=32, collate_fn=collate, num_workers=2)  # doctest: +SKIP
>>> batch = next(iter(loader))  # doctest: +SKIP
>>> batch["matrix"].shape, batch["mask"].shape, batch["label"].shape  # doctest: +SKIP
(torch.Size([32, 512, 512]), torch.Size([32, 512]), torch.Size([32]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnstore.errors import AttnStoreError
from attnstore.labels import LABELS, label_of
from attnstore.scores import SCORE_COLUMNS
from attnstore.store import Store

if TYPE_CHECKING:
    from attnstore.storage import Location

__all__ = ["AttentionDataset", "collate"]


class AttentionDataset(Dataset[dict[str, Any]]):
    """Selected heads of a store as training items.

    Parameters
    ----------
    store
        The store: a folder, a URL, an opened :class:`~attnstore.storage.Storage`, or an opened
        :class:`~attnstore.store.Store` (opened once, here or by the caller; workers read through
        that one snapshot).
    where
        SQL condition over ``heads`` columns (e.g. ``"induction > 0.4 AND layer < 20"``); all rows if None.
    packed
        Return the packed lower triangle ``[T (T + 1) / 2]`` instead of the square ``[T, T]``.
    raw
        Return the stored codes (e.g. uint16, widened to int32 for torch) instead of float32.
    labels
        Add ``label`` (class index into :data:`attnstore.labels.LABELS`) from per-item scores.
    seed
        Shuffle the selection with this seed (deterministic); keep ``heads`` order if None.
    rows
        ``slice(a, b)`` (relative to each document, e.g. ``slice(-64, None)``): only those query
        rows, ``matrix`` ``[rows, T]`` read with :meth:`Store.matrix`'s partial read (only the
        chunks holding them); needed for a store extracted with ``--rows``.
    storage_options
        For a store at ``s3://…`` (or ``gs://``, ``az://``): endpoint, credentials, region, on top
        of the ``AWS_*`` variables. Object-storage clients do not survive a fork: give the
        ``DataLoader`` ``multiprocessing_context="spawn"`` when it has workers.

    Each item is a dict: ``matrix``, ``token_ids`` ``[T]``, ``scores`` ``[8]`` (NaN for NULL, in
    :data:`attnstore.scores.SCORE_COLUMNS` order), ``doc_id``, ``layer``, ``head``, ``n_tokens`` and
    optionally ``label``.
    """

    def __init__(
        self,
        store: Location | Store,
        where: str | None = None,
        *,
        packed: bool = False,
        raw: bool = False,
        labels: bool = False,
        seed: int | None = None,
        storage_options: dict[str, str] | None = None,
        rows: slice | None = None,
    ) -> None:
        if rows is not None and (packed or raw):
            raise AttnStoreError("AttentionDataset(rows=...) returns float32 [rows, T] matrices: "
                                 "it cannot be combined with packed or raw.")  # fmt: skip
        self.rows = rows
        # One snapshot for every worker: a Store pickles as plain data and reads without delta-rs,
        # whose runtime does not survive the fork of a DataLoader worker.
        self.store = (
            store if isinstance(store, Store) else Store(store, storage_options=storage_options)
        )
        self.path = str(self.store.path)
        self.packed, self.raw, self.labels = packed, raw, labels
        sql = f"SELECT doc_id, layer, head, n_tokens, {', '.join(SCORE_COLUMNS)} FROM heads"
        if where:
            sql += f" WHERE {where}"
        sql += " ORDER BY doc_id, layer, head"
        table = self.store.sql(sql)
        self._ids = np.stack(
            [table[c].to_numpy() for c in ("doc_id", "layer", "head", "n_tokens")], axis=1
        ).astype(np.int64)
        self._scores = (
            np.stack(
                [table[c].to_numpy(zero_copy_only=False).astype(np.float32) for c in SCORE_COLUMNS],
                axis=1,
            )
            if table.num_rows
            else np.zeros((0, len(SCORE_COLUMNS)), np.float32)
        )
        if seed is not None:
            order = np.random.default_rng(seed).permutation(len(self._ids))
            self._ids, self._scores = self._ids[order], self._scores[order]

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        doc_id, layer, head, n = (int(x) for x in self._ids[i])
        store = self.store
        if self.rows is not None:  # a partial read: only the chunks of these rows
            matrix = store.matrix(doc_id, layer, head, rows=self.rows)
        else:
            values = store.packed(doc_id, layer, head, decode=not self.raw)
            if self.raw and values.dtype == np.uint16:
                values = values.astype(np.int32)  # torch has no general uint16 arithmetic
            matrix = values if self.packed else _unpack(values, n, store.packing)
        tokens = store.token_ids(doc_id)
        item: dict[str, Any] = {
            "matrix": torch.from_numpy(np.ascontiguousarray(matrix)),
            "token_ids": torch.from_numpy(tokens),
            "scores": torch.from_numpy(self._scores[i].copy()),
            "doc_id": doc_id,
            "layer": layer,
            "head": head,
            "n_tokens": n,
        }
        if self.labels:
            row = {c: float(v) for c, v in zip(SCORE_COLUMNS, self._scores[i], strict=True)}
            item["label"] = LABELS.index(label_of(row))
        return item


def _unpack(packed: np.ndarray, n: int, packing: str = "tril-rowmajor") -> np.ndarray:
    from attnstore.packing import unpack

    return unpack(packed, n, packing)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad variable-length items into a batch, with a boolean ``mask`` of real positions.

    Square matrices are padded to ``[B, T_max, T_max]``, packed ones to ``[B, P_max]``; ``mask`` is
    ``[B, T_max]`` (True for real tokens) and ``token_ids`` is padded with 0.
    """
    if not items:
        raise AttnStoreError("collate() got an empty batch.")
    t_max = max(it["n_tokens"] for it in items)
    b = len(items)
    first = items[0]["matrix"]
    if first.dim() == 2:  # [T, T], or [rows, T] (AttentionDataset(rows=...))
        r_max = max(it["matrix"].shape[0] for it in items)
        square = all(it["matrix"].shape[0] == it["n_tokens"] for it in items)
        matrix = torch.zeros((b, t_max if square else r_max, t_max), dtype=first.dtype)
        for i, it in enumerate(items):
            r, n = it["matrix"].shape
            matrix[i, :r, :n] = it["matrix"]
    else:
        p_max = max(it["matrix"].shape[0] for it in items)
        matrix = torch.zeros((b, p_max), dtype=first.dtype)
        for i, it in enumerate(items):
            matrix[i, : it["matrix"].shape[0]] = it["matrix"]
    mask = torch.zeros((b, t_max), dtype=torch.bool)
    token_ids = torch.zeros((b, t_max), dtype=torch.long)
    for i, it in enumerate(items):
        mask[i, : it["n_tokens"]] = True
        token_ids[i, : it["n_tokens"]] = it["token_ids"]
    out: dict[str, Any] = {
        "matrix": matrix,
        "mask": mask,
        "token_ids": token_ids,
        "scores": torch.stack([it["scores"] for it in items]),
    }
    for key in ("doc_id", "layer", "head", "n_tokens", "label"):
        if key in items[0]:
            out[key] = torch.tensor([it[key] for it in items])
    return out
