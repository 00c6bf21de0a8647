"""``attnstore verify``: find every way a store can be damaged, with its location.

Format 2 (Delta tables), in order:

1. the manifest parses and names a readable format version (a folder without one is not a store:
   that is an error of the call, not damage);
2. every writer file (``writers/<app>.json``) parses and was written under the current manifest
   (its ``manifest_sha256``); an interrupted flush is a warning (the next writer or ``compact``
   finishes it);
3. every Delta table's log opens, and every file its snapshot references exists with the size the
   log recorded; unless ``quick``, every Parquet file is read back with its page checksums;
4. the tables agree with each other: no doc_id in ``docs`` twice, each stored document has
   ``n_tokens`` token rows and one ``heads`` row per stored (layer, head), skipped ones none;
5. each segment the ``docs`` table points at has its shard file, the manifest's shape and dtype, and
   (unless ``quick``) every stored matrix decodes (each chunk carries a crc32c) to finite
   probabilities in [0, 1] whose rows sum to 1 within the codec's bound;
6. with ``--overview N`` (2.1), each stored document's overviews are where the ``overviews`` table
   says, with the right shape and dtype, and (unless ``quick``) sound pictures equal to the pooling
   of the stored matrices where those are stored (:mod:`attnstore.verify.overviews`).

Files nothing references (left by an interrupted writer, or removed by ``compact`` and waiting for
its retention period) are reported as warnings: readers ignore them.

Format 1 stores are checked as before: commit records, their sha256 checksums, the same table and
matrix checks.

The package, by part: :mod:`~attnstore.verify.report` (what is found),
:mod:`~attnstore.verify.format2` and :mod:`~attnstore.verify.format1` (the checks of each format),
:mod:`~attnstore.verify.segments` (a segment's matrices), :mod:`~attnstore.verify.overviews`
(``--overview N``).
"""

from __future__ import annotations

import os
from pathlib import Path

from attnstore.codecs import get_codec
from attnstore.errors import AttnStoreError, StoreNotFoundError
from attnstore.layout import MANIFEST_NAME, parse_format_version
from attnstore.storage import LocalStorage, Storage, open_storage
from attnstore.store.manifest import read_store_manifest
from attnstore.verify.format1 import verify_v1
from attnstore.verify.format2 import verify_v2
from attnstore.verify.report import Problem, VerifyReport

__all__ = ["Problem", "VerifyReport", "verify_store"]


def verify_store(
    path: str | os.PathLike[str] | Storage,
    *,
    quick: bool = False,
    storage_options: dict[str, str] | None = None,
) -> VerifyReport:
    """Check a store (a folder, a URL, or an opened :class:`~attnstore.storage.Storage` with its
    options); see the module docstring for what is checked."""
    if isinstance(path, (str, os.PathLike)):
        storage = open_storage(path, storage_options)
    else:
        storage = path
    root = storage.path if isinstance(storage, LocalStorage) else Path(storage.root)  # format 1
    report = VerifyReport(storage.root)
    if not storage.exists(MANIFEST_NAME):
        read_store_manifest(storage)  # raises the "not an attnstore store" error with the reason
        raise StoreNotFoundError(f"{str(path)!r} is not an attnstore store.")  # pragma: no cover
    try:
        manifest = read_store_manifest(storage)
        codec = get_codec(manifest["codec"])
        major = parse_format_version(manifest["format_version"])[0]
    except (AttnStoreError, KeyError, TypeError) as err:
        report.error(MANIFEST_NAME, f"unreadable manifest: {err}")
        return report
    if major >= 2:
        verify_v2(report, storage, manifest, codec, quick)
    else:
        verify_v1(report, root, manifest, codec, quick)
    return report
