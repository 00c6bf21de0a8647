"""A store of hand-built heads, one of each labelled kind, written through the real writer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch

from attnstore.codecs import get_codec
from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING, Manifest
from attnstore.packing import pack_tril
from attnstore.scores import SCORE_COLUMNS, batch_masks, score_layer
from attnstore.store import Segment, StoreWriter

PERIOD, REPS = 30, 4
KINDS = ("induction", "previous-token", "duplicate", "self", "sink", "diffuse", "none")


def synthetic_heads(t: int) -> np.ndarray:
    """[kind, q, k] attention, each row a distribution, for tokens list(range(PERIOD)) * REPS."""
    eye = np.eye(t, dtype=np.float64)
    uniform = np.tril(np.ones((t, t)))
    uniform /= uniform.sum(1, keepdims=True)
    out = np.zeros((len(KINDS), t, t))
    for q in range(t):
        out[0, q, q - PERIOD + 1 if q >= PERIOD else 0] = 1  # token after the earlier copy
        out[1, q, max(q - 1, 0)] = 1
        out[2, q, q - PERIOD if q >= PERIOD else max(q - 1, 0)] = 1  # the earlier copy itself
    out[3] = eye
    out[4, :, 0] = 1
    out[5] = uniform
    out[6] = 0.3 * out[1] + 0.3 * out[4] + 0.4 * uniform
    return out


def write_synthetic_store(path: Path, n_docs: int = 2) -> Path:
    t = PERIOD * REPS
    heads = synthetic_heads(t).astype(np.float32)
    ids = list(range(PERIOD)) * REPS
    codec = get_codec("default")
    manifest: Manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "tests",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model": {"id": "synthetic", "revision": None, "architecture": "none", "n_layers": 1,
                  "n_heads": len(KINDS), "n_kv_heads": len(KINDS), "dtype": "float32"},
        "tokenizer": {"id": "synthetic", "vocab_size": PERIOD, "bos_token_id": None, "adds_bos": False},
        "codec": codec.get_config(), "packing": PACKING, "max_length": t, "layers": [0],
        "heads": list(range(len(KINDS))), "settings": {},
    }  # fmt: skip
    writer = StoreWriter(path, manifest)
    probs = torch.from_numpy(np.stack([heads] * n_docs))
    token_ids = torch.tensor([ids] * n_docs)
    masks = batch_masks(token_ids, torch.tensor([t] * n_docs))
    scores = score_layer(probs, masks)
    h = len(KINDS)
    doc_ids = np.arange(n_docs)
    segment = Segment(
        docs={"doc_id": doc_ids.tolist(), "n_tokens": [t] * n_docs, "n_tokens_input": [t] * n_docs,
              "truncated": [False] * n_docs, "skipped": [None] * n_docs, "n_chars": [t] * n_docs,
              "text": ["synthetic"] * n_docs},
        tokens={"doc_id": np.repeat(doc_ids, t), "pos": np.tile(np.arange(t), n_docs),
                "token_id": np.tile(ids, n_docs), "token": [f"t{i}" for i in ids] * n_docs},
        heads={"doc_id": np.repeat(doc_ids, h), "layer": np.zeros(n_docs * h, int),
               "head": np.tile(np.arange(h), n_docs), "kv_head": np.tile(np.arange(h), n_docs),
               "n_tokens": np.full(n_docs * h, t),
               **{c: scores[c].ravel() for c in SCORE_COLUMNS},
               "n_queries": np.repeat(masks.n_queries.numpy(), h),
               "n_duplicate": np.repeat(masks.n_duplicate.numpy(), h),
               "n_induction": np.repeat(masks.n_induction.numpy(), h)},
        codes=[codec.encode(pack_tril(heads))[None] for _ in range(n_docs)],
    )  # fmt: skip
    writer.commit(segment)
    return path
