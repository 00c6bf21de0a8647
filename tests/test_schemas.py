"""The code and the written spec in schemas/ agree, and yesterday's store still reads."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

import attnstore
from attnstore import index, layout
from tests.helpers import GOLDEN, ROOT

SCHEMAS = ROOT / "schemas"


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
    manifest = json.loads((path / "attnstore.json").read_text())
    jsonschema.validate(manifest, load("manifest.schema.json"))
    if manifest["format_version"].startswith("1."):
        commits = sorted((path / "commits").glob("*.json"))
        assert commits
        for c in commits:
            record = json.loads(c.read_text())
            jsonschema.validate(record, load("commit.schema.json"))
            for table, rel in record["tables"].items():
                written = pq.read_schema(path / rel).remove_metadata()
                current = index.SCHEMAS[table]
                # older minors: today's columns minus additions, in order (never changes)
                assert [f for f in written if f.name in current.names] == list(written)
        return
    writers = sorted((path / "writers").glob("*.json"))
    assert writers
    for w in writers:
        jsonschema.validate(json.loads(w.read_text()), load("writer.schema.json"))
    tables = [d.name for d in (path / "tables").iterdir() if (d / "_delta_log").is_dir()]
    assert {"docs", "tokens", "heads"} <= set(tables)
    for table in tables:
        dt = DeltaTable(str(path / "tables" / table))
        written = pa.schema(dt.schema().to_arrow())
        current = index.SCHEMAS[table]
        # an older minor of this major: today's columns minus later additions, in order
        assert written.names == current.names[: len(written.names)]
        if manifest["format_version"] == layout.FORMAT_VERSION:
            assert written.names == current.names
        for field in written:
            assert field.nullable == current.field(field.name).nullable, field.name
        for f in dt.file_uris():  # every part has exactly the table's columns and types
            part = pq.read_schema(f).remove_metadata()
            assert part == pa.schema([current.field(n) for n in written.names]), f


def test_spec_states_the_code_defaults() -> None:
    from attnstore import compact, store

    text = " ".join((SCHEMAS / "README.md").read_text().split())
    assert f"`commit_every` batches ({store.DEFAULT_COMMIT_EVERY} for `extract`" in text
    assert f"`commit_seconds` seconds ({store.DEFAULT_COMMIT_SECONDS:g}," in text
    assert f"no folder holds more than {layout.FOLDER_FANOUT:,} batches" in text
    assert f"default {compact.DEFAULT_RETENTION_HOURS};" in text
    assert f"more than {compact.AUTO_COMPACT_PARTS} parts" in text
    assert f"row groups of {index.ROW_GROUP_ROWS:,} rows" in text
    assert tuple(store.FAULT_POINTS[-4:]) == ("commit:tokens", "commit:heads", "commit:docs",
                                              "committed")  # fmt: skip


def test_schema_rejects_what_it_should() -> None:
    manifest = json.loads(
        (GOLDEN / f"v{layout.FORMAT_VERSION}.attn" / "attnstore.json").read_text()
    )
    manifest["codec"].pop("scale")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, load("manifest.schema.json"))


@pytest.mark.parametrize("version", GOLDEN_VERSIONS)
def test_golden_store_reads_exactly(version: str) -> None:
    store = attnstore.open(str(GOLDEN / f"{version}.attn"))
    expected = np.load(GOLDEN / f"{version}.expected.npz", allow_pickle=True)  # ours: str columns
    matrices = [k for k in expected.files if k.startswith("matrix_")]
    assert matrices
    for key in matrices:
        d = int(key.removeprefix("matrix_"))
        np.testing.assert_array_equal(store.matrices(d), expected[key])
    for key in (k for k in expected.files if k.startswith("overview_")):  # since 2.1
        _, kind, d = key.split("_")
        layers, heads = store.manifest["layers"], store.manifest["heads"]
        for i, la in enumerate(layers):
            for j, h in enumerate(heads):
                got = store.overview(int(d), la, h, kind)
                np.testing.assert_array_equal(got, expected[key][i, j])
    for table, order in (("heads", "doc_id, layer, head"),
                         ("syntax", "doc_id, layer, head, relation, direction")):  # fmt: skip
        if f"{table}_doc_id" not in expected.files:
            continue
        rows = store.sql(f"SELECT * FROM {table} ORDER BY {order}")
        for name in rows.column_names:
            if f"{table}_{name}" in expected.files:  # columns added later read as NULL
                np.testing.assert_array_equal(
                    rows[name].to_numpy(zero_copy_only=False), expected[f"{table}_{name}"]
                )
    if version == "v1.0":
        assert store.sql("SELECT skipped FROM docs WHERE doc_id = 1").column(0)[0].as_py() == "empty"


def test_format_1_is_read_only_and_migrates(tmp_path: Path) -> None:
    from attnstore.migrate import migrate
    from attnstore.store import StoreWriter
    from attnstore.verify import verify_store
    from tests.helpers import assert_same_content, store_content

    old = GOLDEN / "v1.1.attn"
    manifest = json.loads((old / "attnstore.json").read_text())
    with pytest.raises(attnstore.IncompatibleStoreError, match="attnstore migrate"):
        StoreWriter(old, manifest)
    new = tmp_path / "new.attn"
    report = migrate(old, new)
    assert report["format_version"] == layout.FORMAT_VERSION
    assert attnstore.open(str(new)).manifest["format_version"] == layout.FORMAT_VERSION
    assert verify_store(new).ok
    assert_same_content(store_content(new), store_content(old))
    a, b = attnstore.open(str(old)), attnstore.open(str(new))
    q = "SELECT * FROM syntax ORDER BY ALL"
    assert a.sql(q).num_rows > 0
    assert a.sql(q) == b.sql(q)
    assert b.commits[0]["parser"] == a.commits[0]["parser"]
    with pytest.raises(attnstore.StoreExistsError):
        migrate(old, new)


def test_newer_major_version_is_refused(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "s.attn"
    shutil.copytree(GOLDEN / f"v{layout.FORMAT_VERSION}.attn", copy)
    manifest = json.loads((copy / "attnstore.json").read_text())
    manifest["format_version"] = "3.0"
    (copy / "attnstore.json").write_text(json.dumps(manifest))
    with pytest.raises(attnstore.FormatVersionError, match="Upgrade attnstore"):
        attnstore.open(str(copy))
    manifest["format_version"] = "2.7"  # a newer minor adds only: still readable
    (copy / "attnstore.json").write_text(json.dumps(manifest))
    assert attnstore.open(str(copy)).matrix(0, 0, 0).shape[0] > 0
