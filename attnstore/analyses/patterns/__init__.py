"""The pattern scores (``schemas/scores.md``) as an analysis: the ``heads`` table.

One row per (document, layer, head): ``sink``, ``previous``, ``self``, ``induction``,
``duplicate``, … and the counts they are averaged over. Extraction computes them inline — in the
``sdpa`` scores-only mode without ever materialising a probability, from queries and keys (online
softmax), which the row-block protocol cannot express — so :class:`Patterns` is *inline*: the
runner does not call it, and the ``heads`` table keeps exactly its columns. It is registered like
every other analysis so that ``entry_points(group="attnstore.analyses")`` lists the built-in
families together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from attnstore import index

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from attnstore.abc.analysis import Batch

__all__ = ["Patterns"]


class Patterns:
    """The ``heads`` table of pattern scores, computed inline by extraction."""

    name: str = "heads"
    schema: pa.Schema = index.HEADS
    #: computed by the extraction itself (see the module docstring): the runner skips it
    inline: ClassVar[bool] = True

    def begin(self, batch: Batch) -> None:
        """Nothing to prepare: extraction computes the scores."""

    def rows(self, layer: int, q0: int, probs: torch.Tensor) -> None:
        """Nothing to do: extraction computes the scores."""

    def end(self) -> Any:
        raise NotImplementedError("the heads table is computed inline by extraction")
