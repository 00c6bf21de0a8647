"""Shared fixtures: tiny random-init models built from a config, saved to a temporary folder
(see attnstore.testing), so tests need neither a model hub nor the 98 MB default model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from tests.s3 import s3, s3_server  # noqa: F401  (loopback S3 fixtures, see tests/s3.py)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def pytest_report_header() -> list[str]:
    names = ["torch", "transformers", "zarr", "numcodecs", "pyarrow", "duckdb"]
    return ["deps: " + ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from attnstore.testing import save_tiny_tokenizer

    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Llama family with GQA: 3 layers, 4 query heads sharing 2 kv heads, rotary embeddings."""
    from attnstore.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """GPT-2: learned positions, fused qkv, per-layer inverse scaling switched on."""
    from attnstore.testing import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), tokenizer_dir)


@pytest.fixture
def corpus_txt(tmp_path: Path) -> Path:
    lines = [
        "The cat sat on the mat and the cat slept.",
        "",
        "Attention heads attend; induction heads copy what came after an earlier copy.",
        "   ",
        "def f(x): return x + 1  # the same tokens again: def f(x): return x + 1",
        "Short.",
        (
            "A longer line of ordinary English prose that goes on for a while, so that the batch has "
            "documents of quite different lengths and padding matters a great deal here."
        ),
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def llama_store(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """A small store from the tiny Llama over the first 12 pydoc topics (shared, read-only)."""
    import attnstore

    out = tmp_path_factory.mktemp("stores") / "llama.attn"
    attnstore.extract(
        str(out),
        model=str(llama_dir),
        corpus="pydoc:topics",
        limit=12,
        max_length=96,
        batch_size=3,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def viewer_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers × 4 heads, planted previous-token and sink heads, one 4,096-token document
    (tests/viewer_store.py; shared by the serve API and browser tests, read-only)."""
    from tests.viewer_store import write_viewer_store

    return write_viewer_store(tmp_path_factory.mktemp("stores") / "viewer.attn")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where CUDA exists and are skipped, with the reason, everywhere else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
