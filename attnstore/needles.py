"""The needle probe ``probe:needle?tokens=N&depth=D&count=C&seed=S`` (``schemas/sparsity.md``).

Each document is a haystack of ordinary prose (the prose paragraphs of the built-in sample
corpus, Python's own ``pydoc_data.topics``, concatenated from a seeded paragraph on and cut at a
sentence boundary), a needle
sentence stating a fact (``The secret passphrase is <value>.``) inserted at the sentence boundary
nearest to ``depth`` × the haystack's length in tokens, then a question and the answer, the value
copied verbatim (``Question: What is the secret passphrase? Answer: <value>.``).

The value is three ordinary words drawn (seeded) from :data:`VALUE_WORDS`, redrawn until, under the
model's tokenizer, its tokens occur nowhere else in the document and the needle's value and the answer
are the same token ids. A tokenizer that merges the value with its neighbours (no token boundary
at the value's edges) is handled by a second layout that ends the needle and the answer with a
newline instead of a period; if neither layout gives clean boundaries, or no value is unique after
:data:`MAX_DRAWS` draws, generation stops with one clear :class:`~attnstore.errors.CorpusError`.

The document carries its needle's character spans (:class:`Needle`, the ``needle`` field of
:class:`attnstore.corpus.Document`); the ``sparsity`` analysis aligns them to token positions.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from attnstore.errors import CorpusError

__all__ = [
    "MAX_DRAWS",
    "VALUE_WORDS",
    "Encoder",
    "Needle",
    "NeedleProbe",
    "build_documents",
    "depths",
    "hf_encoder",
    "parse_needle",
]

Span = tuple[int, int]
#: text → (token ids with special tokens, character span of each token or None)
Encoder = Callable[[str], tuple[Sequence[int], Sequence[Span | None]]]

#: Ordinary words the value is drawn from (rare in Python's documentation, the haystack).
VALUE_WORDS: Final = (
    "amber", "azure", "crimson", "violet", "scarlet", "emerald", "indigo", "ivory", "coral",
    "saffron", "mango", "papaya", "apricot", "lychee", "melon", "cherry", "peach", "lemon",
    "falcon", "otter", "badger", "heron", "walrus", "lynx", "panda", "gecko", "tiger", "zebra",
    "camel", "koala", "beaver", "raven", "salmon", "lantern", "violin", "anchor", "saddle",
    "harbor", "meadow", "canyon", "glacier", "orchard", "tulip", "cactus", "marble", "velvet",
    "pebble", "thunder", "willow", "maple", "cedar", "orchid", "dolphin", "parrot", "bison",
)  # fmt: skip
#: Words per value.
VALUE_LENGTH: Final = 3
#: Value draws per layout before generation gives up.
MAX_DRAWS: Final = 64
KEY: Final = "secret passphrase"
QUESTION: Final = f"\n\nQuestion: What is the {KEY}? Answer:"
#: (end of the needle sentence, end of the answer): a period first, a newline when the tokenizer
#: merges the value with the period.
LAYOUTS: Final = ((". ", "."), ("\n", "\n"))
DEPTH_RANGE: Final = (0.1, 0.9)
_BOUNDARY: Final = re.compile(r"(?<=[.!?])\s+|\n[ \t]*\n\s*")
_DEFAULTS: Final = {"tokens": 2048, "count": 10, "seed": 0}


@dataclass(frozen=True)
class NeedleProbe:
    """``probe:needle``: ``count`` documents of about ``tokens`` tokens, seeded."""

    tokens: int = 2048
    depth: float | None = None
    count: int = 10
    seed: int = 0


@dataclass(frozen=True)
class Needle:
    """A needle document's facts: character spans ``[start, end)`` in its text."""

    #: the relative position used: haystack tokens before the needle / haystack tokens
    depth: float
    #: the value inside the needle sentence
    value: Span
    #: the copied answer at the end of the document
    answer: Span


