"""Where things live in a store, and the manifest that describes it (spec: ``schemas/``).

::

    STORE/
      attnstore.json               manifest (schemas/manifest.schema.json)
      segments/zarr.json           Zarr v3 group holding one array per committed batch
      segments/<segment>/          Zarr v3 array [layer, head, packed] of codec dtype, one shard
      tables/<table>/<segment>.parquet
      commits/<segment>.json       written last: a batch is visible iff its commit record exists

Every name under ``segments/``, ``tables/`` and ``commits/`` is unique to one writer (a random
writer id plus a counter), so many writers can fill one store without sharing a file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Final, TypedDict

from attnstore.errors import FormatVersionError, StoreNotFoundError

__all__ = [
    "COMPAT_KEYS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT_KEYS",
    "MANIFEST_NAME",
    "Manifest",
    "manifest_value",
    "new_writer_id",
    "read_json",
    "read_manifest",
    "write_json_atomic",
]

FORMAT_NAME: Final = "attnstore"
#: Major.minor. Readers accept any minor of their major; additive changes bump the minor.
#: 1.1 added tokens.char_start/char_end and the words, syntax and syntax_baseline tables.
FORMAT_VERSION: Final = "1.1"
MANIFEST_NAME: Final = "attnstore.json"
SEGMENTS: Final = "segments"
TABLES_DIR: Final = "tables"
COMMITS: Final = "commits"
PACKING: Final = "tril-rowmajor"

#: Manifest entries that must agree before new documents may join an existing store.
COMPAT_KEYS: Final = ("model", "tokenizer", "codec", "max_length", "layers", "heads", "matrices")
#: Of those, the ones that define how segments are laid out: they can never differ within one store
#: (the manifest describes every segment), even with ``--allow-different``.
LAYOUT_KEYS: Final = ("codec", "layers", "heads", "matrices")


class ModelInfo(TypedDict):
    id: str
    revision: str | None
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    dtype: str


class TokenizerInfo(TypedDict):
    id: str
    vocab_size: int
    bos_token_id: int | None
    adds_bos: bool


class _ManifestRequired(TypedDict):
    format: str
    format_version: str
    created_by: str
    created_at: str
    model: ModelInfo
    tokenizer: TokenizerInfo
    codec: dict[str, Any]
    packing: str
    max_length: int
    layers: list[int]
    heads: list[int]
    settings: dict[str, Any]


class Manifest(_ManifestRequired, total=False):
    #: since 1.1; absent means True. False: a scores-only store (tables, no segments).
    matrices: bool


def manifest_value(manifest: Manifest, key: str) -> Any:
    """A manifest entry with the defaults of keys added in later minor versions."""
    return manifest.get(key, True if key == "matrices" else None)


def new_writer_id() -> str:
    """A fresh id for one writing process; it prefixes every file that process creates."""
    return secrets.token_hex(4)


def write_json_atomic(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_manifest(root: Path) -> Manifest:
    """Read and check the manifest of the store at ``root``."""
    if not root.exists():
        raise StoreNotFoundError(
            f"No store at {str(root)!r}: the path does not exist. "
            "Create one with `attnstore extract --out PATH`."
        )
    if not root.is_dir():
        raise StoreNotFoundError(f"Expected a store folder at {str(root)!r}. Got a file instead.")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise StoreNotFoundError(
            f"{str(root)!r} is a folder but not an attnstore store: it has no {MANIFEST_NAME}."
        )
    try:
        doc = read_json(path)
    except (OSError, ValueError) as err:
        raise StoreNotFoundError(f"Cannot read {str(path)!r} as JSON: {err}.") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(
            f'{str(path)!r} is not an attnstore manifest: expected "format": "{FORMAT_NAME}".'
        )
    parse_format_version(doc.get("format_version"))
    return doc  # type: ignore[return-value]


def parse_format_version(value: object) -> tuple[int, int]:
    ours = tuple(int(x) for x in FORMAT_VERSION.split("."))
    try:
        major, minor = (int(x) for x in str(value).split("."))
    except ValueError:
        raise FormatVersionError(
            f"Expected a format_version like {FORMAT_VERSION!r}. Got {value!r} instead."
        ) from None
    if major != ours[0]:
        raise FormatVersionError(
            f"This store has format version {value}; this attnstore reads version "
            f"{ours[0]}.x. Upgrade attnstore (pip install -U attnstore) to read it."
        )
    return major, minor
