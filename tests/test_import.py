"""``import attnstore`` stays light: no torch, transformers or zarr until they are needed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def test_import_is_light() -> None:
    code = "import sys, attnstore; print(sorted(m for m in ('torch', 'transformers', 'zarr', 'duckdb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_without_heavy_imports() -> None:
    code = "import sys; from attnstore.cli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


#: What reading one matrix must not load: delta-rs, Arrow datasets and pandas (the docs lookup
#: reads Parquet directly), and the extraction stack.
NOT_FOR_A_MATRIX = ("deltalake", "pandas", "pyarrow.dataset", "torch", "transformers", "duckdb")


def _modules_after_one_matrix(path: Path) -> list[str]:
    code = (
        "import sys, attnstore\n"
        f"store = attnstore.open({str(path)!r})\n"
        "assert store.matrix(1, store.manifest['layers'][0], store.manifest['heads'][0]).ndim == 2\n"
        f"print(sorted(m for m in {NOT_FOR_A_MATRIX!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip())  # type: ignore[no-any-return]


def test_reading_a_matrix_loads_no_delta_rs_pandas_or_torch(tmp_path: Path) -> None:
    from attnstore.compact import compact
    from tests.synthetic import write_synthetic_store

    golden = Path(__file__).resolve().parent / "golden" / "v2.1.attn"
    assert _modules_after_one_matrix(golden) == []
    store = write_synthetic_store(tmp_path / "s.attn", n_docs=3)
    compact(store)  # a checkpoint, and parts replaced: the log reader replays both
    assert _modules_after_one_matrix(store) == []