def parse_needle(spec: str) -> NeedleProbe:
    """``probe:needle?tokens=2048&depth=0.5&count=10&seed=0`` → :class:`NeedleProbe`.

    >>> parse_needle("probe:needle?tokens=512&count=3")
    NeedleProbe(tokens=512, depth=None, count=3, seed=0)
    """
    parts = urlsplit(spec)
    if parts.scheme != "probe" or parts.path != "needle":
        raise CorpusError(
            f"Expected 'probe:needle[?tokens=..&depth=..&count=..&seed=..]'. Got {spec!r}."
        )
    values: dict[str, Any] = {}
    for key, raw in parse_qsl(parts.query, keep_blank_values=True):
        if key not in (*_DEFAULTS, "depth"):
            raise CorpusError(
                f"Unknown probe option {key!r} in {spec!r}. Expected: count, depth, seed, tokens."
            )
        try:
            values[key] = float(raw) if key == "depth" else int(raw)
        except ValueError:
            kind = "a number in [0, 1]" if key == "depth" else "an integer"
            raise CorpusError(f"Probe option {key} must be {kind}. Got {raw!r}.") from None
    probe = NeedleProbe(**values)
    if probe.tokens < 64:
        raise CorpusError(f"probe:needle tokens must be ≥ 64. Got {probe.tokens}.")
    if probe.count < 1:
        raise CorpusError(f"probe:needle count must be ≥ 1. Got {probe.count}.")
    if probe.depth is not None and not 0.0 <= probe.depth <= 1.0:
        raise CorpusError(f"probe:needle depth must be in [0, 1]. Got {probe.depth}.")
    return probe


def depths(probe: NeedleProbe) -> list[float]:
    """The depth asked of each document: ``depth``, else spread evenly over [0.1, 0.9].

    >>> depths(NeedleProbe(count=5))
    [0.1, 0.3, 0.5, 0.7, 0.9]
    """
    if probe.depth is not None:
        return [probe.depth] * probe.count
    lo, hi = DEPTH_RANGE
    if probe.count == 1:
        return [(lo + hi) / 2]
    return [round(lo + (hi - lo) * i / (probe.count - 1), 12) for i in range(probe.count)]


