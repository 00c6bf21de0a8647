"""``import attnstore`` stays light: no torch, transformers or zarr until they are needed."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light() -> None:
    code = "import sys, attnstore; print(sorted(m for m in ('torch', 'transformers', 'zarr', 'duckdb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_without_heavy_imports() -> None:
    code = "import sys; from attnstore.cli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
