"""Head profiles out of a store: one row per (layer, head), written for other tools.

``attnstore profile STORE --out DIR`` (:func:`write_profile`) writes

- ``DIR/data/train-00000-of-00001.parquet``: one row per stored (layer, head) with the corpus mean
  (weighted as ``head_summary`` and ``sparsity_summary`` weight them) and the 10th, 50th and 90th
  percentiles over documents of every score (the ``heads`` scores of ``schemas/scores.md`` and
  the ``sparsity`` columns of ``schemas/sparsity.md``), the head's labels, the model id, the
  corpus spec and its token count;
- ``DIR/README.md``: a dataset card with YAML front matter, so ``datasets.load_dataset("parquet",
  data_dir=DIR)`` (and ``load_dataset(DIR)``) read the table;
- ``DIR/full_attention_heads.tsv`` and ``DIR/config.json``: DuoAttention's attention pattern (its
  ``load_attn_pattern(DIR)`` reads both): one line per model layer, one tab-separated gate per
  key-value head, 1 = full attention, 0 = streaming (:func:`gates`, rule in ``schemas/sparsity.md``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from attnstore.analyses.sparsity import (
    COLUMNS as SPARSITY_COLUMNS,
)
from attnstore.analyses.sparsity import (
    STREAM_RECENT,
    STREAM_SINK,
    STREAMING_MIN,
)
from attnstore.scores import SCORE_COLUMNS

if TYPE_CHECKING:
    import os

    import pyarrow as pa

    from attnstore.storage import Location
    from attnstore.store import Store

__all__ = ["DATA_FILE", "QUANTILES", "gates", "profile_table", "write_profile"]

#: The percentiles of every score over documents.
QUANTILES: Final = (0.1, 0.5, 0.9)
DATA_FILE: Final = "data/train-00000-of-00001.parquet"


def _quantiles(columns: tuple[str, ...], table: str) -> str:
    parts = [
        f"quantile_cont({c}, {q}) AS {c}_p{round(q * 100)}" for c in columns for q in QUANTILES
    ]
    return (
        "SELECT layer::INTEGER AS layer, head::INTEGER AS head, "
        + ", ".join(parts)
        + f" FROM {table} GROUP BY ALL"
    )


def _corpus(store: Store) -> tuple[int, int]:
    row = store.sql(
        "SELECT coalesce(sum(n_tokens), 0)::BIGINT AS t, count(*)::BIGINT AS d FROM docs "
        "WHERE skipped IS NULL"
    ).to_pylist()[0]
    return int(row["t"]), int(row["d"])


def profile_table(store: Store) -> pa.Table:
    """One row per stored (layer, head): means and percentiles of every score, labels, provenance."""
    manifest = store.manifest
    tokens, documents = _corpus(store)
    cols = []
    for c in SCORE_COLUMNS:
        cols += [f"h.{c} AS {c}_mean", *(f"hq.{c}_p{round(q * 100)}" for q in QUANTILES)]
    for c in SPARSITY_COLUMNS:
        cols += [f"s.{c} AS {c}_mean", *(f"sq.{c}_p{round(q * 100)}" for q in QUANTILES)]
    sql = (
        f"WITH hq AS ({_quantiles(SCORE_COLUMNS, 'heads')}), "
        f"sq AS ({_quantiles(SPARSITY_COLUMNS, 'sparsity')}), "
        "h AS (SELECT * REPLACE (layer::INTEGER AS layer, head::INTEGER AS head) "
        "FROM head_summary) "
        "SELECT h.layer, h.head, h.kv_head::INTEGER AS kv_head, h.n_docs, h.n_queries, "
        + ", ".join(cols)
        + ", s.stream_long, coalesce(s.n_retrieval, 0)::BIGINT AS n_retrieval, h.label, "
        "s.label AS sparsity_label, $model AS model, $corpus AS corpus, "
        "$tokens::BIGINT AS corpus_tokens, $documents::BIGINT AS corpus_documents "
        "FROM h LEFT JOIN hq USING (layer, head) LEFT JOIN sparsity_summary s USING (layer, head) "
        "LEFT JOIN sq USING (layer, head) ORDER BY h.layer, h.head"
    )
    params = {
        "model": str(manifest["model"]["id"]),
        "corpus": str((manifest.get("settings") or {}).get("corpus") or ""),
        "tokens": tokens,
        "documents": documents,
    }
    return store.sql(sql, params)


def gates(store: Store, profile: pa.Table) -> np.ndarray:
    """DuoAttention's gates ``[n_layers, n_kv_heads]`` (float, 0 or 1) from a profile.

    A key-value head gets 0 (streaming: 128 sink + 256 recent tokens suffice) only when every
    query head that shares it is stored, is not labelled ``retrieval`` and has
    ``stream_long ≥ 0.95``; otherwise 1 (full attention). Layers and heads the store lacks, and
    heads without a document longer than the streaming budget, stay at 1: the conservative choice.
    """
    model = store.manifest["model"]
    n_layers, n_heads = int(model["n_layers"]), int(model["n_heads"])
    n_kv = int(model.get("n_kv_heads") or n_heads)
    full = np.ones((n_layers, n_heads), dtype=bool)
    for row in profile.select(["layer", "head", "stream_long", "sparsity_label"]).to_pylist():
        streaming = (
            row["stream_long"] is not None
            and row["stream_long"] >= STREAMING_MIN
            and row["sparsity_label"] != "retrieval"
        )
        full[row["layer"], row["head"]] = not streaming
    per_kv = np.any(full.reshape(n_layers, n_kv, n_heads // n_kv), axis=2)
    return np.asarray(per_kv, dtype=np.float64)


def _card(profile: pa.Table, store: Store, gate: np.ndarray) -> str:
    m = store.manifest
    row = profile.slice(0, 1).to_pylist()[0] if profile.num_rows else {}
    model, corpus = m["model"]["id"], row.get("corpus") or (m.get("settings") or {}).get("corpus")
    tokens, documents = _corpus(store)
    scores = ", ".join(f"`{c}`" for c in (*SCORE_COLUMNS, *SPARSITY_COLUMNS))
    streaming = int((gate == 0).sum())
    return f"""---
