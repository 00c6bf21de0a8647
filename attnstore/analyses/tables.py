"""Plug-in tables: an analysis's tables registered in the store itself (``schemas/analyses.md``).

The built-in tables have their schemas in code (:mod:`attnstore.index`). A table that an analysis
adds has its schema recorded in the store, in ``analyses/<table>.json`` (the format of
``schemas/tables/*.json``, plus the analysis that owns it), written once, before the first commit
to the table (a conditional create: of two writers registering one table, one writes the file and
the other checks it). Readers, DuckDB views, ``compact``, ``verify`` and object storage read the
registrations, so a plug-in table is handled like a built-in one: a Delta table under
``tables/<table>/``, rows sorted by ``doc_id`` (then ``layer``, ``head`` when present), crash-safe
and resumable. A registered table with no commit yet reads as empty.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa

from attnstore import index
from attnstore.errors import AnalysisError, DamagedStoreError
from attnstore.layout import ANALYSES, FORMAT_VERSION, registrations

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from attnstore.storage import Storage

__all__ = [
    "ANALYSES_DIR",
    "TYPES",
    "TableSpec",
    "build_table",
    "builtin_tables",
    "check_name",
    "register",
    "registered",
    "schemas",
    "sort_keys",
]

#: The store folder holding one registration file per plug-in table.
ANALYSES_DIR: Final = ANALYSES
#: Column types a plug-in table may use (the ones Delta Lake and DuckDB store as they are).
TYPES: Final = (
    "bool", "int8", "int16", "int32", "int64", "float", "double", "string", "binary",
    "date32[day]",
)  # fmt: skip
_NAME: Final = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class TableSpec:
    """One plug-in table: its name, schema, row order and owning analysis."""

    name: str
    schema: pa.Schema
    sorted_by: tuple[str, ...]
    analysis: str

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.name,
            "analysis": self.analysis,
            "format_version": FORMAT_VERSION,
            "path": f"tables/{self.name}/ (a Delta Lake table)",
            "sorted_by": list(self.sorted_by),
            "columns": [
                {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in self.schema
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TableSpec:
        fields = [
            pa.field(c["name"], pa.type_for_alias(c["type"]), nullable=bool(c["nullable"]))
            for c in doc["columns"]
        ]
        return cls(doc["table"], pa.schema(fields), tuple(doc["sorted_by"]), doc["analysis"])

    def same_as(self, other: TableSpec) -> bool:
        return (
            self.schema.remove_metadata().equals(other.schema.remove_metadata())
            and self.sorted_by == other.sorted_by
        )


def check_name(analysis: str, name: str) -> None:
    """Refuse a table name that is not ``[a-z][a-z0-9_]*`` or that is a built-in table's."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AnalysisError(
            analysis, f"Analysis {analysis!r}: table name {name!r} is not [a-z][a-z0-9_]*."
        )
    if name in index.SCHEMAS:
        raise AnalysisError(
            analysis,
            f"Analysis {analysis!r}: table name {name!r} clashes with the built-in table {name!r}.",
        )


def sort_keys(schema: pa.Schema) -> tuple[str, ...]:
    """``doc_id``, then ``layer`` and ``head`` when the table has them."""
    return ("doc_id", *(k for k in ("layer", "head") if k in schema.names))


def spec_for(analysis: str, name: str, schema: Any) -> TableSpec:
    """Check ``schema`` of table ``name`` of ``analysis`` and describe the table."""
    check_name(analysis, name)
    if not isinstance(schema, pa.Schema):
        raise AnalysisError(
            analysis, f"Analysis {analysis!r}: schema of {name!r} is not a pyarrow.Schema."
        )
    where = f"Analysis {analysis!r}, table {name!r}"
    if len(set(schema.names)) != len(schema.names):
        raise AnalysisError(analysis, f"{where}: column names repeat ({schema.names}).")
    if "doc_id" not in schema.names or schema.field("doc_id").type != pa.int64():
        raise AnalysisError(analysis, f"{where}: the schema needs a doc_id column of int64.")
    for key in ("layer", "head"):
        if key in schema.names and not pa.types.is_integer(schema.field(key).type):
            raise AnalysisError(analysis, f"{where}: column {key!r} must be an integer (int32).")
    for f in schema:
        if str(f.type) not in TYPES:
            raise AnalysisError(
                analysis,
                f"{where}: column {f.name!r} has type {f.type}; expected one of {', '.join(TYPES)}.",
            )
    return TableSpec(name, schema.remove_metadata(), sort_keys(schema), analysis)


def _rel(name: str) -> str:
    return f"{ANALYSES_DIR}/{name}.json"


def registered(storage: Storage) -> dict[str, TableSpec]:
    """The plug-in tables registered in the store (none in stores written before plug-ins)."""
    out: dict[str, TableSpec] = {}
    for file in registrations(storage.list(ANALYSES_DIR)):
        rel = f"{ANALYSES_DIR}/{file}"
        try:  # store metadata is untrusted: a name becomes a folder and a SQL view
            spec = TableSpec.from_json(json.loads(storage.read_bytes(rel)))
            ok = (
                _NAME.match(spec.name) is not None
                and spec.name == file.removesuffix(".json")
                and spec.name not in index.SCHEMAS
                and set(spec.sorted_by) <= set(spec.schema.names)
            )
        except (ValueError, KeyError, TypeError) as err:
            raise DamagedStoreError(f"{rel}: not a table registration ({err}).") from None
        if not ok:
            raise DamagedStoreError(
                f"{rel}: table name {spec.name!r} is not [a-z][a-z0-9_]* named like its file, "
                "or is a built-in table's; refused."
            )
        out[spec.name] = spec
    return out


def register(storage: Storage, specs: Iterable[TableSpec]) -> None:
    """Record ``specs`` in the store; a table registered before must have the same schema."""
    for spec in specs:
        data = (json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n").encode()
        rel = _rel(spec.name)
        if not storage.exists(rel) and storage.create_bytes(rel, data):
            continue
        have = TableSpec.from_json(json.loads(storage.read_bytes(rel)))
        if have.analysis != spec.analysis:
            raise AnalysisError(
                spec.analysis,
                f"Analysis {spec.analysis!r}: table {spec.name!r} of this store belongs to the "
                f"analysis {have.analysis!r}; rename the table.",
            )
        if not have.same_as(spec):
            raise AnalysisError(
                spec.analysis,
                f"Analysis {spec.analysis!r}: table {spec.name!r} of this store has another "
                f"schema ({have.schema.names}); write to a new store or rename the table.",
            )


def schemas(storage: Storage | None) -> dict[str, pa.Schema]:
    """Every table a store may hold: the built-in ones, then its plug-in tables."""
    out = dict(index.SCHEMAS)
    if storage is not None:
        out.update({n: s.schema for n, s in registered(storage).items() if n not in out})
    return out


def build_table(spec: TableSpec, parts: list[pa.Table]) -> pa.Table:
    """The rows of several batches of one plug-in table, as one sorted table of its schema."""
    table = pa.concat_tables([p.select(spec.schema.names).cast(spec.schema) for p in parts])
    if table.num_rows:
        table = table.sort_by([(k, "ascending") for k in spec.sorted_by])
    return table.combine_chunks()


def builtin_tables(
    columns: Mapping[str, dict[str, Any]], names: Iterable[str]
) -> dict[str, pa.Table]:
    """Built-in tables ``names`` from column dicts (an absent or empty one: no rows)."""
    return {
        n: index.table_from_columns(n, columns[n]) if columns.get(n) else index.empty_table(n)
        for n in names
    }
