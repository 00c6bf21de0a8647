"""Corpora: where documents come from, each with a stable ``doc_id`` (its 0-based input position).

Accepted specs (see :func:`read_corpus`):

- ``path.txt``: one document per line; empty lines are documents too (they are skipped later and
  counted), so ids stay positions in the file.
- ``path.jsonl``: one JSON object per line, text in ``text_field`` (default ``"text"``).
- ``path.parquet``: column ``text_field``; a glob (``data/train-*.parquet``) reads the matching files
  in sorted name order as one corpus, ids counting on across files.
- ``path.conllu``: gold dependency parses (documents split at ``# newdoc``, else one sentence each).
- a folder: every ``*.txt`` file (sorted by name) is one document.
- a folder written by Hugging Face ``datasets``' ``save_to_disk`` (``folder@SPLIT`` picks a split
  of a ``DatasetDict``), column ``text_field``.
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset already in the local ``datasets`` cache
  (``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``, else ``~/.cache/huggingface/datasets``);
  never downloaded.

Every reader streams: Parquet record batches and memory-mapped Arrow files, a few hundred rows at
a time, so a corpus larger than memory works. The Hugging Face readers need ``attnstore[hf]``.
- ``pydoc:topics``: the built-in sample, Python's own ``pydoc_data.topics`` (sorted by topic).
- ``probe:induction[?n=50&reps=2&count=20&seed=0]``: random token ids repeated (schemas/scores.md);
  needs the tokenizer, so it yields token ids rather than text.
- ``probe:coref[?count=48&seed=0]``, ``probe:ioi[?count=48&seed=0]``: the built-in span probes of
  schemas/probes.md (IOI needs the tokenizer to pick one-token names).
- ``probe:needle[?tokens=2048&depth=D&count=10&seed=0]``: needle-in-a-haystack documents of
  schemas/sparsity.md (:mod:`attnstore.needles`; the tokenizer checks the value's tokens).

JSONL lines may carry a ``probes`` field and CoNLL-U files CorefUD ``Entity=`` brackets: both give
span-probe items (:mod:`attnstore.probes`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from attnstore.errors import CorpusError
from attnstore.needles import Needle, NeedleProbe, parse_needle
from attnstore.probes import (
    BUILTIN_KINDS,
    BuiltinProbe,
    Item,
    parse_builtin,
    parse_items,
    read_corefud,
    spec_options,
)
from attnstore.syntax import Word

__all__ = ["DEFAULT_CORPUS", "Document", "InductionProbe", "parse_probe", "read_corpus"]

DEFAULT_CORPUS: Final = "pydoc:topics"
#: Rows per Arrow batch when streaming Parquet and ``datasets`` corpora: bounds host memory.
STREAM_ROWS: Final = 256
_GLOB_CHARS: Final = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str
    #: pre-tokenized input (the induction probe); None means "tokenize ``text``"
    token_ids: tuple[int, ...] | None = None
    #: a gold parse (CoNLL-U corpora); None means "parse with --parse, or not at all"
    words: tuple[Word, ...] | None = None
    #: span-probe items (a JSONL ``probes`` field, CorefUD coreference, a built-in probe)
    probes: tuple[Item, ...] | None = None
    #: the needle probe's character spans (``probe:needle``, schemas/sparsity.md)
    needle: Needle | None = None


@dataclass(frozen=True)
class InductionProbe:
    """``n`` random ordinary token ids, repeated ``reps`` times, ``count`` documents, seeded."""

    n: int = 50
    reps: int = 2
    count: int = 20
    seed: int = 0


def parse_probe(spec: str) -> InductionProbe | BuiltinProbe | NeedleProbe:
    """``probe:induction?n=50&reps=2`` → :class:`InductionProbe`; ``probe:coref``, ``probe:ioi``
    → :class:`~attnstore.probes.BuiltinProbe`; ``probe:needle`` →
    :class:`~attnstore.needles.NeedleProbe`."""
    parts = urlsplit(spec)
    if parts.scheme == "probe" and parts.path in BUILTIN_KINDS:
        return parse_builtin(spec)
    if parts.scheme == "probe" and parts.path == "needle":
        return parse_needle(spec)
    if parts.scheme != "probe" or parts.path != "induction":
        raise CorpusError(
            "Expected 'probe:induction[?n=..&reps=..&count=..&seed=..]', "
            + ", ".join(f"'probe:{kind}[?count=..]'" for kind in BUILTIN_KINDS)
            + f" or 'probe:needle[?tokens=..&depth=..&count=..]'. Got {spec!r}."
        )
    probe = InductionProbe(**spec_options(spec, {"n", "reps", "count", "seed"}))
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
            probes = parse_items(obj["probes"], obj[field], where) if "probes" in obj else None
            yield Document(i, obj[field], probes=probes)


def _texts(values: list[Any], where: str, field: str, first: int) -> Iterator[Document]:
    for i, value in enumerate(values, first):
        if value is not None and not isinstance(value, str):
            raise CorpusError(
                f"{where}: column {field!r} must hold strings. Got {type(value).__name__}. "
                "Use --text-field to choose a text column."
            )
        yield Document(i, value or "")


def _read_parquet(path: Path, field: str, first: int = 0) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # No pre-buffering: read one row group's column chunk at a time, in 1 MiB reads.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"Cannot read {path} as Parquet: {err}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise CorpusError(
            f"{path} has no column {field!r}. Columns: {names}. Use --text-field to choose one."
        )
    i = first
    for batch in pf.iter_batches(batch_size=STREAM_ROWS, columns=[field], use_threads=False):
        yield from _texts(batch.column(0).to_pylist(), str(path), field, i)
        i += batch.num_rows


def _read_parquet_glob(pattern: str, field: str) -> Iterator[Document]:
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise CorpusError(
            f"No file matches the Parquet glob {pattern!r}. Check the path, or quote the glob so "
            "the shell does not expand it."
        )
    if not_parquet := [f for f in files if not f.lower().endswith(".parquet")]:
        raise CorpusError(
            f"The glob {pattern!r} matches files that are not .parquet: {not_parquet[:3]}. "
            "Narrow it, e.g. 'data/train-*.parquet'."
        )
    return _chain_parquet([Path(f) for f in files], field)


def _chain_parquet(files: list[Path], field: str) -> Iterator[Document]:
    first = 0
    for f in files:
        for doc in _read_parquet(f, field, first):
            yield doc
            first = doc.doc_id + 1


def _import_datasets(spec: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"Corpus {spec!r} needs the Hugging Face 'datasets' package: "
            "pip install 'attnstore[hf]'."
        ) from None
    return datasets


def _split_at(spec: str) -> tuple[str, str | None]:
    """``name@split`` → (name, split); no ``@`` → (spec, None)."""
    head, at, split = spec.rpartition("@")
    if not at:
        return spec, None
    if not head or not split:
        raise CorpusError(f"Expected 'NAME@SPLIT' with both parts. Got {spec!r}.")
    return head, split


def _choose_split(splits: list[str], split: str | None, what: str) -> str:
    if split is not None:
        if split not in splits:
            raise CorpusError(f"{what} has no split {split!r}. Splits: {splits}.")
        return split
    if len(splits) == 1:
        return splits[0]
    raise CorpusError(
        f"{what} has several splits {splits}; name one with '@SPLIT', e.g. {what}@{splits[0]}."
    )


def _read_arrow_dataset(ds: Any, field: str, what: str) -> Iterator[Document]:
    """Rows of a memory-mapped ``datasets.Dataset``, ``STREAM_ROWS`` at a time."""
    if field not in ds.column_names:
        raise CorpusError(
            f"{what} has no column {field!r}. Columns: {ds.column_names}. "
            "Use --text-field to choose one."
        )
    return _iter_arrow_dataset(ds.select_columns([field]).with_format("arrow"), field, what)


def _iter_arrow_dataset(ds: Any, field: str, what: str) -> Iterator[Document]:
    i = 0
    for table in ds.iter(batch_size=STREAM_ROWS):
        yield from _texts(table.column(field).to_pylist(), what, field, i)
        i += table.num_rows


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_saved(path: Path, split: str | None, field: str) -> Iterator[Document]:
    datasets = _import_datasets(str(path))
    what = str(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise CorpusError(f"Cannot read {what} as a save_to_disk folder: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = _choose_split(sorted(loaded), split, what)
        return _read_arrow_dataset(loaded[name], field, f"{what}@{name}")
    if split is not None:
        raise CorpusError(f"{what} holds one dataset, not splits; drop '@{split}'.")
    return _read_arrow_dataset(loaded, field, what)


def _hf_cache_dir() -> Path:
    """Where ``datasets`` caches prepared datasets, from the environment as it is now."""
    if cache := os.environ.get("HF_DATASETS_CACHE"):
        return Path(cache).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))
    return Path(home).expanduser() / "datasets"


def _read_hf_cache(spec: str, field: str) -> Iterator[Document]:
    """``hf:NAME[:CONFIG][@SPLIT]`` from the local cache, through ``datasets``' own cache builder
    (what ``load_dataset`` falls back to offline), so nothing is ever downloaded."""
    rest, split = _split_at(spec.removeprefix("hf:"))
    name, _, config = rest.partition(":")
    if not name or name.count("/") > 1 or (":" in spec.removeprefix("hf:") and not config):
        raise CorpusError(
            f"Expected 'hf:NAME[:CONFIG][@SPLIT]', e.g. 'hf:stanfordnlp/imdb@test'. Got {spec!r}."
        )
    _import_datasets(spec)
    cache = _hf_cache_dir()
    try:
        from datasets.packaged_modules.cache.cache import Cache

        builder = Cache(
            cache_dir=str(cache), dataset_name=name.split("/")[-1], repo_id=name,
            config_name=config or None, version="auto", hash="auto",
        )  # fmt: skip
        splits = sorted(builder.info.splits or {})
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        detail = " ".join(str(err).split())  # one line, whatever datasets says
        if "multiple" in detail:
            raise CorpusError(
                f"The local Hugging Face datasets cache {str(cache)!r} holds several configs of "
                f"{name!r} ({detail}). Name one: 'hf:{name}:CONFIG'."
            ) from None
        raise CorpusError(
            f"Dataset {name!r}{f' (config {config!r})' if config else ''} is not in the local "
            f"Hugging Face datasets cache {str(cache)!r} ({detail}). attnstore never downloads: "
            f"run datasets.load_dataset({name!r}) once where the Hub is reachable (same HF_HOME "
            "/ HF_DATASETS_CACHE), or pass a save_to_disk folder or Parquet files."
        ) from None
    what = spec if split is None else spec.rpartition("@")[0]
    chosen = _choose_split(splits, split, what)
    try:
        ds = builder.as_dataset(split=chosen)
    except (OSError, ValueError) as err:
        raise CorpusError(f"Cannot read {spec!r} from the cache {str(cache)!r}: {err}") from None
    return _read_arrow_dataset(ds, field, f"{what}@{chosen}")


def _read_folder(path: Path) -> Iterator[Document]:
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise CorpusError(f"Folder {path} holds no .txt files; each .txt file is one document.")
    for i, f in enumerate(files):
        yield Document(i, _decode_line(f.read_bytes(), str(f)))


def _read_conllu(path: Path) -> Iterator[Document]:
    for i, (text, words, probes) in enumerate(read_corefud(path)):
        yield Document(i, text, words=tuple(words), probes=probes)


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
    if spec.startswith("hf:"):
        return _read_hf_cache(spec, text_field)
    path = Path(spec)
    if not path.exists() and _GLOB_CHARS & set(spec):
        return _read_parquet_glob(spec, text_field)
    if not path.exists() and "@" in spec:
        saved, split = _split_at(spec)
        if _is_saved_dataset(Path(saved)):
            return _read_saved(Path(saved), split, text_field)
    if not path.exists():
        raise CorpusError(
            f"Corpus {spec!r} not found. Expected a .txt/.jsonl/.parquet/.conllu file, a Parquet glob, a "
            f"folder of .txt files, a save_to_disk folder, 'hf:NAME[:CONFIG][@SPLIT]', "
            f"{DEFAULT_CORPUS!r} or 'probe:induction'."
        )
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_saved(path, None, text_field)
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
