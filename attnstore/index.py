"""The Parquet tables of a store: their schemas and the one writer of their files.

Tables (column specs in ``schemas/tables/*.json``; a test keeps code and spec equal):

- ``docs``: one row per input document, skipped ones included (``skipped`` says why).
- ``tokens``: one row per stored token.
- ``heads``: one row per (document, layer, head) with the pattern scores of ``schemas/scores.md``.
- ``words``, ``syntax``, ``syntax_baseline``: parses aligned to tokens and the mergeable counts of
  ``schemas/syntax.md`` (only in stores extracted with ``--parse`` or annotated by ``parse``).
- ``probes``, ``probe_scores``: span-probe items and their per-head mass and argmax correctness
  (``schemas/probes.md``; only in stores with probe items).
- ``sparsity``, ``needles``: positional statistics per (document, layer, head) and the needle
  probe's spans (``schemas/sparsity.md``; owned by :class:`attnstore.analyses.sparsity.Sparsity`).
- ``overviews``: where each document's pooled N × N overviews are (``--overview N``; since 2.1).

Each table is a Delta Lake table (format 2). Files are immutable parts written under a temporary
name then renamed, so a reader never sees half a file; the Delta log adds them. Rows are sorted by
``doc_id`` (then layer, head) and row groups hold at most :data:`ROW_GROUP_ROWS` rows, so the
per-file statistics in the Delta log and the row-group statistics prune point look-ups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnstore.scores import SCORE_COLUMNS

__all__ = [
    "ROW_GROUP_ROWS",
    "SCHEMAS",
    "SORT_KEYS",
    "TABLES",
    "empty_table",
    "part_stats",
    "table_from_columns",
    "write_part",
]

#: Rows per Parquet row group: a point look-up decodes at most this many rows of a column.
ROW_GROUP_ROWS: Final = 1 << 16

DOCS: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("n_tokens_input", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("skipped", pa.string()),
        pa.field("n_chars", pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("segment", pa.string()),
        pa.field("offset", pa.int64()),
    ]
)

TOKENS: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("token", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
    ]
)

HEADS: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("head", pa.int16(), nullable=False),
        pa.field("kv_head", pa.int16(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        *(pa.field(name, pa.float64()) for name in SCORE_COLUMNS),
        pa.field("n_queries", pa.int32(), nullable=False),
        pa.field("n_duplicate", pa.int32(), nullable=False),
        pa.field("n_induction", pa.int32(), nullable=False),
        # since format 2.1: bidirectional (encoder) scores, NULL for causal models
        pa.field("next_token", pa.float64()),
        pa.field("sep", pa.float64()),
        # since format 2.1: mass of a learned sink logit (GPT-OSS), NULL for models without one
        pa.field("learned_sink", pa.float64()),
    ]
)

WORDS: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("word", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("char_start", pa.int32(), nullable=False),
        pa.field("char_end", pa.int32(), nullable=False),
        pa.field("first_token", pa.int32()),
        pa.field("last_token", pa.int32()),
        pa.field("tag", pa.string()),
        pa.field("relation", pa.string(), nullable=False),
        pa.field("head_word", pa.int32()),
    ]
)

SYNTAX: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("head", pa.int16(), nullable=False),
        pa.field("relation", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("correct", pa.int32(), nullable=False),
    ]
)

SYNTAX_BASELINE: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("relation", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        *(pa.field(f"correct_{k}", pa.int32(), nullable=False) for k in range(1, 7)),
    ]
)

#: Span probes (schemas/probes.md): one row per item, skipped ones included.
PROBES: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("item", pa.int32(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("group", pa.string()),
        pa.field("query_first", pa.int32()),
        pa.field("query_last", pa.int32()),
        pa.field("n_targets", pa.int32(), nullable=False),
        pa.field("n_distractors", pa.int32(), nullable=False),
        pa.field("nearest_correct", pa.bool_()),
        pa.field("first_correct", pa.bool_()),
        pa.field("skipped", pa.string()),
    ]
)

#: One row per (document, item, layer, head) of a non-skipped probe item.
PROBE_SCORES: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("item", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("head", pa.int16(), nullable=False),
        pa.field("mass_target", pa.float64(), nullable=False),
        pa.field("mass_distractor", pa.float64(), nullable=False),
        pa.field("correct", pa.bool_()),
        pa.field("strict_correct", pa.bool_()),
    ]
)

#: ``sparsity`` table columns of schemas/sparsity.md (the analysis: attnstore.analyses.sparsity)
SPARSITY_COLUMNS: Final = (
    "sink4", "local64", "stream", "span50", "span90", "vertical1", "slash1", "retrieval",
)  # fmt: skip
SPARSITY: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("head", pa.int32(), nullable=False),
        *(pa.field(c, pa.float64()) for c in SPARSITY_COLUMNS),
        pa.field("n_queries", pa.int32(), nullable=False),
        pa.field("n_retrieval", pa.int32(), nullable=False),
    ]
)

#: One row per needle document; positions are NULL when the span is not among the stored tokens
#: (a document truncated by ``--max-length``, a tokenizer without character offsets).
NEEDLES: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("depth", pa.float64(), nullable=False),
        pa.field("value_first", pa.int32()),
        pa.field("value_last", pa.int32()),
        pa.field("answer_first", pa.int32()),
        pa.field("answer_last", pa.int32()),
    ]
)


#: Where each document's overviews live (``--overview N``, since 2.1): one row per document.
OVERVIEWS: Final = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("size", pa.int32(), nullable=False),
        pa.field("block", pa.int32(), nullable=False),
        pa.field("n_blocks", pa.int32(), nullable=False),
        pa.field("array", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
    ]
)

SCHEMAS: Final[dict[str, pa.Schema]] = {
    "docs": DOCS,
    "tokens": TOKENS,
    "heads": HEADS,
    "words": WORDS,
    "syntax": SYNTAX,
    "syntax_baseline": SYNTAX_BASELINE,
    "probes": PROBES,
    "probe_scores": PROBE_SCORES,
    "sparsity": SPARSITY,
    "needles": NEEDLES,
    "overviews": OVERVIEWS,
}
#: Row order inside every part (lets DuckDB prune row groups on point look-ups).
SORT_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "docs": ("doc_id",),
    "tokens": ("doc_id", "pos"),
    "heads": ("doc_id", "layer", "head"),
    "words": ("doc_id", "word"),
    "syntax": ("doc_id", "layer", "head", "relation", "direction"),
    "syntax_baseline": ("doc_id", "relation", "direction"),
    "probes": ("doc_id", "item"),
    "probe_scores": ("doc_id", "item", "layer", "head"),
    "sparsity": ("doc_id", "layer", "head"),
    "needles": ("doc_id",),
    "overviews": ("doc_id",),
}
TABLES: Final = tuple(SCHEMAS)


def table_from_columns(name: str, columns: dict[str, Any]) -> pa.Table:
    """Build table ``name`` from column arrays, sorted; NaN in float columns becomes NULL.

    A nullable column that is not given is all NULL (columns added by a later minor version).
    """
    schema = SCHEMAS[name]
    n_rows = len(next(iter(columns.values()))) if columns else 0
    arrays = []
    for field in schema:
        if field.name not in columns and field.nullable:
            arrays.append(pa.nulls(n_rows, type=field.type))
            continue
        values = columns[field.name]
        if pa.types.is_floating(field.type):
            values = np.asarray(values, dtype=np.float64)
            arrays.append(pa.array(values, type=field.type, mask=np.isnan(values)))
        else:
            arrays.append(pa.array(values, type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    return table.sort_by([(k, "ascending") for k in SORT_KEYS[name]]) if table.num_rows else table


def empty_table(name: str) -> pa.Table:
    return SCHEMAS[name].empty_table()


def part_stats(table: pa.Table) -> str:
    """Delta Lake file statistics (JSON) of one part: row count, min/max/nulls of integer columns.

    Readers use them to skip files that cannot hold a looked-up ``doc_id``.
    """
    import pyarrow.compute as pc

    mins: dict[str, int] = {}
    maxs: dict[str, int] = {}
    nulls: dict[str, int] = {}
    for field in table.schema:
        if not pa.types.is_integer(field.type):
            continue
        column = table[field.name]
        nulls[field.name] = column.null_count
        if table.num_rows and column.null_count < table.num_rows:
            lo, hi = pc.min_max(column).values()
            mins[field.name], maxs[field.name] = lo.as_py(), hi.as_py()
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    )


def write_part(table: pa.Table, path: Path) -> None:
    """Write one immutable Parquet part: temporary name, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(
        table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_page_checksum=True
    )
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
