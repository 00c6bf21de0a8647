"""A small store for the viewer tests, written through the real writer.

2 layers × 4 heads; eight 64-token documents and one 4,096-token document. Planted heads:
layer 0 head 1 is a previous-token head (row q puts 0.6 or more on key q − 1, and most of its mass
there), layer 1 head 2 is a sink head (0.6 or more on key 0). Syntax tables (as a parser would
add) make layer 1 head 3 a syntactic head for 'det' (80 instances, accuracy 0.9, baseline 0.4). The other heads are random causal
softmaxes (seeded), so scores, ranks and deciles differ between documents.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Final

import numpy as np
import torch

from attnstore.codecs import get_codec
from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING, Manifest
from attnstore.overview import pool_matrix
from attnstore.packing import pack_tril
from attnstore.scores import COUNT_COLUMNS, SCORE_COLUMNS, LayerScores, batch_masks
from attnstore.store import Segment, StoreWriter

LAYERS, HEADS = 2, 4
PREV: Final = (0, 1)  # (layer, head) of the planted previous-token head
SINK: Final = (1, 2)  # (layer, head) of the planted sink head
SYNTAX: Final = (1, 3)  # (layer, head) that finds 'det' dependents' heads (syntax tables only)
SHORT, N_SHORT, LONG = 64, 8, 4096
#: ``--overview`` of the viewer store: the 4,096-token document pools blocks of 16 (format 2.1)
OVERVIEW: Final = 256
VOCAB = 50


def _random_causal(rng: np.random.Generator, h: int, t: int) -> np.ndarray:
    logits = rng.standard_normal((h, t, t)).astype(np.float32) * 1.5
    logits = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _uniform_causal(t: int) -> np.ndarray:
    return (
        np.tril(np.ones((t, t), dtype=np.float32)) / np.arange(1, t + 1, dtype=np.float32)[:, None]
    )


def _plant(m: np.ndarray, layer: int, head: int, t: int, weight: float) -> None:
    """Mix a one-hot pattern into ``m[head]`` (rows stay distributions)."""
    onehot = np.zeros((t, t), dtype=np.float32)
    if (layer, head) == PREV:
        onehot[np.arange(1, t), np.arange(t - 1)] = 1
        onehot[0, 0] = 1
    else:
        onehot[:, 0] = 1
    m[head] = weight * onehot + (1 - weight) * m[head]


def _doc_attention(rng: np.random.Generator, t: int, doc: int) -> np.ndarray:
    """[layer, head, q, k] float32 attention of one document."""
    out = np.empty((LAYERS, HEADS, t, t), dtype=np.float32)
    for layer in range(LAYERS):
        m = _random_causal(rng, HEADS, t) if t <= 256 else np.stack([_uniform_causal(t)] * HEADS)
        for lh in (PREV, SINK):
            if lh[0] == layer:
                # per-document strength, so the planted heads' documents fill every decile
                _plant(m, layer, lh[1], t, 0.6 + 0.3 * ((doc * 7) % 10) / 10)
        out[layer] = m
    return out


def _syntax_tables(doc_ids: list[int]) -> dict[str, dict[str, list[object]]]:
    """Counts as a parser run would give them: 10 'det' instances per document, found by
    SYNTAX 9 times out of 10 and by every other head twice; the best fixed offset finds 4."""
    syntax: dict[str, list[object]] = {
        k: [] for k in ("doc_id", "layer", "head", "relation", "direction", "n", "correct")
    }
    for d in doc_ids:
        for layer in range(LAYERS):
            for head in range(HEADS):
                for k, v in zip(syntax, (d, layer, head, "det", "dep->head", 10,
                                         9 if (layer, head) == SYNTAX else 2), strict=True):
                    syntax[k].append(v)
    n = len(doc_ids)
    baseline: dict[str, list[object]] = {"doc_id": list(doc_ids), "relation": ["det"] * n,
                                         "direction": ["dep->head"] * n, "n": [10] * n,
                                         **{f"correct_{i}": [4 if i == 1 else 1] * n for i in range(1, 7)}}
    return {"syntax": syntax, "syntax_baseline": baseline}  # fmt: skip


def write_viewer_store(
    path: Path, *, long_doc: bool = True, seed: int = 13, shift: int = 0
) -> Path:
    """``seed`` draws other texts and attention; ``shift`` stores the text of short document i as
    doc_id ``(i + shift) % N_SHORT`` (the same documents in another order, as two stores of one
    corpus extracted in different orders or shards)."""
    rng = np.random.default_rng(seed)
    codec = get_codec("default")
    manifest: Manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "tests",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model": {"id": "viewer-test", "revision": None, "architecture": "none", "n_layers": LAYERS,
                  "n_heads": HEADS, "n_kv_heads": HEADS, "dtype": "float32"},
        "tokenizer": {"id": "viewer-test", "vocab_size": VOCAB, "bos_token_id": None,
                      "adds_bos": False},
        "codec": codec.get_config(), "packing": PACKING, "max_length": LONG,
        "layers": list(range(LAYERS)), "heads": list(range(HEADS)), "settings": {},
        "overview": OVERVIEW,
    }  # fmt: skip
    writer = StoreWriter(path, manifest)
    batches = [[(i + shift) % N_SHORT for i in range(N_SHORT)]] + ([[N_SHORT]] if long_doc else [])
    for doc_ids in batches:
        t = LONG if doc_ids == [N_SHORT] else SHORT
        ids = rng.integers(0, VOCAB, size=(len(doc_ids), t))
        ids[:, t // 2 :] = ids[:, : t - t // 2]  # a repeated half: duplicate/induction query sets
        masks = batch_masks(torch.from_numpy(ids), torch.full((len(doc_ids),), t))
        codes, per_layer = [], []
        attn = [_doc_attention(rng, t, d) for d in doc_ids]
        for layer in range(LAYERS):
            acc = LayerScores(masks, HEADS)
            for q0 in range(0, t, 512):  # query blocks, as extraction does
                block = np.stack([a[layer, :, q0 : q0 + 512] for a in attn])
                acc.add(torch.from_numpy(block), q0)
            per_layer.append(acc.result())  # each score: [doc, head]
        codes = [codec.encode(pack_tril(a)) for a in attn]
        overviews = [np.stack(pool_matrix(a, OVERVIEW), axis=2) for a in attn]  # [L, H, 2, M, M]
        n = len(doc_ids)
        docs = np.repeat(np.array(doc_ids), LAYERS * HEADS)
        counts = {c: np.repeat(getattr(masks, c).numpy(), LAYERS * HEADS) for c in COUNT_COLUMNS}
        segment = Segment(
            docs={"doc_id": doc_ids, "n_tokens": [t] * n, "n_tokens_input": [t] * n,
                  "truncated": [False] * n, "skipped": [None] * n, "n_chars": [4 * t] * n,
                  "text": [" ".join(f"w{i}" for i in row[:40]) for row in ids]},
            tokens={"doc_id": np.repeat(doc_ids, t), "pos": np.tile(np.arange(t), n),
                    "token_id": ids.ravel(), "token": [f"w{i}" for i in ids.ravel()]},
            heads={"doc_id": docs, "layer": np.tile(np.repeat(np.arange(LAYERS), HEADS), n),
                   "head": np.tile(np.arange(HEADS), n * LAYERS),
                   "kv_head": np.tile(np.arange(HEADS), n * LAYERS),
                   "n_tokens": np.full(n * LAYERS * HEADS, t),
                   # [layer][doc, head] -> rows ordered doc, layer, head
                   **{c: np.stack([s[c] for s in per_layer], 1).ravel() for c in SCORE_COLUMNS},
                   **counts},
            codes=codes,
            overviews=overviews,
            extra={} if t == LONG else _syntax_tables(doc_ids),
        )  # fmt: skip
        writer.commit(segment)
        del attn, codes, overviews
    return path
