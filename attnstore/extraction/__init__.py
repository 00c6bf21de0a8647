"""One extraction run, shared by every driver (``attnstore.extract`` and the CLI, torchrun/Slurm
shards, the Ray actors of :mod:`attnstore.cluster`, :mod:`attnstore.materialize`).

- :mod:`attnstore.extraction.config`: :class:`ExtractConfig`, a run's settings as one frozen object;
- :mod:`attnstore.extraction.run`: :class:`ExtractionRun` (extractor, manifest, writer on one opened
  storage), :func:`document_batches`, :func:`build_manifest`, :class:`ExtractReport`.

Importing this package is light; torch loads when a run is built.
"""

from __future__ import annotations

from attnstore.extraction.config import DEFAULT_MAX_LENGTH, ExtractConfig, parse_shard
from attnstore.extraction.run import (
    ExtractionRun,
    ExtractReport,
    build_manifest,
    document_batches,
)

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "ExtractConfig",
    "ExtractReport",
    "ExtractionRun",
    "build_manifest",
    "document_batches",
    "parse_shard",
]
