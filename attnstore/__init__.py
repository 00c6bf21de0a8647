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
    AttentionCaptureError,
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
from attnstore.version import __version__

if TYPE_CHECKING:
    from attnstore.pipeline import ExtractReport
    from attnstore.store import Store

__all__ = [
    "AttentionCaptureError",
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
    "serve",
]


def open(path: str, *, storage_options: dict[str, str] | None = None) -> Store:
    """Open a store read-only: a folder, or a URL such as ``s3://bucket/prefix/name.attn``.

    ``storage_options`` (endpoint, credentials, region; see :mod:`attnstore.storage`) apply to
    object storage, on top of the standard ``AWS_*`` variables.
    """
    from attnstore.store import Store

    return Store(path, storage_options=storage_options)


def extract(out: str, **kwargs: Any) -> ExtractReport:
    """Extract attention into a store; see :func:`attnstore.pipeline.extract`."""
    from attnstore.pipeline import extract as _extract

    return _extract(out, **kwargs)


def serve(*stores: str, host: str = "127.0.0.1", port: int = 8765, **kwargs: Any) -> None:
    """Serve the web viewer for ``stores`` until interrupted; see :func:`attnstore.viewer.serve`."""
    from attnstore.viewer import serve as _serve

    _serve(*stores, host=host, port=port, **kwargs)
