"""attnstore: attention matrices of language models as a queryable dataset.

>>> import attnstore
>>> store = attnstore.open("demo.attn")  # doctest: +SKIP
>>> store.sql("SELECT * FROM heads WHERE sink > ?", [0.9])  # doctest: +SKIP
>>> store.matrix(doc_id=3, layer=18, head=6)  # doctest: +SKIP

Importing attnstore is light: torch and transformers load only when extracting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnstore.errors import (
    AttnStoreError,
    CorpusError,
    FormatVersionError,
    IncompatibleStoreError,
    MatrixNotFoundError,
    ModelError,
    QueryError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownCodecError,
)

if TYPE_CHECKING:
    from attnstore.pipeline import ExtractReport
    from attnstore.store import Store

__version__ = "0.1.0"

__all__ = [
    "AttnStoreError",
    "CorpusError",
    "FormatVersionError",
    "IncompatibleStoreError",
    "MatrixNotFoundError",
    "ModelError",
    "QueryError",
    "StoreExistsError",
    "StoreNotFoundError",
    "UnknownCodecError",
    "__version__",
    "extract",
    "open",
]


def open(path: str) -> Store:
    """Open a store read-only."""
    from attnstore.store import Store

    return Store(path)


def extract(out: str, **kwargs: Any) -> ExtractReport:
    """Extract attention into a store; see :func:`attnstore.pipeline.extract`."""
    from attnstore.pipeline import extract as _extract

    return _extract(out, **kwargs)