def hf_encoder(tokenizer: Any) -> Encoder:
    """An :data:`Encoder` that tokenizes exactly as extraction does (special tokens included,
    character offsets of a fast tokenizer; special tokens have no span)."""
    if not getattr(tokenizer, "is_fast", False):
        raise CorpusError(
            "probe:needle needs a fast tokenizer (character offsets) to place the needle's tokens."
        )
    special = set(tokenizer.all_special_ids)

    def encode(text: str) -> tuple[list[int], list[Span | None]]:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = [int(i) for i in enc.input_ids]
        spans: list[Span | None] = [
            None if i in special or a == b else (int(a), int(b))
            for i, (a, b) in zip(ids, enc.offset_mapping, strict=True)
        ]
        return ids, spans

    return encode


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    """The prose paragraphs of the sample corpus, in sorted topic order, soft line breaks joined:
    no code, tables, headings or lists (indented, ``>>>``, ``|``, ``+--``, ``***`` lines)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            lines = block.strip("\n").split("\n")
            if (
                len(block) < 80
                or any(not line or line[0] in " \t*+|=-" or ">>>" in line for line in lines)
                or not block.rstrip().endswith(".")
            ):
                continue
            out.append(" ".join(line.strip() for line in lines))
    return tuple(out)


def _prose(start: int, n_chars: int) -> str:
    """Prose paragraphs from paragraph ``start`` on (wrapping around), at least ``n_chars``."""
    paragraphs = _paragraphs()
    out, size, i = [], 0, start
    while size < n_chars:
        text = paragraphs[i % len(paragraphs)] + "\n\n"
        out.append(text)
        size += len(text)
        i += 1
    return "".join(out)


def _boundaries(text: str) -> list[int]:
    """Sentence boundaries: 0, and the start of every sentence after the first."""
    return [0, *(m.end() for m in _BOUNDARY.finditer(text) if m.end() < len(text))]


def _starts(spans: Sequence[Span | None]) -> list[int]:
    """The character where each token starts; a token without a span (a special or unknown
    token) starts where the token before it ended."""
    out, at = [], 0
    for span in spans:
        if span is not None:
            at = span[0]
        out.append(at)
        if span is not None:
            at = span[1]
    return out


def _haystack(start: int, budget: int, encode: Encoder) -> tuple[str, list[int], list[int]]:
    """Prose of about ``budget`` tokens cut at a sentence boundary, its sentence boundaries (the
    last one: its end) and the token count before each of them."""
    n_chars = max(4096, budget * 8)
    while True:
        text = _prose(start, n_chars)
        starts = _starts(encode(text)[1])
        if len(starts) > budget or n_chars > 64 * max(budget, 1) * 8:
            break
        n_chars *= 2
    cut_at = starts[budget] if len(starts) > budget else len(text)
    every = _boundaries(text)
    cut = min(every[1:] or [cut_at], key=lambda b: (abs(b - cut_at), b))  # the nearest boundary
    bounds = [b for b in every if b <= cut]
    hay = text[:cut]
    if hay and not hay[-1].isspace():
        hay += " "
    # tokens before each boundary (of the haystack alone, cut where it is cut)
    starts = _starts(encode(hay)[1])
    bounds = [*(x for x in bounds if x < len(hay)), len(hay)]
    counts, j = [], 0
    for b in bounds:
        while j < len(starts) and starts[j] < b:
            j += 1
        counts.append(j)
    return hay, bounds, counts


@dataclass(frozen=True)
class _Built:
    text: str
    needle: Needle


def _assemble(hay: str, at: int, value: str, layout: tuple[str, str], depth: float) -> _Built:
    end_needle, end_answer = layout
    before = hay[:at]
    sentence = f"The {KEY} is "
    v0 = len(before) + len(sentence)
    body = before + sentence + value + end_needle + hay[at:].rstrip()
    text = body + QUESTION + " " + value + end_answer
    a0 = len(body) + len(QUESTION) + 1
    return _Built(text, Needle(depth, (v0, v0 + len(value)), (a0, a0 + len(value))))


def _problem(built: _Built, encode: Encoder) -> str | None:
    """Why a built document does not qualify ("merge" or "repeat"), None when it does."""
    ids, spans = encode(built.text)
    positions = []
    for start, end in (built.needle.value, built.needle.answer):
        pos = [i for i, s in enumerate(spans) if s is not None and s[0] < end and s[1] > start]
        # a token may carry the whitespace before the value (" amber"), nothing else outside it
        edges = [(s[0], s[1]) for i in pos if (s := spans[i]) is not None]
        text = built.text
        if not pos or any(text[a:start].strip() or text[end:b].strip() for a, b in edges):
            return "merge"
        covered = set().union(*(range(a, b) for a, b in edges))
        if any(not text[c].isspace() for c in range(start, end) if c not in covered):
            return "merge"  # part of the value is in a token without a span (unknown)
        positions.append(pos)
    value_ids = [ids[i] for i in positions[0]]
    if value_ids != [ids[i] for i in positions[1]]:
        return "merge"
    inside = set(positions[0]) | set(positions[1])
    wanted = set(value_ids)
    if any(t in wanted for i, t in enumerate(ids) if i not in inside):
        return "repeat"
    return None


def build_documents(probe: NeedleProbe, encode: Encoder) -> list[tuple[str, Needle]]:
    """The documents of ``probe`` as (text, needle) pairs, checked under ``encode``."""
    rng = random.Random(probe.seed)
    out = []
    overhead = len(encode(_assemble("", 0, " ".join(VALUE_WORDS[:VALUE_LENGTH]),
                                    LAYOUTS[0], 0.0).text)[0])  # fmt: skip
    budget = probe.tokens - overhead
    if budget < 16:
        raise CorpusError(
            f"probe:needle tokens={probe.tokens} leaves no room for a haystack under this "
            f"tokenizer (the needle, question and answer take {overhead} tokens)."
        )
    for i, want in enumerate(depths(probe)):
        hay, bounds, counts = _haystack(rng.randrange(len(_paragraphs())), budget, encode)
        total = max(counts[-1], 1)
        k = min(range(len(bounds)), key=lambda j: (abs(counts[j] / total - want), j))
        depth = counts[k] / total
        built, reasons = None, []
        for layout in LAYOUTS:
            for _ in range(MAX_DRAWS):
                value = " ".join(rng.sample(VALUE_WORDS, VALUE_LENGTH))
                candidate = _assemble(hay, bounds[k], value, layout, depth)
                reason = _problem(candidate, encode)
                if reason is None:
                    built = candidate
                    break
                reasons.append(reason)
                if reason == "merge":
                    break  # this layout's boundaries merge: try the next layout
            if built is not None:
                break
        if built is None:
            if "repeat" in reasons:
                raise CorpusError(
                    f"probe:needle document {i}: no value of {VALUE_LENGTH} words whose tokens "
                    f"occur nowhere else in the document after {MAX_DRAWS} draws; this tokenizer "
                    "splits ordinary words into pieces that the haystack also uses (its "
                    "vocabulary is too small for the needle probe)."
                )
            raise CorpusError(
                f"probe:needle document {i}: this tokenizer merges the value with its neighbours "
                "(no token boundary at the value's edges after a period or a newline), so the "
                "value's tokens cannot be located; use a model whose tokenizer splits words."
            )
        out.append((built.text, built.needle))
    return out
