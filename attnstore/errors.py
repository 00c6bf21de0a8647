"""One error hierarchy for attnstore.

Every error raised on bad input derives from :class:`AttnStoreError` and, where it fits, from the
builtin a caller would expect (``FileNotFoundError``, ``ValueError``, ``KeyError``), so
``except ValueError`` keeps working. Messages say what was expected, what came, and how to fix it.
The CLI is the only place that turns these into exit codes.
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "AttentionCaptureError",
    "AttnStoreError",
    "CorpusError",
    "DamagedStoreError",
    "FormatVersionError",
    "IncompatibleStoreError",
    "MatrixNotFoundError",
    "ModelError",
    "QueryError",
    "ShardBusyError",
    "StorageConfigError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StoreWriteError",
    "UnknownCodecError",
    "UnknownLabelError",
    "UnsafeStorePathError",
]


class AttnStoreError(Exception):
    """Base class of every error attnstore raises on purpose."""


class StoreNotFoundError(AttnStoreError, FileNotFoundError):
    """The path is not an attnstore store."""


class StoreExistsError(AttnStoreError, FileExistsError):
    """A store (or something else) already occupies the output path."""


class StoreWriteError(AttnStoreError, OSError):
    """Writing a batch failed (disk full, permissions); nothing of that batch was committed."""


class StorageConfigError(AttnStoreError, ValueError):
    """A store URL or storage option that no object-storage backend accepts."""


class FormatVersionError(AttnStoreError, ValueError):
    """The store was written by a format version this code cannot read."""


class IncompatibleStoreError(AttnStoreError, ValueError):
    """Appending to a store whose settings differ from the requested ones."""


class UnknownCodecError(AttnStoreError, ValueError):
    """A codec id that is not registered."""

    def __init__(self, codec_id: str, known: list[str]) -> None:
        self.codec_id = codec_id
        super().__init__(f"Unknown codec {codec_id!r}. Expected one of: {', '.join(known)}.")


class UnknownLabelError(AttnStoreError, ValueError):
    """A head label that is neither a pattern label nor a syntactic/semantic label of the store."""

    def __init__(self, label: str, valid: list[str]) -> None:
        self.label = label
        super().__init__(f"Unknown label {label!r}. Expected one of: {', '.join(valid)}.")


class CorpusError(AttnStoreError, ValueError):
    """The corpus cannot be read as documents."""


class ModelError(AttnStoreError, ValueError):
    """The model cannot be loaded or cannot return attention weights."""


class AttentionCaptureError(ModelError):
    """No capture path delivers this model's attention exactly; nothing of the batch was written.

    ``failures`` holds one ``"path: why"`` line per capture path tried.
    """

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        self.failures = list(failures or [])
        super().__init__(message)


class QueryError(AttnStoreError, ValueError):
    """The SQL is malformed, not read-only, or its parameters do not fit."""


class MatrixNotFoundError(AttnStoreError, KeyError):
    """No stored matrix for the requested (doc_id, layer, head)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AnalysisError(AttnStoreError, ValueError):
    """An analysis (``schemas/analyses.md``) is unknown, clashes by name, raised, or returned rows
    that do not fit its schema; nothing of the batch was committed. ``analysis`` names it."""

    def __init__(self, analysis: str, message: str) -> None:
        self.analysis = analysis
        super().__init__(message)


class DamagedStoreError(AttnStoreError, ValueError):
    """A store file that cannot be read as what it should be; the message names the file."""


class UnsafeStorePathError(DamagedStoreError):
    """A path in a store's metadata that would leave the store (``..``, absolute, a URL)."""


class ShardBusyError(AttnStoreError, RuntimeError):
    """Another live writer holds the lease of this shard of the store."""
