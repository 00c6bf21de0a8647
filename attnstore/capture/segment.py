"""A captured batch as rows: the :class:`~attnstore.store.Segment` a writer commits (``docs``,
``tokens`` and ``heads`` rows plus codes) and the :class:`~attnstore.abc.analysis.Batch` analyses see."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnstore.abc.analysis import Batch
from attnstore.capture.tokens import readable_tokens
from attnstore.store.batch import Segment

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from attnstore.capture.model import LoadedModel
    from attnstore.capture.tokens import Tokenized
    from attnstore.codecs import Codec
    from attnstore.corpus import Document

__all__ = ["analysis_batch", "batch_segment"]


def batch_segment(
    loaded: LoadedModel,
    layers: Sequence[int],
    heads: Sequence[int],
    batch: Sequence[Tokenized],
    skipped: Sequence[tuple[Document, str]],
    codes: list[np.ndarray],
    score_arrays: dict[str, np.ndarray],
    counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    token_strings: Callable[[list[int]], list[str]],
) -> Segment:
    """One batch's :class:`~attnstore.store.Segment`: its ``docs``, ``tokens`` and ``heads``
    rows (``skipped`` documents among the docs rows) and the documents' ``codes``."""
    columns = (
        "doc_id",
        "n_tokens",
        "n_tokens_input",
        "truncated",
        "skipped",
        "n_chars",
        "text",
    )
    rows: list[tuple[Any, ...]] = [
        (t.doc.doc_id, len(t.ids), t.n_input, t.truncated, None, len(t.doc.text), t.doc.text)
        for t in batch
    ]
    rows += [(d.doc_id, 0, 0, False, why, len(d.text), d.text) for d, why in skipped]
    docs = {name: [r[i] for r in rows] for i, name in enumerate(columns)}
    tokens: dict[str, Any] = {
        "doc_id": [], "pos": [], "token_id": [], "token": [], "text": [], "char_start": [],
        "char_end": [],
    }  # fmt: skip
    for t in batch:
        tokens["doc_id"].append(np.full(len(t.ids), t.doc.doc_id, dtype=np.int64))
        tokens["pos"].append(np.arange(len(t.ids), dtype=np.int32))
        tokens["token_id"].append(np.asarray(t.ids, dtype=np.int32))
        raw = token_strings(t.ids)
        tokens["token"].extend(raw)
        spans = t.spans or [None] * len(t.ids)
        pieces = loaded.tokenizer.convert_ids_to_tokens(t.ids)
        tokens["text"].extend(readable_tokens(t.doc.text, spans, raw, pieces))
        tokens["char_start"].extend(None if s is None else s[0] for s in spans)
        tokens["char_end"].extend(None if s is None else s[1] for s in spans)
    for k in ("doc_id", "pos", "token_id"):
        tokens[k] = np.concatenate(tokens[k]) if tokens[k] else np.zeros(0)
    n_b, n_l, n_h = len(batch), len(layers), len(heads)
    kv_group = loaded.info["n_heads"] // loaded.info["n_kv_heads"]
    shape = (n_b, n_l, n_h)
    doc_ids = np.array([t.doc.doc_id for t in batch], dtype=np.int64)
    head_rows: dict[str, Any] = {
        "doc_id": np.broadcast_to(doc_ids[:, None, None], shape).ravel(),
        "layer": np.broadcast_to(np.array(layers)[None, :, None], shape).ravel(),
        "head": np.broadcast_to(np.array(heads)[None, None, :], shape).ravel(),
        "kv_head": np.broadcast_to(np.array(heads)[None, None, :] // kv_group, shape).ravel(),
        "n_tokens": np.broadcast_to(
            np.array([len(t.ids) for t in batch])[:, None, None], shape
        ).ravel(),
    }
    head_rows.update({k: v.ravel() for k, v in score_arrays.items()})
    names = ("n_queries", "n_duplicate", "n_induction")
    for name, values in zip(names, counts or (np.zeros(0),) * 3, strict=True):
        head_rows[name] = np.broadcast_to(np.asarray(values)[:, None, None], shape).ravel()
    return Segment(docs=docs, tokens=tokens, heads=head_rows, codes=codes)


def analysis_batch(
    loaded: LoadedModel,
    codec: Codec,
    layers: Sequence[int],
    heads: Sequence[int],
    batch: Sequence[Tokenized],
    skipped: Sequence[tuple[Document, str]],
    t_max: int,
) -> Batch:
    """What an analysis sees of one batch (:class:`attnstore.abc.analysis.Batch`)."""
    dev = loaded.device
    ids = torch.zeros((len(batch), t_max), dtype=torch.long)
    for i, t in enumerate(batch):
        ids[i, : len(t.ids)] = torch.tensor(t.ids)
    info = loaded.info
    return Batch(
        doc_ids=[t.doc.doc_id for t in batch],
        token_ids=ids.to(dev),
        lengths=torch.tensor([len(t.ids) for t in batch], dtype=torch.long, device=dev),
        n_layers=info["n_layers"],
        n_heads=info["n_heads"],
        device=dev,
        texts=[t.doc.text for t in batch],
        layers=tuple(layers),
        heads=tuple(heads),
        documents=tuple(batch),
        info={
            "model": info["id"],
            "codec": codec.get_config(),
            "bidirectional": loaded.bidirectional,
        },
        skipped=tuple(skipped),
    )