pretty_name: attnstore head profile of {model}
tags:
- attention
- attention-heads
- interpretability
- attnstore
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA_FILE}
---

# Head profile of `{model}`

One row per (layer, head) of `{model}`, measured by [attnstore](https://pypi.org/project/attnstore/)
on the corpus `{corpus}` ({documents} documents, {tokens} tokens).

- `<score>_mean`: the corpus mean of each score, weighted as attnstore's `head_summary` and
  `sparsity_summary` views weight it (by the queries or instances that define it);
  `<score>_p10`, `<score>_p50`, `<score>_p90`: its percentiles over documents. Scores: {scores}
  (definitions: attnstore's `schemas/scores.md` and `schemas/sparsity.md`). NULL where a score has
  no instance (for example `retrieval` without needle documents).
- `stream_long`: `stream` over documents longer than the 128 + 256-token streaming budget.
- `label` (pattern or annotation label, `head_summary`) and `sparsity_label` (`retrieval`,
  `streaming` or `none`, `sparsity_summary`).
- `model`, `corpus`, `corpus_tokens`, `corpus_documents`: provenance.

```python
import datasets
profile = datasets.load_dataset("parquet", data_dir="THIS_FOLDER")["train"]
```

`full_attention_heads.tsv` and `config.json` are the same profile in DuoAttention's layout
(`duo_attn.utils.load_attn_pattern("THIS_FOLDER")`): one line per layer, one gate per key-value
head, 1 = full attention, 0 = streaming ({STREAM_SINK} sink + {STREAM_RECENT} recent tokens);
{streaming} of {gate.size} key-value heads stream. A key-value head streams only when all its query
heads have `stream_long ≥ {STREAMING_MIN}` and none is a retrieval head.
"""


def write_profile(store: Store | Location, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the profile of ``store`` to the folder ``out`` (see the module docstring)."""
    import pyarrow.parquet as pq

    from attnstore.store import Store as _Store

    st = store if isinstance(store, _Store) else _Store(store)
    folder = Path(out)
    profile = profile_table(st)
    gate = gates(st, profile)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(profile, folder / DATA_FILE, compression="zstd")
    (folder / "README.md").write_text(_card(profile, st, gate), encoding="utf-8")
    lines = ["\t".join(f"{g:g}" for g in layer) for layer in gate]
    (folder / "full_attention_heads.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"sink_size": STREAM_SINK, "recent_size": STREAM_RECENT,
              "source": "attnstore profile", "model": st.manifest["model"]["id"]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {
        "path": str(folder),
        "heads": profile.num_rows,
        "columns": profile.num_columns,
        "streaming_kv_heads": int((gate == 0).sum()),
        "kv_heads": int(gate.size),
    }
