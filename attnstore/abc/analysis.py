"""The analysis plug-in protocol: attention rows in, table rows out (``schemas/analyses.md``).

An *analysis* is called while the model runs. For every batch of documents: :meth:`Analysis.begin`
once before the forward pass, :meth:`Analysis.rows` for every stored layer and every block of
query rows (exact post-softmax attention, float32, before any codec), :meth:`Analysis.end` once
after it, returning the batch's rows as a :class:`pyarrow.Table` with exactly
:attr:`Analysis.schema`. The rows are committed atomically with the batch's other tables and land
in the store as a Delta table named :attr:`Analysis.name` (and a DuckDB view of the same name).

This module imports only the standard library and pyarrow's types at type-checking time, so a
plug-in package can import it without pulling torch or the store machinery.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

__all__ = ["ENTRY_POINT_GROUP", "Analysis", "Batch"]

#: The entry point group under which analyses (built-in and third-party) are registered.
ENTRY_POINT_GROUP = "attnstore.analyses"


@dataclass(frozen=True)
class Batch:
    """One batch of documents, as an analysis sees it in :meth:`Analysis.begin`.

    ``token_ids`` is right-padded: row ``i`` holds ``lengths[i]`` real tokens. ``layers`` and
    ``heads`` are the stored model layers and query heads: the ``H`` axis of the ``probs`` that
    :meth:`Analysis.rows` receives follows ``heads``, and ``rows`` is called once per block for
    each layer of ``layers``.
    """

    doc_ids: list[int]
    token_ids: torch.Tensor  # int64 [B, T], right-padded
    lengths: torch.Tensor  # int64 [B]
    n_layers: int  # the model's number of layers
    n_heads: int  # the model's number of query heads
    device: torch.device
    texts: list[str]
    layers: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    #: per-document context of the built-in families (the tokenized document: its spans, aligned
    #: parse, probe items, needle); a third-party analysis should not rely on it
    documents: Sequence[Any] = ()
    #: free-form facts about the run (model id, codec, ...)
    info: Mapping[str, Any] = field(default_factory=dict)
    #: documents of this batch that are skipped (``(document, why)``; no rows, no matrices): their
    #: ``doc_id`` rows may also appear in a table (the span probes list their items)
    skipped: Sequence[Any] = ()


@runtime_checkable
class Analysis(Protocol):
    """What an analysis provides; a class registered under :data:`ENTRY_POINT_GROUP`.

    ``name`` is its table's name (``[a-z][a-z0-9_]*``, unique in a store); ``schema`` has
    ``doc_id`` (int64) and may have ``layer``/``head`` (int32). An analysis may own further tables:
    ``extra_schemas`` (optional) maps each further table name to its schema, and then :meth:`end`
    returns a mapping from table name (``name`` included) to table. An optional
    ``applies(batch) -> bool`` (default: the batch has documents) skips batches the analysis has
    nothing to say about (then none of its methods is called for that batch). An optional
    ``bind(model, tokenizer)`` is called once with the loaded model before the first batch, for
    an analysis that needs more than attention rows (``value_norm`` hooks the value projections).
    An optional ``tile(layer, q0, k0, probs)`` reads attention in cache-sized tiles instead of
    row blocks (``schemas/analyses.md``): when every active analysis has it, a scores-only sdpa
    run calls it for tiles ``[B, H, Q, K']`` of rows ``q0 …`` and keys ``k0 …``, the tiles of a
    block of rows from the diagonal down to ``k0 = 0``, and never calls :meth:`rows`.
    """

    name: str
    schema: pa.Schema

    def begin(self, batch: Batch) -> None:
        """Called once per batch, before its forward pass."""

    def rows(self, layer: int, q0: int, probs: torch.Tensor) -> None:
        """Query rows ``q0 … q0+Q-1`` of ``layer``: float32 ``[B, H, Q, K]`` with ``K ≥ q0+Q``.

        Entries past a document's length and above the diagonal are 0. Blocks of one layer come
        in increasing ``q0`` and cover every row once. Keep no reference to ``probs``.
        """

    def end(self) -> pa.Table | Mapping[str, pa.Table]:
        """This batch's rows with exactly ``schema`` (a mapping when ``extra_schemas`` is set)."""
        ...
