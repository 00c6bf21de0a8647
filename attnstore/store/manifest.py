"""A store's manifest (``attnstore.json``) on any storage: read and checked, or written as bytes.

The fields and their checks are in :mod:`attnstore.layout`; this module reads the file through a
:class:`~attnstore.storage.Storage`, so a store on object storage is read like a folder.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from attnstore.errors import StoreNotFoundError
from attnstore.layout import (
    FORMAT_NAME,
    MANIFEST_NAME,
    Manifest,
    check_manifest_fields,
    parse_format_version,
    read_manifest,
)
from attnstore.storage import LocalStorage

if TYPE_CHECKING:
    from attnstore.storage import Storage

__all__ = ["manifest_bytes", "read_store_manifest"]


def read_store_manifest(storage: Storage) -> Manifest:
    """Read and check the manifest of the store in ``storage`` (a folder or a URL)."""
    if isinstance(storage, LocalStorage):
        return read_manifest(storage.path)
    try:
        data = storage.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise StoreNotFoundError(
            f"No store at {storage.root!r}: it has no {MANIFEST_NAME}. "
            "Create one with `attnstore extract --out URL`."
        ) from None
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise StoreNotFoundError(
            f"Cannot read {MANIFEST_NAME} of {storage.root!r}: {err}."
        ) from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(
            f"{storage.root}/{MANIFEST_NAME} is not an attnstore manifest: "
            f'expected "format": "{FORMAT_NAME}".'
        )
    parse_format_version(doc.get("format_version"))
    check_manifest_fields(doc, f"{storage.root}/{MANIFEST_NAME}")
    return doc  # type: ignore[return-value]


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest file's bytes: indented, sorted keys, a final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
