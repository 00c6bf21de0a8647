"""Corpora: where documents come from, each with a stable ``doc_id`` (its 0-based input position).

Accepted specs (see :func:`read_corpus`):

- ``path.txt``: one document per line; empty lines are documents too (they are skipped later and
  counted), so ids stay positions in the file.
- ``path.jsonl``: one JSON object per line, text in ``text_field`` (default ``"text"``).
- ``path.parquet``: column ``text_field``.
- ``path.conllu``: gold dependency parses (documents split at ``# newdoc``, else one sentence each).
- a folder: every ``*.txt`` file (sorted by name) is one document.
- ``pydoc:topics``: the built-in sample, Python's own ``pydoc_data.topics`` (sorted by topic).
- ``probe:induction[?n=50&reps=2&count=20&seed=0]``: random token ids repeated (spec/scores.md);
  needs the tokenizer, so it yields token ids rather than text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from attnstore.errors import CorpusError
from attnstore.syntax import Word, read_conllu

__all__ = ["DEFAULT_CORPUS", "Document", "InductionProbe", "parse_probe", "read_corpus"]

DEFAULT_CORPUS: Final = "pydoc:topics"


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str
    #: pre-tokenized input (the induction probe); None means "tokenize ``text``"
    token_ids: tuple[int, ...] | None = None
    #: a gold parse (CoNLL-U corpora); None means "parse with --parse, or not at all"
    words: tuple[Word, ...] | None = None


@dataclass(frozen=True)
class InductionProbe:
    """``n`` random ordinary token ids, repeated ``reps`` times, ``count`` documents, seeded."""

    n: int = 50
    reps: int = 2
    count: int = 20
    seed: int = 0


def parse_probe(spec: str) -> InductionProbe:
    """``probe:induction?n=50&reps=2`` → :class:`InductionProbe`."""
    parts = urlsplit(spec)
    if parts.scheme != "probe" or parts.path != "induction":
        raise CorpusError(
            f"Expected 'probe:induction[?n=..&reps=..&count=..&seed=..]'. Got {spec!r}."
        )
    known = {"n", "reps", "count", "seed"}
    values: dict[str, int] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in known:
            raise CorpusError(
                f"Unknown probe option {key!r} in {spec!r}. Expected: {sorted(known)}."
            )
        try:
            values[key] = int(value)
        except ValueError:
            raise CorpusError(f"Probe option {key} must be an integer. Got {value!r}.") from None
    probe = InductionProbe(**values)
    if probe.n < 1 or probe.reps < 1 or probe.count < 1:
        raise CorpusError(f"Probe n, reps and count must be ≥ 1. Got {probe}.")
    return probe


def _decode_line(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{where} is not valid UTF-8 (byte {err.start}: {raw[err.start : err.start + 4]!r}). "
            "Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
    if "\x00" in text:
        raise CorpusError(f"{where} contains a NUL byte; is this a binary file?")
    return text


def _read_txt(path: Path) -> Iterator[Document]:
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            yield Document(i, _decode_line(raw.rstrip(b"\r\n"), f"{path}:{i + 1}"))


def _read_jsonl(path: Path, field: str) -> Iterator[Document]:
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            where = f"{path}:{i + 1}"
            line = _decode_line(raw, where).strip()
            if not line:
                yield Document(i, "")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where}: not valid JSON ({err.msg}).") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise CorpusError(
                    f"{where}: expected an object with a {field!r} field. Got {keys}. "
                    "Use --text-field to name the field that holds the text."
                )
            if not isinstance(obj[field], str):
                raise CorpusError(
                    f"{where}: field {field!r} must be a string. Got {type(obj[field]).__name__}."
                )
            yield Document(i, obj[field])


def _read_parquet(path: Path, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"Cannot read {path} as Parquet: {err}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise CorpusError(
            f"{path} has no column {field!r}. Columns: {names}. Use --text-field to choose one."
        )
    i = 0
    for batch in pf.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise CorpusError(f"{path}: column {field!r} must hold strings.")
            yield Document(i, value or "")
            i += 1


def _read_folder(path: Path) -> Iterator[Document]:
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise CorpusError(f"Folder {path} holds no .txt files; each .txt file is one document.")
    for i, f in enumerate(files):
        yield Document(i, _decode_line(f.read_bytes(), str(f)))


def _read_conllu(path: Path) -> Iterator[Document]:
    for i, (text, words) in enumerate(read_conllu(path)):
        yield Document(i, text, words=tuple(words))


def _read_pydoc() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for i, key in enumerate(sorted(topics)):
        yield Document(i, topics[key])


def read_corpus(spec: str | None, *, text_field: str = "text") -> Iterator[Document]:
    """Documents of a corpus spec (see module docstring), lazily, in input order."""
    spec = spec or DEFAULT_CORPUS
    if spec == DEFAULT_CORPUS:
        return _read_pydoc()
    if spec.startswith("probe:"):
        raise CorpusError(
            "The induction probe needs a tokenizer; use attnstore.capture.probe_documents."
        )
    path = Path(spec)
    if not path.exists():
        raise CorpusError(
            f"Corpus {spec!r} not found. Expected a .txt/.jsonl/.parquet file, a folder of .txt "
            f"files, {DEFAULT_CORPUS!r} or 'probe:induction'."
        )
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    readers: dict[str, Any] = {
        ".txt": lambda: _read_txt(path),
        ".jsonl": lambda: _read_jsonl(path, text_field),
        ".parquet": lambda: _read_parquet(path, text_field),
        ".conllu": lambda: _read_conllu(path),
    }
    if suffix not in readers:
        raise CorpusError(
            f"Unknown corpus type {suffix!r} for {spec!r}. Expected one of {sorted(readers)}."
        )
    return readers[suffix]()  # type: ignore[no-any-return]
