"""The code and the written spec in schemas/ agree, and yesterday's store still reads."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest

import attnstore
from attnstore import index, layout

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
GOLDEN = Path(__file__).resolve().parent / "golden"


def load(name: str) -> dict[str, typing.Any]:
    return json.loads((SCHEMAS / name).read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("table", index.TABLES)
def test_table_specs_match_code(table: str) -> None:
    spec = load(f"tables/{table}.json")
    schema = index.SCHEMAS[table]
    assert [c["name"] for c in spec["columns"]] == schema.names
    for col in spec["columns"]:
        field = schema.field(col["name"])
        assert col["type"] == str(field.type), col["name"]
        assert col["nullable"] == field.nullable, col["name"]
    assert tuple(spec["sorted_by"]) == index.SORT_KEYS[table]
    assert spec["format_version"] == layout.FORMAT_VERSION


def test_manifest_typeddict_matches_schema() -> None:
    schema = load("manifest.schema.json")
    assert set(schema["required"]) == layout.Manifest.__required_keys__
    assert set(schema["properties"]) == set(typing.get_type_hints(layout.Manifest))
    assert set(schema["properties"]["model"]["required"]) == set(
        typing.get_type_hints(layout.ModelInfo)
    )
    assert set(schema["properties"]["tokenizer"]["required"]) == set(
        typing.get_type_hints(layout.TokenizerInfo)
    )


GOLDEN_VERSIONS = sorted(p.name.removesuffix(".attn") for p in GOLDEN.glob("v*.attn"))


def test_golden_store_of_this_version_exists() -> None:
    assert f"v{layout.FORMAT_VERSION}" in GOLDEN_VERSIONS  # run scripts/make_golden.py


@pytest.mark.parametrize("root", ["fresh", *GOLDEN_VERSIONS])
def test_written_documents_validate(root: str, llama_store: Path) -> None:
    path = llama_store if root == "fresh" else GOLDEN / f"{root}.attn"
    jsonschema.validate(
        json.loads((path / "attnstore.json").read_text()), load("manifest.schema.json")
    )
    commits = sorted((path / "commits").glob("*.json"))
    assert commits
    for c in commits:
        record = json.loads(c.read_text())
        jsonschema.validate(record, load("commit.schema.json"))
        for table, rel in record["tables"].items():
            written = pq.read_schema(path / rel).remove_metadata()
            current = index.SCHEMAS[table]
            # older minors: a prefix of today's columns (additions only, never changes)
            assert list(written) == list(current)[: len(written)]


def test_schema_rejects_what_it_should() -> None:
    manifest = json.loads(
        (GOLDEN / f"v{layout.FORMAT_VERSION}.attn" / "attnstore.json").read_text()
    )
    manifest["codec"].pop("scale")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, load("manifest.schema.json"))


def test_golden_store_reads_exactly() -> None:
    store = attnstore.open(str(GOLDEN / "v1.0.attn"))
    expected = np.load(GOLDEN / "v1.0.expected.npz")
    for d in (0, 2):
        np.testing.assert_array_equal(store.matrices(d), expected[f"matrix_{d}"])
    heads = store.sql("SELECT * FROM heads ORDER BY doc_id, layer, head")
    for name in heads.column_names:
        np.testing.assert_array_equal(
            heads[name].to_numpy(zero_copy_only=False), expected[f"heads_{name}"]
        )
    assert store.sql("SELECT skipped FROM docs WHERE doc_id = 1").column(0)[0].as_py() == "empty"


def test_newer_major_version_is_refused(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "s.attn"
    shutil.copytree(GOLDEN / f"v{layout.FORMAT_VERSION}.attn", copy)
    manifest = json.loads((copy / "attnstore.json").read_text())
    manifest["format_version"] = "2.0"
    (copy / "attnstore.json").write_text(json.dumps(manifest))
    with pytest.raises(attnstore.FormatVersionError, match="Upgrade attnstore"):
        attnstore.open(str(copy))
    manifest["format_version"] = "1.7"  # a newer minor adds only: still readable
    (copy / "attnstore.json").write_text(json.dumps(manifest))
    assert attnstore.open(str(copy)).matrix(0, 0, 0).shape[0] > 0
