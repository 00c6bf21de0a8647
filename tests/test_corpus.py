"""Corpus readers: every accepted format, stable ids, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnstore.corpus import InductionProbe, parse_probe, read_corpus
from attnstore.errors import CorpusError


def texts(spec: str, **kw: str) -> list[tuple[int, str]]:
    return [(d.doc_id, d.text) for d in read_corpus(spec, **kw)]


def test_txt_keeps_empty_lines_as_ids(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_bytes(b"a b\n\nc\r\n")
    assert texts(str(p)) == [(0, "a b"), (1, ""), (2, "c")]


def test_jsonl_and_text_field(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n\n" + json.dumps({"body": "y"}) + "\n")
    assert texts(str(p), text_field="body") == [(0, "x"), (1, ""), (2, "y")]
    with pytest.raises(
        CorpusError, match=r"c\.jsonl:1: expected an object with a 'text' field.*--text-field"
    ):
        list(read_corpus(str(p)))


def test_jsonl_non_string_and_bad_json(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"must be a string\. Got int"):
        list(read_corpus(str(p)))
    p.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match=r":2: not valid JSON"):
        list(read_corpus(str(p)))


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b"], "id": [1, 2, 3]}), p)
    assert texts(str(p)) == [(0, "a"), (1, ""), (2, "b")]
    with pytest.raises(CorpusError, match=r"no column 'body'. Columns: \['text', 'id'\]"):
        list(read_corpus(str(p), text_field="body"))


def test_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\nstill first")
    (tmp_path / "skip.md").write_text("not a doc")
    assert texts(str(tmp_path)) == [(0, "first\nstill first"), (1, "second")]


def test_pydoc_default() -> None:
    docs = texts("pydoc:topics")
    assert len(docs) > 50
    assert docs == texts("pydoc:topics")
    assert texts(None)[:3] == docs[:3]  # type: ignore[arg-type]


def test_bad_bytes(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(CorpusError, match=r"c\.txt:2 is not valid UTF-8"):
        list(read_corpus(str(p)))
    p.write_bytes(b"a\x00b\n")
    with pytest.raises(CorpusError, match="NUL byte"):
        list(read_corpus(str(p)))


def test_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(CorpusError, match=r"Unknown corpus type '\.csv'"):
        read_corpus(str(tmp_path / "c.csv"))


def test_probe_options() -> None:
    assert parse_probe("probe:induction") == InductionProbe()
    assert parse_probe("probe:induction?n=7&reps=3&count=2&seed=9") == InductionProbe(7, 3, 2, 9)
    with pytest.raises(CorpusError, match="Unknown probe option 'x'"):
        parse_probe("probe:induction?x=1")
    with pytest.raises(CorpusError, match="must be an integer"):
        parse_probe("probe:induction?n=a")
    with pytest.raises(CorpusError, match="≥ 1"):
        parse_probe("probe:induction?n=0")
