"""``import attnstore`` stays light: no torch, transformers or zarr until they are needed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import GOLDEN


def test_import_is_light() -> None:
    code = "import sys, attnstore; print(sorted(m for m in ('torch', 'transformers', 'zarr', 'duckdb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_without_heavy_imports() -> None:
    code = "import sys; from attnstore.cli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


#: What reading one matrix must not load: delta-rs, Arrow datasets and pandas (the docs lookup
#: reads Parquet directly), the extraction stack, zarr (segments are read without it,
#: attnstore.store.shards), and the table schemas and analyses (issue 18: a fresh process's first
#: read).
NOT_FOR_A_MATRIX = (
    "deltalake", "pandas", "pyarrow.dataset", "torch", "transformers", "duckdb", "zarr",
    "attnstore.index", "attnstore.analyses",
)  # fmt: skip


def _modules_after_one_matrix(path: Path) -> list[str]:
    """Modules of :data:`NOT_FOR_A_MATRIX` loaded by a whole matrix and a few rows of another; then
    whether zarr is loaded after an overview (in stores with them) as well."""
    code = (
        "import sys, attnstore\n"
        f"store = attnstore.open({str(path)!r})\n"
        "layer, head = store.manifest['layers'][0], store.manifest['heads'][0]\n"
        "assert store.matrix(1, layer, head).ndim == 2\n"
        "assert store.matrix(1, layer, store.manifest['heads'][-1], rows=slice(1, 3)).shape[0] == 2\n"
        f"print(sorted(m for m in {NOT_FOR_A_MATRIX!r} if m in sys.modules))\n"
        "if store.manifest.get('overview'):\n"
        "    assert store.overview(1, layer, head).ndim == 2\n"
        "print('zarr' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, zarr_after_overview = out.stdout.split("\n")[:2]
    assert zarr_after_overview == "False"
    return ast.literal_eval(loaded)  # type: ignore[no-any-return]


def test_reading_a_matrix_loads_no_delta_rs_pandas_torch_or_zarr(tmp_path: Path) -> None:
    from attnstore.compact import compact
    from tests.synthetic import write_synthetic_store

    golden = GOLDEN / "v2.1.attn"
    assert _modules_after_one_matrix(golden) == []
    store = write_synthetic_store(tmp_path / "s.attn", n_docs=3)
    compact(store)  # a checkpoint, and parts replaced: the log reader replays both
    assert _modules_after_one_matrix(store) == []


def _import_graph() -> dict[str, set[str]]:
    """attnstore's modules and the attnstore modules each imports: at module level, inside
    functions and under ``TYPE_CHECKING`` alike, plus the packages an import enters (importing
    ``a.b.c`` runs ``a/b/__init__.py``) other than the importer's own."""
    import attnstore

    root = Path(attnstore.__file__).parent
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative (banned by ruff, but counted if present)
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets.update(known(f"{base}.{a.name}") for a in node.names)
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        entered = {
            ".".join(t.split(".")[:i]) for t in targets if t for i in range(1, t.count(".") + 1)
        }
        graph[module] = {t for t in targets | entered if t and t in modules and t not in own}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    """No two attnstore modules import each other, directly or around a circle, counting imports
    inside functions and under TYPE_CHECKING."""
    graph = _import_graph()
    assert len(graph) > 50  # the walk saw the package
    assert "attnstore.store.reader" in graph["attnstore.store"]
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_table_names_opening_reads_are_the_schemas_names() -> None:
    """Opening a store names the tables from :mod:`attnstore.layout` (without importing the
    schemas); the names and the plug-in folder are those of the schemas' modules."""
    from attnstore import index, layout
    from attnstore.analyses import tables as plugin_tables

    assert layout.BUILTIN_TABLES == index.TABLES
    assert layout.ANALYSES == plugin_tables.ANALYSES_DIR
