"""Where things live in a store, and the manifest that describes it (spec: ``schemas/``).

Format 2 (written by this version; spec in ``schemas/README.md``)::

    STORE/
      attnstore.json                     manifest (schemas/manifest.schema.json)
      tables/<table>/                    one Delta Lake table per table (_delta_log/ + Parquet)
      tables/<table>/<writer>/<kkkkk>/<nnnnnnnnn>.parquet   parts a writer added
      segments/<writer>/<kkkkk>/<nnnnnnnnn>/               Zarr v3 array [layer, head, packed]
      writers/<app_id>.json              per writer: last flush version and its pending intent

``<writer>`` is a random id per writing process and ``<kkkkk>`` = ``<n> // 1024``, so no folder
holds more than :data:`FOLDER_FANOUT` batches and no two writers share a file. A batch is visible
once the ``docs`` table commits it.

Format 1 (read-only here; ``attnstore migrate`` converts)::

    STORE/
      attnstore.json, segments/<segment>/, tables/<table>/<segment>.parquet,
      commits/<segment>.json       written last: a batch is visible iff its commit record exists
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, TypedDict

from attnstore.errors import FormatVersionError, StoreNotFoundError

__all__ = [
    "ANALYSES",
    "BUILTIN_TABLES",
    "COMPAT_KEYS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT_KEYS",
    "MANIFEST_NAME",
    "READ_MAJORS",
    "Manifest",
    "manifest_value",
    "new_writer_id",
    "read_json",
    "read_manifest",
    "registrations",
]

FORMAT_NAME: Final = "attnstore"
#: Major.minor. Readers accept any minor of their major; additive changes bump the minor.
#: 1.1 added tokens.char_start/char_end and the words, syntax and syntax_baseline tables.
#: 2.0 keeps each table as a Delta Lake table and nests segments (no commit records).
#: 2.1 added heads.next_token/sep/learned_sink and bidirectional (encoder) stores: manifest
#: "attention": "bidirectional" with "packing": "full-rowmajor" (whole squares).
#: 2.1 adds row selections (manifest ``rows``), overviews (``overview``, ``overviews/``, the
#: ``overviews`` table) and one segment per long document written as it streams out.
FORMAT_VERSION: Final = "2.1"
#: Majors this version reads; only :data:`FORMAT_VERSION`'s major is written.
READ_MAJORS: Final = (1, 2)
MANIFEST_NAME: Final = "attnstore.json"
SEGMENTS: Final = "segments"
TABLES_DIR: Final = "tables"
OVERVIEWS: Final = "overviews"
COMMITS: Final = "commits"
WRITERS: Final = "writers"
#: The folder of plug-in table registrations (:mod:`attnstore.analyses.tables`).
ANALYSES: Final = "analyses"
#: The built-in tables, by name (their schemas: :data:`attnstore.index.SCHEMAS`, in this order).
#: Named here so that opening a store does not import the schemas.
BUILTIN_TABLES: Final = (
    "docs", "tokens", "heads", "words", "syntax", "syntax_baseline", "probes", "probe_scores",
    "sparsity", "needles", "overviews",
)  # fmt: skip
#: Batches per segment/part folder (``<kkkkk>`` above).
FOLDER_FANOUT: Final = 1024
PACKING: Final = "tril-rowmajor"
#: packing of bidirectional (encoder) stores: whole squares, row after row (since 2.1)
PACKING_FULL: Final = "full-rowmajor"

#: Manifest entries that must agree before new documents may join an existing store.
COMPAT_KEYS: Final = (
    "model", "tokenizer", "codec", "max_length", "layers", "heads", "matrices", "attention",
    "values", "rows", "overview",
)  # fmt: skip
#: Of those, the ones that define how segments are laid out: they can never differ within one store
#: (the manifest describes every segment), even with ``--allow-different``.
LAYOUT_KEYS: Final = (
    "codec", "layers", "heads", "matrices", "attention", "values", "rows", "overview",
)  # fmt: skip


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
    #: since 2.1; absent means "causal". "bidirectional": an encoder, packing "full-rowmajor".
    attention: str
    #: since 2.1; absent means "probs". "logits": pre-softmax scores + each row's log-sum-exp.
    values: str
    #: since 2.1; absent means every row. The ``--rows`` selection (attnstore.rows), e.g. "-64:".
    rows: str
    #: since 2.1; absent means none. N of ``--overview N`` (pooled N × N views per head).
    overview: int


def registrations(listing: Iterable[str]) -> list[str]:
    """The plug-in table registration files among the names of the ``analyses`` folder."""
    return [f for f in listing if f.endswith(".json") and not f.startswith(".")]


def manifest_value(manifest: Manifest, key: str) -> Any:
    """A manifest entry with the defaults of keys added in later minor versions."""
    defaults = {"matrices": True, "attention": "causal", "values": "probs"}
    return manifest.get(key, defaults.get(key))


def new_writer_id() -> str:
    """A fresh id for one writing process; it prefixes every file that process creates."""
    return secrets.token_hex(4)


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
    check_manifest_fields(doc, str(path))
    return doc  # type: ignore[return-value]


def check_manifest_fields(doc: dict[str, Any], where: str) -> None:
    """The fields readers index must have their types: one line naming the file, else."""
    from attnstore.errors import DamagedStoreError

    def ints(value: object) -> bool:
        return isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )

    def fail(key: str, expected: str) -> None:
        got = repr(doc.get(key, "nothing"))[:80] if "." not in key else "another value"
        raise DamagedStoreError(
            f"{where}: {key!r} must be {expected}. Got {got}; the manifest is damaged."
        )

    for key in ("layers", "heads"):
        if not ints(doc.get(key)):
            fail(key, "a list of integers")
    model, codec = doc.get("model"), doc.get("codec")
    if not isinstance(model, dict) or not isinstance(model.get("id"), str):
        fail("model", 'an object with a string "id"')
    if not isinstance(codec, dict) or not isinstance(codec.get("id"), str):
        fail("codec", 'an object with a string "id"')
    if "max_length" in doc and not (
        isinstance(doc["max_length"], int) and not isinstance(doc["max_length"], bool)
    ):
        fail("max_length", "an integer")


def parse_format_version(value: object) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in str(value).split("."))
    except ValueError:
        raise FormatVersionError(
            f"Expected a format_version like {FORMAT_VERSION!r}. Got {value!r} instead."
        ) from None
    if major not in READ_MAJORS:
        raise FormatVersionError(
            f"This store has format version {value}; this attnstore reads versions "
            f"{', '.join(f'{m}.x' for m in READ_MAJORS)}. Upgrade attnstore "
            "(pip install -U attnstore) to read it."
        )
    return major, minor
