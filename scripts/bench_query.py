"""Query and read-back speed on large stores (synthetic data, real code paths). One run, one machine.

    python scripts/bench_query.py [--rows 10000000] [--docs 1000] [--tokens 512]

1. A scores-only store whose heads table has ``--rows`` rows (SmolLM2's 30 × 9 heads per document),
   written through StoreWriter; times a filter + group-by query through ``Store.sql`` (cold: first
   query of a fresh Store; warm: median of 5).
2. A store of ``--docs`` documents of ``--tokens`` tokens with 2 layers × 2 heads (the per-matrix
   read path does not depend on how many layers and heads a segment holds, only on its chunking;
   1,000 × 270 heads × 131k values would not fit this machine's disk), attention-like values
   (a sink, a local band, a few random keys), default codec; times ``Store.matrix`` for random
   (doc, layer, head), warm (median over 200 reads).

Prints JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import attnstore
from attnstore.codecs import get_codec
from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING, Manifest
from attnstore.packing import pack_tril
from attnstore.scores import SCORE_COLUMNS
from attnstore.store import Segment, StoreWriter


def manifest(layers: int, heads: int, matrices: bool) -> Manifest:
    codec = get_codec("default")
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "bench_query",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model": {"id": "synthetic", "revision": None, "architecture": "none", "n_layers": layers,
                  "n_heads": heads, "n_kv_heads": heads, "dtype": "float32"},
        "tokenizer": {"id": "synthetic", "vocab_size": 1000, "bos_token_id": None, "adds_bos": False},
        "codec": codec.get_config(), "packing": PACKING, "max_length": 512,
        "layers": list(range(layers)), "heads": list(range(heads)), "settings": {}, "matrices": matrices,
    }  # fmt: skip


def docs_columns(ids: np.ndarray, n: int, segment_docs: bool) -> dict[str, list]:
    k = len(ids)
    return {"doc_id": ids.tolist(), "n_tokens": [n] * k, "n_tokens_input": [n] * k,
            "truncated": [False] * k, "skipped": [None] * k, "n_chars": [4 * n] * k,
            "text": ["synthetic"] * k}  # fmt: skip


def heads_store(path: Path, rows: int, rng: np.random.Generator) -> float:
    layers, heads = 30, 9
    n_docs = rows // (layers * heads)
    writer = StoreWriter(path, manifest(layers, heads, matrices=False))
    start = time.perf_counter()
    per_part = 5000  # documents per commit: 1.35M rows per Parquet part
    for first in range(0, n_docs, per_part):
        ids = np.arange(first, min(first + per_part, n_docs))
        m = len(ids) * layers * heads
        cols = {
            "doc_id": np.repeat(ids, layers * heads), "layer": np.tile(np.repeat(np.arange(layers), heads), len(ids)),
            "head": np.tile(np.arange(heads), len(ids) * layers), "kv_head": np.tile(np.arange(heads) // 3, len(ids) * layers),
            "n_tokens": np.full(m, 512), "n_queries": np.full(m, 511), "n_duplicate": rng.integers(0, 300, m),
            "n_induction": rng.integers(0, 300, m),
            **{c: rng.random(m) for c in SCORE_COLUMNS},
        }  # fmt: skip
        tokens = {
            "doc_id": np.zeros(0, np.int64),
            "pos": np.zeros(0),
            "token_id": np.zeros(0),
            "token": [],
        }
        writer.commit(Segment(docs=docs_columns(ids, 512, False), tokens=tokens, heads=cols))
    return time.perf_counter() - start


def attention_like(n: int, heads: int, rng: np.random.Generator) -> np.ndarray:
    logits = np.full((heads, n, n), -8.0, dtype=np.float32)
    logits[:, :, 0] = 4.0
    idx = np.arange(n)
    logits[:, idx, idx] = 3.0
    logits[:, idx[1:], idx[:-1]] = 3.0
    logits += rng.normal(scale=1.5, size=logits.shape).astype(np.float32)
    logits[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def matrix_store(path: Path, n_docs: int, n: int, rng: np.random.Generator) -> float:
    layers, heads, per_segment = 2, 2, 8
    writer = StoreWriter(path, manifest(layers, heads, matrices=True))
    codec = get_codec("default")
    pool = [
        codec.encode(pack_tril(attention_like(n, layers * heads, rng))).reshape(layers, heads, -1)
        for _ in range(8)
    ]
    start = time.perf_counter()
    for first in range(0, n_docs, per_segment):
        ids = np.arange(first, min(first + per_segment, n_docs))
        tokens = {"doc_id": np.repeat(ids, n), "pos": np.tile(np.arange(n), len(ids)),
                  "token_id": rng.integers(0, 1000, n * len(ids)), "token": ["t"] * (n * len(ids))}  # fmt: skip
        heads_cols = {
            c: []
            for c in (
                "doc_id",
                "layer",
                "head",
                "kv_head",
                "n_tokens",
                *SCORE_COLUMNS,
                "n_queries",
                "n_duplicate",
                "n_induction",
            )
        }
        for d in ids:
            for layer in range(layers):
                for h in range(heads):
                    for c, v in zip(
                        heads_cols,
                        (d, layer, h, h, n, *rng.random(len(SCORE_COLUMNS)), n - 1, 0, 0),
                        strict=True,
                    ):
                        heads_cols[c].append(v)
        codes = [pool[int(d) % len(pool)] for d in ids]
        writer.commit(
            Segment(docs=docs_columns(ids, n, True), tokens=tokens, heads=heads_cols, codes=codes)
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        heads_path = Path(tmp) / "heads.attn"
        out["heads_rows"] = args.rows
        out["heads_write_s"] = round(heads_store(heads_path, args.rows, rng), 2)
        sql = ("SELECT layer, head, avg(induction) AS ind, count(*) AS n FROM heads "
               "WHERE entropy < 0.5 AND layer >= 10 GROUP BY layer, head ORDER BY ind DESC")  # fmt: skip
        start = time.perf_counter()
        attnstore.open(str(heads_path)).sql(sql)
        out["filter_groupby_cold_s"] = round(time.perf_counter() - start, 3)
        store = attnstore.open(str(heads_path))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            store.sql(sql)
            times.append(time.perf_counter() - start)
        out["filter_groupby_warm_s"] = round(statistics.median(times), 3)

        mpath = Path(tmp) / "matrices.attn"
        out["matrix_docs"] = args.docs
        out["matrix_tokens"] = args.tokens
        out["matrix_store_write_s"] = round(matrix_store(mpath, args.docs, args.tokens, rng), 2)
        store = attnstore.open(str(mpath))
        store.matrix(0, 0, 0)  # warm: opens the docs index
        reads = []
        for _ in range(200):
            d, layer, h = int(rng.integers(args.docs)), int(rng.integers(2)), int(rng.integers(2))
            start = time.perf_counter()
            store.matrix(d, layer, h)
            reads.append(time.perf_counter() - start)
        out["matrix_read_warm_ms_median"] = round(1000 * statistics.median(reads), 2)
        out["matrix_read_warm_ms_p95"] = round(1000 * float(np.percentile(reads, 95)), 2)
        out["matrix_store_bytes"] = store.info()["attention_bytes"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
