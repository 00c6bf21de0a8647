"""Corpora from Hugging Face ``datasets``: save_to_disk folders, the local cache, Parquet globs."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnstore.corpus import STREAM_ROWS, read_corpus
from attnstore.errors import CorpusError

TRAIN = ["first doc", "", "third doc", "fourth"]
TEST = ["held out", "held out again"]


def texts(spec: str, **kw: str) -> list[tuple[int, str]]:
    return [(d.doc_id, d.text) for d in read_corpus(spec, **kw)]


def numbered(values: list[str]) -> list[tuple[int, str]]:
    return list(enumerate(values))


def test_save_to_disk_dataset_and_dict(tmp_path: Path) -> None:
    one = datasets.Dataset.from_dict({"body": TRAIN, "n": list(range(len(TRAIN)))})
    one.save_to_disk(str(tmp_path / "one"))
    assert texts(str(tmp_path / "one"), text_field="body") == numbered(TRAIN)
    with pytest.raises(CorpusError, match=r"no column 'text'\. Columns: \['body', 'n'\].*--text"):
        list(read_corpus(str(tmp_path / "one")))
    with pytest.raises(CorpusError, match=r"one dataset, not splits; drop '@train'"):
        read_corpus(f"{tmp_path / 'one'}@train", text_field="body")

    both = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": TRAIN}),
        test=datasets.Dataset.from_dict({"text": TEST}),
    )
    both.save_to_disk(str(tmp_path / "both"))
    assert texts(f"{tmp_path / 'both'}@test") == numbered(TEST)
    assert texts(f"{tmp_path / 'both'}@train") == numbered(TRAIN)
    with pytest.raises(CorpusError, match=r"several splits \['test', 'train'\].*@SPLIT"):
        read_corpus(str(tmp_path / "both"))
    with pytest.raises(CorpusError, match=r"no split 'valid'\. Splits: \['test', 'train'\]"):
        read_corpus(f"{tmp_path / 'both'}@valid")


def test_save_to_disk_non_string_column(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(CorpusError, match=r"column 'text' must hold strings\. Got int"):
        list(read_corpus(str(tmp_path / "ints")))


def test_select_before_save_keeps_positions(tmp_path: Path) -> None:
    """A shuffled or filtered dataset is saved flattened: ids are positions in what was saved."""
    ds = datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(600)]})
    picked = ds.select(range(599, 0, -2))  # an indices mapping over 300 rows, reversed
    picked.save_to_disk(str(tmp_path / "picked"))
    got = texts(str(tmp_path / "picked"))
    assert got == [(i, f"doc {599 - 2 * i}") for i in range(300)]


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local ``datasets`` cache built by ``datasets`` itself from local files, offline: 'tiny'
    with configs 'default' and 'other', and the same under a namespace as 'me/tiny'."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "hf" / "datasets"
    files = {}
    for split, rows in {"train": TRAIN, "test": TEST}.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(pa.table({"text": rows, "label": [0] * len(rows)}), files[split])
    for config in ("default", "other"):
        builder = Parquet(
            cache_dir=str(cache), dataset_name="tiny", config_name=config, config_id=config,
            hash="0123abcd", data_files=files,
        )  # fmt: skip
        builder.download_and_prepare()
    # A Hub dataset 'me/tiny' is cached as 'me___tiny' (what load_dataset writes online).
    shutil.copytree(cache / "tiny", cache / "me___tiny")
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


def test_hf_cache_by_name_config_split(hf_cache: Path) -> None:
    assert texts("hf:tiny:default@train") == numbered(TRAIN)
    assert texts("hf:me/tiny:other@test") == numbered(TEST)


def test_hf_cache_errors(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CorpusError, match=r"several configs of 'me/tiny'.*'hf:me/tiny:CONFIG'"):
        read_corpus("hf:me/tiny@train")
    with pytest.raises(CorpusError, match=r"several splits \['test', 'train'\].*@SPLIT"):
        read_corpus("hf:me/tiny:default")
    with pytest.raises(CorpusError, match=r"no column 'body'\. Columns: \['text', 'label'\]"):
        read_corpus("hf:tiny:default@test", text_field="body")
    with pytest.raises(
        CorpusError, match=r"'me/nope' is not in the local Hugging Face datasets cache"
    ) as err:
        read_corpus("hf:me/nope@train")
    assert str(hf_cache) in str(err.value)
    assert "never downloads" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(CorpusError, match=r"\(config 'third'\) is not in the local"):
        read_corpus("hf:me/tiny:third@train")
    with pytest.raises(CorpusError, match=r"Expected 'hf:NAME\[:CONFIG\]\[@SPLIT\]'"):
        read_corpus("hf:a/b/c")
    # HF_DATASETS_CACHE wins over HF_HOME, read when the corpus is opened.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache.parent / "elsewhere"))
    with pytest.raises(CorpusError, match=r"elsewhere"):
        read_corpus("hf:tiny:default@train")


def test_parquet_glob_counts_on_across_files(tmp_path: Path) -> None:
    for i, rows in enumerate([["a", "b"], [], ["c"], ["d", None]]):
        pq.write_table(
            pa.table({"text": pa.array(rows, pa.string())}),
            tmp_path / f"train-{i:05d}-of-00004.parquet",
        )
    pq.write_table(pa.table({"text": ["not me"]}), tmp_path / "test-00000-of-00001.parquet")
    got = texts(str(tmp_path / "train-*.parquet"))
    assert got == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "")]
    with pytest.raises(CorpusError, match=r"No file matches the Parquet glob"):
        read_corpus(str(tmp_path / "valid-*.parquet"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CorpusError, match=r"not \.parquet: \['.*notes\.txt'\]"):
        read_corpus(str(tmp_path / "*"))


def test_large_parquet_is_streamed(tmp_path: Path) -> None:
    """A 24 MB text column in 100-row groups is read with about one row group of Arrow memory
    at a time (not the whole file, which Parquet's default pre-buffering would load)."""
    rng = np.random.default_rng(0)
    n_docs, doc_chars = 6000, 4000
    letters = np.frombuffer(b"abcdefghij klmnopqrstuvwxyz", dtype=np.uint8)
    path = tmp_path / "big.parquet"
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for _ in range(0, n_docs, 500):
            rows = [
                rng.choice(letters, doc_chars).tobytes().decode() for _row in range(500)
            ]  # incompressible enough
            writer.write_table(pa.table({"text": rows}), row_group_size=100)
    total = n_docs * doc_chars

    docs = read_corpus(str(path))
    base = pa.total_allocated_bytes()
    first = next(docs)
    assert first.doc_id == 0
    assert pa.total_allocated_bytes() - base < total / 8  # nothing like the whole file yet
    peak, count = 0, 1
    for doc in docs:
        assert doc.doc_id == count
        count += 1
        if count % STREAM_ROWS == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == n_docs
    assert peak < total / 8, (peak, total)


def test_extract_cli_from_a_saved_split(tmp_path: Path, llama_dir: Path) -> None:
    from click.testing import CliRunner

    import attnstore
    from attnstore.cli import cli

    both = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"body": TRAIN}),
        test=datasets.Dataset.from_dict({"body": TEST}),
    )
    both.save_to_disk(str(tmp_path / "both"))
    out = tmp_path / "hf.attn"
    args = ["extract", "--out", str(out), "-m", str(llama_dir), "-c", f"{tmp_path / 'both'}@train",
            "--text-field", "body", "--max-length", "16", "-q", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    store = attnstore.open(str(out))
    rows = store.sql("SELECT doc_id, skipped FROM docs ORDER BY doc_id").to_pylist()
    assert rows == [
        {"doc_id": i, "skipped": "empty" if not t else None} for i, t in enumerate(TRAIN)
    ]
    missing = CliRunner().invoke(cli, [*args[:6], "hf:nobody/nothing@train"])
    assert missing.exit_code == 1
    assert "is not in the local Hugging Face datasets cache" in missing.output
