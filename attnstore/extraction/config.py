"""A run's settings as one typed, frozen object, checked when it is built."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from attnstore.errors import AttnStoreError

if TYPE_CHECKING:
    from attnstore.abc.analysis import Analysis

__all__ = ["DEFAULT_MAX_LENGTH", "ExtractConfig", "parse_shard"]

#: Documents are cut at this many tokens unless the model's context is shorter or a run says.
DEFAULT_MAX_LENGTH: Final = 512


def parse_shard(shard: str) -> tuple[int, int]:
    """``'i/n'`` as ``(i, n)`` (``'auto'`` is resolved by the caller from its launcher:
    :func:`attnstore.cluster.shard_from_environment`)."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise AttnStoreError(
            f"Expected --shard like '0/4' (this index / count) or 'auto'. Got {shard!r}."
        ) from None
    if not 0 <= index < count:
        raise AttnStoreError(f"Expected 0 ≤ index < count in --shard. Got {shard!r}.")
    return index, count


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract: everything but where to (the store) and the loaded model.

    ``max_length=None`` means :data:`DEFAULT_MAX_LENGTH` or the model's context when shorter;
    ``shard`` is ``(index, count)``; ``analyses`` are instances or registered names run beside the
    default ones (``schemas/analyses.md``); ``codec`` a codec id or a codec config.
    """

    corpus: str | None = None
    text_field: str = "text"
    max_length: int | None = None
    batch_size: int = 4
    device: str | None = None
    dtype: str = "auto"
    codec: str | dict[str, Any] = "default"
    limit: int | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    allow_different: bool = False
    shard: tuple[int, int] | None = None
    parse: str | None = None
    scores_only: bool = False
    attention: str = "auto"
    #: what the matrices hold: "probs" (post-softmax) or "logits" (pre-softmax scores)
    values: str = "probs"
    #: ``--rows``: the query rows stored of each document (attnstore.rows syntax); None: all
    rows: str | None = None
    #: ``--overview N``: N × N pooled views of every head; None: none
    overview: int | None = None
    analyses: tuple[str | Analysis, ...] = ()
    #: default analyses (``attnstore.analyses.registry.DEFAULT``) not to run; ``patterns`` stays
    skip_analyses: tuple[str, ...] = ()
    #: further ``settings`` recorded in the manifest (e.g. where a materialized store came from)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise AttnStoreError(f"--batch-size must be ≥ 1. Got {self.batch_size}.")
        if self.overview is not None and self.overview < 1:
            raise AttnStoreError(f"--overview N needs N ≥ 1. Got {self.overview}.")
        from attnstore.analyses.registry import DEFAULT

        bad = [n for n in self.skip_analyses if n not in DEFAULT or n == "patterns"]
        if bad:
            skippable = ", ".join(n for n in DEFAULT if n != "patterns")
            raise AttnStoreError(
                f"--skip-analysis takes a default analysis other than patterns ({skippable}). "
                f"Got {', '.join(bad)}."
            )
        if self.limit is not None and self.limit < 0:
            raise AttnStoreError(f"--limit must be ≥ 0. Got {self.limit}.")
        from attnstore.rows import RowSelection

        RowSelection.parse(self.rows)  # a bad --rows fails here, in whichever driver
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def of(
        cls,
        *,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        shard: str | tuple[int, int] | None = None,
        analyses: Sequence[str | Analysis] = (),
        **kwargs: Any,
    ) -> ExtractConfig:
        """Build one from the keyword arguments of :func:`attnstore.extract` (lists, ``'i/n'``;
        resolve ``'auto'`` first)."""
        return cls(
            layers=None if layers is None else tuple(layers),
            heads=None if heads is None else tuple(heads),
            shard=parse_shard(shard) if isinstance(shard, str) else shard,
            analyses=tuple(analyses),
            **kwargs,
        )
