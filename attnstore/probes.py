"""Span probes (semantic heads), as specified in ``schemas/probes.md``: a query span attending to a
target span rather than to its competitors (a pronoun to its antecedent, the end of an IOI prompt
to the indirect object, or any relation a user annotates).

- :class:`Item`: one annotated relation (character spans of the document's text);
- :func:`parse_items`: the ``probes`` field of a JSONL line; :func:`read_corefud`: items from
  CorefUD ``Entity=`` brackets of a CoNLL-U file; :func:`builtin_documents`: ``probe:coref`` and
  ``probe:ioi``;
- :func:`align`: items against the stored tokens (which tokens, which candidates count, skips,
  position baselines);
- :class:`DocumentScorer`: per-head mass and argmax correctness from attention rows, fed a block of
  query rows at a time (at extraction) or a whole decoded matrix (``attnstore probe``,
  :mod:`attnstore.analyses.probes.annotate`);
- :class:`ProbeTables`: the rows of the ``probes`` and ``probe_scores`` tables.

Only numpy here: the extraction hook in :mod:`attnstore.capture` hands over float64 query rows.
Rows are accumulated query row by query row in ascending order, so extraction-time scores equal
scores from a lossless store whatever the query blocks were.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from attnstore.errors import CorpusError

if TYPE_CHECKING:

    import pyarrow as pa

    from attnstore.store import Store

__all__ = [
    "BUILTIN_KINDS",
    "SKIP_NO_TARGET",
    "SKIP_QUERY",
    "Aligned",
    "BuiltinProbe",
    "DocumentScorer",
    "Item",
    "ProbeTables",
    "align",
    "best_heads",
    "builtin_documents",
    "check_kind",
    "item_scores",
    "kinds",
    "parse_builtin",
    "parse_items",
    "read_corefud",
    "spec_options",
]

Span = tuple[int, int]

#: A kind is a short name: a letter, then letters, digits, ``_ . -`` (at most 32 characters).
KIND_PATTERN: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,31}")
#: Skip reasons stored in ``probes.skipped``.
SKIP_QUERY: Final = "query not stored"
SKIP_NO_TARGET: Final = "no target before the query"
BUILTIN_KINDS: Final = ("coref", "ioi")
_ITEM_FIELDS: Final = frozenset({"kind", "query", "targets", "distractors", "group"})


@dataclass(frozen=True)
class Item:
    """One probe item: character spans ``[start, end)`` of its document's text."""

    kind: str
    query: Span
    targets: tuple[Span, ...]
    distractors: tuple[Span, ...] = ()
    group: str | None = None


# ------------------------------------------------------------------------------------------------
# JSONL: the "probes" field
# ------------------------------------------------------------------------------------------------
def _span(value: Any, text: str, where: str) -> Span:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    ):
        raise CorpusError(
            f"{where}: expected a span [start, end] of two integers (character offsets). "
            f"Got {value!r}."
        )
    start, end = int(value[0]), int(value[1])
    if start > end:
        raise CorpusError(
            f"{where}: span [{start}, {end}] is reversed; spans are [start, end) with start ≤ end."
        )
    if start < 0 or end > len(text):
        raise CorpusError(
            f"{where}: span [{start}, {end}] lies outside the text, which has {len(text)} "
            "characters (offsets count Unicode code points, as Python's str does)."
        )
    return start, end


def _spans(value: Any, text: str, where: str, *, required: bool) -> tuple[Span, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or (required and not value):
        want = "a non-empty list" if required else "a list"
        raise CorpusError(f"{where}: expected {want} of [start, end] spans. Got {value!r}.")
    return tuple(_span(v, text, f"{where}[{j}]") for j, v in enumerate(value))


def parse_kind(kind: Any, where: str) -> str:
    """A probe kind, checked: a short name such as ``coref``, ``ioi`` or the user's own."""
    if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
        raise CorpusError(
            f"{where}: expected a kind: a short name of letters, digits, '_', '.', '-' starting "
            f"with a letter (e.g. 'coref', 'ioi', 'bridging'). Got {kind!r}."
        )
    return kind


def parse_items(value: Any, text: str, where: str) -> tuple[Item, ...]:
    """Items of one JSONL line's ``probes`` field (``where`` is ``file:line`` for messages).

    Each entry is ``{"kind", "query", "targets", "distractors"?, "group"?}`` with spans as
    ``[start, end]`` character offsets into ``text``.

    >>> parse_items([{"kind": "coref", "query": [9, 11], "targets": [[0, 3]]}], "Ann said she", "x")
    (Item(kind='coref', query=(9, 11), targets=((0, 3),), distractors=(), group=None),)
    """
    if not isinstance(value, list):
        raise CorpusError(f"{where}: field 'probes' must be a list of objects. Got {value!r}.")
    items = []
    for i, entry in enumerate(value):
        at = f"{where}: probes[{i}]"
        if not isinstance(entry, dict):
            raise CorpusError(f"{at}: expected an object. Got {type(entry).__name__}.")
        unknown = sorted(set(entry) - _ITEM_FIELDS)
        if unknown:
            raise CorpusError(f"{at}: unknown field(s) {unknown}. Expected {sorted(_ITEM_FIELDS)}.")
        for name in ("kind", "query", "targets"):
            if name not in entry:
                raise CorpusError(f"{at}: missing field {name!r}.")
        group = entry.get("group")
        if group is not None and not isinstance(group, str):
            raise CorpusError(f"{at}.group: expected a string. Got {group!r}.")
        items.append(
            Item(
                kind=parse_kind(entry["kind"], f"{at}.kind"),
                query=_span(entry["query"], text, f"{at}.query"),
                targets=_spans(entry["targets"], text, f"{at}.targets", required=True),
                distractors=_spans(
                    entry.get("distractors"), text, f"{at}.distractors", required=False
                ),
                group=group,
            )
        )
    return tuple(items)


# ------------------------------------------------------------------------------------------------
# CoNLL-U with CorefUD coreference
# ------------------------------------------------------------------------------------------------
_CHUNK: Final = re.compile(r"\([^()]+\)?|[^()]+\)")
_DISCONTINUOUS: Final = re.compile(r".+\[\d+/\d+\]")
_DEFAULT_ENTITY_FIELDS: Final = ("eid", "etype", "head", "other")


@dataclass(frozen=True)
class _Mention:
    eid: str
    start: int  # word indices within the document
    end: int
    head: int
    discontinuous: bool


def _misc_entity(misc: str) -> str | None:
    for part in misc.split("|"):
        if part.startswith("Entity="):
            return part[len("Entity=") :]
    return None


def _document_mentions(path: Path) -> Iterator[list[_Mention]]:
    """Mentions of each document of a CoNLL-U file, split exactly as ``syntax.read_conllu`` does."""
    lines = path.read_text(encoding="utf-8").splitlines()
    has_newdoc = any(line.startswith("# newdoc") for line in lines)
    fields: tuple[str, ...] = _DEFAULT_ENTITY_FIELDS
    mentions: list[_Mention] = []
    n_words = 0
    open_: list[tuple[str, int, int | None, int]] = []  # eid, start word, head index, line

    def end_sentence() -> None:
        if open_:
            eid, _, _, number = open_[0]
            raise CorpusError(
                f"{path}:{number}: mention '({eid}' is not closed by the end of its sentence "
                f"(a closing '{eid})' is missing; mentions cannot cross sentences)."
            )

    def flush() -> Iterator[list[_Mention]]:
        nonlocal mentions, n_words
        if n_words:
            yield mentions
        mentions, n_words = [], 0

    for number, line in enumerate(lines, start=1):
        if line.startswith("#"):
            if line.startswith("# newdoc"):
                end_sentence()
                yield from flush()
            key, sep, header = line[1:].partition("=")
            if sep and key.strip() == "global.Entity":
                fields = tuple(header.strip().split("-"))
                if "eid" not in fields:
                    raise CorpusError(
                        f"{path}:{number}: '# global.Entity' must name an 'eid' field "
                        f"(e.g. eid-etype-head-other). Got {header.strip()!r}."
                    )
            continue
        if not line.strip():
            end_sentence()
            if not has_newdoc:
                yield from flush()
            continue
        cols = line.split("\t")
        if len(cols) != 10 or not cols[0].isdigit():
            continue  # multi-word token ranges, empty nodes; syntax.read_conllu reports bad lines
        word = n_words
        n_words += 1
        value = _misc_entity(cols[9])
        if value is None:
            continue
        chunks = _CHUNK.findall(value)
        if "".join(chunks) != value or not value:
            raise CorpusError(
                f"{path}:{number}: malformed Entity={value!r}: expected brackets such as "
                "'(e1-person-2', 'e1)' or '(e1-person-1)', concatenated."
            )
        for chunk in chunks:
            if chunk.startswith("("):
                single = chunk.endswith(")")
                parts = chunk[1 : len(chunk) - single].split("-", len(fields) - 1)
                info = dict(zip(fields, parts, strict=False))
                eid = info.get("eid", "")
                if not eid:
                    raise CorpusError(f"{path}:{number}: Entity bracket {chunk!r} has no eid.")
                head_text = info.get("head", "")
                head: int | None = None
                if head_text:
                    if not head_text.isdigit() or int(head_text) < 1:
                        raise CorpusError(
                            f"{path}:{number}: Entity bracket {chunk!r}: the head must be a "
                            f"1-based word index within the mention. Got {head_text!r}."
                        )
                    head = int(head_text)
                if single:
                    if head not in (None, 1):
                        raise CorpusError(
                            f"{path}:{number}: single-word mention {chunk!r} has head {head}; "
                            "a one-word mention's head is 1."
                        )
                    mentions.append(
                        _Mention(eid, word, word, word, bool(_DISCONTINUOUS.fullmatch(eid)))
                    )
                else:
                    open_.append((eid, word, head, number))
            else:
                eid = chunk[:-1]
                at = next((j for j in range(len(open_) - 1, -1, -1) if open_[j][0] == eid), None)
                if at is None:
                    raise CorpusError(
                        f"{path}:{number}: Entity bracket '{chunk}' closes a mention of {eid!r} "
                        "that is not open in this sentence."
                    )
                _, start, head, opened = open_.pop(at)
                length = word - start + 1
                if head is not None and head > length:
                    raise CorpusError(
                        f"{path}:{opened}: mention '({eid}' spans {length} words but names "
                        f"word {head} as its head."
                    )
                mentions.append(
                    _Mention(
                        eid,
                        start,
                        word,
                        start + (head if head is not None else length) - 1,
                        bool(_DISCONTINUOUS.fullmatch(eid)),
                    )
                )
    end_sentence()
    yield from flush()


def coref_items(mentions: Sequence[_Mention], spans: Sequence[Span]) -> tuple[Item, ...]:
    """``coref`` items of one document: each mention with an earlier mention of its entity.

    ``spans`` are the character spans of the document's words. Mentions are in document order
    (by first word, longer first); query and candidates are head words; discontinuous mentions are
    skipped. A distractor span equal to a target span is dropped (it would tie by construction).
    """
    order = sorted(
        (m for m in mentions if not m.discontinuous), key=lambda m: (m.start, -m.end, m.head)
    )
    items = []
    for i, m in enumerate(order):
        earlier = order[:i]
        query = spans[m.head]
        targets = list(dict.fromkeys(spans[e.head] for e in earlier if e.eid == m.eid))
        targets = [t for t in targets if t != query]
        if not targets:
            continue
        distractors = list(dict.fromkeys(spans[e.head] for e in earlier if e.eid != m.eid))
        distractors = [d for d in distractors if d not in targets and d != query]
        items.append(Item("coref", query, tuple(targets), tuple(distractors)))
    return tuple(items)


def read_corefud(path: Path) -> Iterator[tuple[str, list[Any], tuple[Item, ...] | None]]:
    """Documents of a CoNLL-U file: (text, words, coref items or None when it has no Entity=).

    Brackets follow CorefUD: ``(eid-etype-head-other`` opens a mention (``head`` is the 1-based
    index of its head word; without one, the last word), ``eid)`` closes it, ``(eid-etype-head)``
    is a one-word mention; chunks concatenate (``e1)(e2-place-1``). Field order comes from
    ``# global.Entity``. Malformed brackets raise :class:`~attnstore.errors.CorpusError` with the
    line number.
    """
    from attnstore.syntax import read_conllu

    has_entities = "Entity=" in path.read_text(encoding="utf-8")
    docs = read_conllu(path)
    if not has_entities:
        for text, words in docs:
            yield text, words, None
        return
    for (text, words), mentions in zip(docs, _document_mentions(path), strict=True):
        spans = [(w.char_start, w.char_end) for w in words]
        yield text, words, coref_items(mentions, spans)


# ------------------------------------------------------------------------------------------------
# built-in probe corpora
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltinProbe:
    """``probe:coref`` or ``probe:ioi``: ``count`` items (order twins), seeded."""

    kind: str
    count: int = 48
    seed: int = 0


def spec_options(spec: str, known: set[str]) -> dict[str, int]:
    """The integer options of a ``probe:KIND?key=value&…`` spec; unknown keys and non-integers
    are a :class:`~attnstore.errors.CorpusError`."""
    values: dict[str, int] = {}
    for key, value in parse_qsl(urlsplit(spec).query, keep_blank_values=True):
        if key not in known:
            raise CorpusError(
                f"Unknown probe option {key!r} in {spec!r}. Expected: {sorted(known)}."
            )
        try:
            values[key] = int(value)
        except ValueError:
            raise CorpusError(f"Probe option {key} must be an integer. Got {value!r}.") from None
    return values


def parse_builtin(spec: str) -> BuiltinProbe:
    """``probe:ioi?count=48&seed=0`` → :class:`BuiltinProbe`."""
    parts = urlsplit(spec)
    if parts.scheme != "probe" or parts.path not in BUILTIN_KINDS:
        raise CorpusError(
            f"Expected 'probe:coref[?count=..&seed=..]' or 'probe:ioi[?count=..&seed=..]'. "
            f"Got {spec!r}."
        )
    probe = BuiltinProbe(parts.path, **spec_options(spec, {"count", "seed"}))
    if probe.count < 2 or probe.count % 2:
        raise CorpusError(
            f"probe:{probe.kind} count must be an even number ≥ 2 (items come in order twins). "
            f"Got {probe.count}."
        )
    return probe


class _Builder:
    """Text from pieces, recording the character span of the marked ones."""

    def __init__(self) -> None:
        self.text = ""
        self.marks: dict[str, list[Span]] = {}

    def add(self, piece: str, mark: str | None = None) -> _Builder:
        if mark is not None:
            self.marks.setdefault(mark, []).append((len(self.text), len(self.text) + len(piece)))
        self.text += piece
        return self


# number-cued: (singular, plural)
_NOUNS: Final = (
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("fox", "foxes"),
    ("rabbit", "rabbits"), ("wolf", "wolves"), ("duck", "ducks"), ("goat", "goats"),
    ("mouse", "mice"), ("cow", "cows"), ("pig", "pigs"),
)  # fmt: skip
_NUMBER_TEMPLATES: Final = (
    "The [X] chased the [Y] into the garden because [P]",
    "The [X] watched the [Y] from the window while [P]",
    "The [X] followed the [Y] down the road, and then [P]",
    "The [X] saw the [Y] near the river, so [P]",
)
# gender-cued: (female, male)
_GENDER_NOUNS: Final = (
    ("queen", "king"), ("woman", "man"), ("girl", "boy"), ("mother", "father"),
    ("sister", "brother"), ("wife", "husband"), ("aunt", "uncle"), ("princess", "prince"),
)  # fmt: skip
_FEMALE: Final = (
    "Mary",
    "Anna",
    "Sarah",
    "Emma",
    "Lisa",
    "Kate",
    "Laura",
    "Alice",
    "Julia",
    "Rose",
)
_MALE: Final = (
    "John",
    "David",
    "Paul",
    "James",
    "Peter",
    "Tom",
    "Mark",
    "Robert",
    "Michael",
    "Eric",
)
_GENDER_TEMPLATES: Final = (
    "[X] met [Y] in the garden, and then [P]",
    "[X] called [Y] after lunch because [P]",
    "[X] thanked [Y] at the door, and [P]",
    "[X] visited [Y] at the office, where [P]",
)

#: Wang et al. 2022, App. E (BABA order: [B] is the subject S, [A] the indirect object IO; the
#: final [A], the answer, is not part of the prompt). ABBA swaps the first [B] and [A].
IOI_TEMPLATES: Final = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)
IOI_NAMES: Final = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas",
    "Anthony", "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven",
    "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany",
    "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany",
    "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen",
    "Patrick", "Sean", "Erin", "Zachary", "Jamie", "Kelly", "Samantha", "Nathan", "Sara",
    "Dustin", "Paul", "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica",
    "Mary", "Travis", "Lisa", "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander",
    "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia", "Cody",
    "Allison", "Bradley", "Samuel",
)  # fmt: skip
IOI_PLACES: Final = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")  # fmt: skip
IOI_OBJECTS: Final = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")  # fmt: skip


def _fill(template: str, values: dict[str, str]) -> _Builder:
    """Fill ``[NAME]`` placeholders; each filled piece is marked with its placeholder name."""
    b = _Builder()
    for piece in re.split(r"(\[[A-Z]+\])", template):
        if piece.startswith("[") and piece.endswith("]"):
            b.add(values[piece[1:-1]], piece[1:-1])
        elif piece:
            b.add(piece)
    return b


def _coref_pair(rng: random.Random, pair: int) -> list[tuple[str, Item]]:
    """One item and its order twin; even pairs number-cued, odd pairs gender-cued."""
    if pair % 2 == 0:
        template = _NUMBER_TEMPLATES[(pair // 2) % len(_NUMBER_TEMPLATES)]
        (t_sg, t_pl), (o_sg, o_pl) = rng.sample(_NOUNS, 2)
        plural = (pair // 2) % 2 == 1  # alternate "it" and "they"
        target, other, pronoun = (t_pl, o_sg, "they") if plural else (t_sg, o_pl, "it")
    else:
        template = _GENDER_TEMPLATES[(pair // 2) % len(_GENDER_TEMPLATES)]
        female = (pair // 2) % 2 == 0  # alternate "she" and "he"
        if (pair // 4) % 2 == 0:
            f, m = rng.choice(_FEMALE), rng.choice(_MALE)
        else:
            f, m = rng.choice(_GENDER_NOUNS)
            template = template.replace("[X]", "The [X]").replace("[Y]", "the [Y]")
        target, other, pronoun = (f, m, "she") if female else (m, f, "he")
    out = []
    for first, second in ((target, other), (other, target)):
        b = _fill(template, {"X": first, "Y": second, "P": pronoun})
        spans = {"X": b.marks["X"][0], "Y": b.marks["Y"][0]}
        t_key = "X" if first == target else "Y"
        o_key = "Y" if t_key == "X" else "X"
        out.append(
            (
                b.text,
                Item(
                    "coref",
                    b.marks["P"][0],
                    (spans[t_key],),
                    (spans[o_key],),
                    group=f"coref-{pair}",
                ),
            )
        )
    return out


def _ioi_pair(rng: random.Random, pair: int, names: Sequence[str]) -> list[tuple[str, Item]]:
    """A BABA item and its ABBA twin: query END (" to"), target IO, distractors S1 and S2."""
    baba = IOI_TEMPLATES[pair % len(IOI_TEMPLATES)]
    a, b = rng.sample(list(names), 2)
    values = {"A": a, "B": b, "PLACE": rng.choice(IOI_PLACES), "OBJECT": rng.choice(IOI_OBJECTS)}
    abba = baba.replace("[B]", "[TMP]", 1).replace("[A]", "[B]", 1).replace("[TMP]", "[A]", 1)
    out = []
    for template in (baba, abba):
        built = _fill(template, values)
        end = built.text.rindex(" to") + 1
        io = built.marks["A"][0]
        s1, s2 = built.marks["B"][0], built.marks["B"][-1]
        out.append((built.text, Item("ioi", (end, end + 2), (io,), (s1, s2), group=f"ioi-{pair}")))
    return out


def builtin_documents(
    probe: BuiltinProbe, tokenize: Callable[[str], Sequence[int]]
) -> list[tuple[str, tuple[Item, ...]]]:
    """The documents of a built-in probe: (text, (item,)) pairs, twins adjacent.

    ``tokenize`` maps text to token ids without special tokens; IOI keeps only names that are one
    token with their leading space.
    """
    rng = random.Random(probe.seed)
    pairs: list[tuple[str, Item]] = []
    if probe.kind == "ioi":
        names = [n for n in IOI_NAMES if len(tokenize(" " + n)) == 1]
        if len(names) < 2:
            raise CorpusError(
                "probe:ioi needs at least two first names that are one token (with their leading "
                f"space) under this tokenizer; found {len(names)}."
            )
        for pair in range(probe.count // 2):
            pairs.extend(_ioi_pair(rng, pair, names))
    else:
        for pair in range(probe.count // 2):
            pairs.extend(_coref_pair(rng, pair))
    return [(text, (item,)) for text, item in pairs]


# ------------------------------------------------------------------------------------------------
# alignment
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Aligned:
    """One item against the stored tokens (token positions; only counting candidates)."""

    item: Item
    query: tuple[int, ...]
    targets: tuple[tuple[int, ...], ...]
    distractors: tuple[tuple[int, ...], ...]
    skipped: str | None
    nearest_correct: bool | None
    first_correct: bool | None


class _Tokens:
    """The stored tokens overlapping a character span (cached: corpora repeat spans a lot)."""

    def __init__(self, spans: Sequence[Span | None]) -> None:
        # a token without a span (special tokens) overlaps nothing: an empty [0, 0)
        self.starts = np.array([0 if s is None else s[0] for s in spans], dtype=np.int64)
        self.ends = np.array([0 if s is None else s[1] for s in spans], dtype=np.int64)
        self.cache: dict[Span, tuple[int, ...]] = {}

    def __call__(self, span: Span) -> tuple[int, ...]:
        got = self.cache.get(span)
        if got is None:
            overlap = np.minimum(self.ends, span[1]) - np.maximum(self.starts, span[0])
            got = self.cache[span] = tuple(np.flatnonzero(overlap > 0).tolist())
        return got


def _baseline(
    targets: Sequence[tuple[int, ...]], distractors: Sequence[tuple[int, ...]], pick: str
) -> bool | None:
    """``nearest``: the candidate whose last token is latest is a target; ``first``: the one
    whose first token is earliest. A tie between a target and a distractor is wrong."""
    if not distractors:
        return None
    if pick == "nearest":
        key_t, key_d = max(t[-1] for t in targets), max(d[-1] for d in distractors)
        return key_t > key_d
    key_t, key_d = min(t[0] for t in targets), min(d[0] for d in distractors)
    return key_t < key_d


def align(items: Sequence[Item], spans: Sequence[Span | None]) -> list[Aligned]:
    """Items against stored tokens' character spans (None for special tokens).

    A span's tokens overlap it by at least one character; a candidate counts only if it has
    tokens and all come before the query's first token; an item is skipped when its query has no
    token or no target counts.
    """
    tokens_of = _Tokens(spans)
    out = []
    for item in items:
        query = tokens_of(item.query)
        if not query:
            out.append(Aligned(item, (), (), (), SKIP_QUERY, None, None))
            continue
        first = query[0]

        def counting(cands: Sequence[Span], first: int = first) -> tuple[tuple[int, ...], ...]:
            toks = (tokens_of(c) for c in cands)
            return tuple(t for t in toks if t and t[-1] < first)

        targets, distractors = counting(item.targets), counting(item.distractors)
        if not targets:
            out.append(Aligned(item, query, (), distractors, SKIP_NO_TARGET, None, None))
            continue
        out.append(
            Aligned(
                item,
                query,
                targets,
                distractors,
                None,
                _baseline(targets, distractors, "nearest"),
                _baseline(targets, distractors, "first"),
            )
        )
    return out


# ------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """One item's scores for every head of a layer (``[head]`` arrays)."""

    mass_target: np.ndarray
    mass_distractor: np.ndarray
    correct: np.ndarray | None  # bool; None when the item has no counting distractor
    strict_correct: np.ndarray | None  # bool; None when min(Q) ≤ 1


def item_scores(abar: np.ndarray, al: Aligned) -> Scores:
    """Scores of one non-skipped item from ``abar`` ``[head, key]``: the query rows' mean."""

    def mass(cands: Sequence[tuple[int, ...]]) -> np.ndarray:
        keys = sorted({k for c in cands for k in c})
        return abar[:, keys].sum(-1) if keys else np.zeros(abar.shape[0])

    per_target = np.stack([abar[:, list(t)].sum(-1) for t in al.targets], -1)
    correct = None
    if al.distractors:
        per_distractor = np.stack([abar[:, list(d)].sum(-1) for d in al.distractors], -1)
        correct = per_target.max(-1) > per_distractor.max(-1)
    q_min = al.query[0]
    strict = None
    if q_min > 1:
        best = 1 + abar[:, 1:q_min].argmax(-1)  # first maximum: ties → earliest key
        hits = np.zeros(abar.shape[1], dtype=bool)
        hits[[k for t in al.targets for k in t]] = True
        strict = hits[best]
    return Scores(mass(al.targets), mass(al.distractors), correct, strict)


class DocumentScorer:
    """Collects one document's query rows per layer and scores its non-skipped items.

    Feed rows with :meth:`add_rows` (any blocks, any order), then :meth:`finish` a layer. ``ā`` is
    the sum of the query rows in ascending row order divided by ``|Q|`` (float64), so the result
    does not depend on how rows were blocked.
    """

    def __init__(self, aligned: Sequence[Aligned]) -> None:
        self.aligned = list(aligned)
        self.rows = sorted({q for a in aligned if a.skipped is None for q in a.query})
        self._rows: dict[int, dict[int, np.ndarray]] = {}

    def rows_in(self, lo: int, hi: int) -> list[int]:
        """The query rows this document needs among rows ``lo … hi - 1``."""
        return [r for r in self.rows if lo <= r < hi]

    def add_rows(self, layer: int, rows: Sequence[int], values: np.ndarray) -> None:
        """``values`` is ``[head, len(rows), keys]`` for the given rows."""
        got = self._rows.setdefault(layer, {})
        for j, r in enumerate(rows):
            got[r] = np.asarray(values[:, j], dtype=np.float64)

    def finish(self, layer: int) -> list[tuple[int, Scores]]:
        """(item index, scores) of every non-skipped item for ``layer``."""
        got = self._rows.pop(layer, {})
        out = []
        for i, al in enumerate(self.aligned):
            if al.skipped is not None:
                continue
            missing = [q for q in al.query if q not in got]
            if missing:  # pragma: no cover - every query row lies inside the document
                raise RuntimeError(f"query rows {missing} of item {i} were never captured")
            total = got[al.query[0]].copy()
            for q in al.query[1:]:
                total += got[q]
            out.append((i, item_scores(total / len(al.query), al)))
        return out


class ProbeTables:
    """Accumulates the ``probes`` and ``probe_scores`` rows of a batch."""

    PROBES: Final = ("doc_id", "item", "kind", "group", "query_first", "query_last", "n_targets",
                     "n_distractors", "nearest_correct", "first_correct", "skipped")  # fmt: skip
    SCORES: Final = ("doc_id", "item", "layer", "head", "mass_target", "mass_distractor",
                     "correct", "strict_correct")  # fmt: skip

    def __init__(self) -> None:
        self.probes: dict[str, list[Any]] = {k: [] for k in self.PROBES}
        self.scores: dict[str, list[Any]] = {k: [] for k in self.SCORES}

    def add_document(self, doc_id: int, aligned: Sequence[Aligned]) -> None:
        for i, a in enumerate(aligned):
            row = (doc_id, i, a.item.kind, a.item.group, a.query[0] if a.query else None,
                   a.query[-1] if a.query else None, len(a.targets), len(a.distractors),
                   a.nearest_correct, a.first_correct, a.skipped)  # fmt: skip
            for key, value in zip(self.PROBES, row, strict=True):
                self.probes[key].append(value)

    def add_scores(
        self, doc_id: int, layer: int, heads: Sequence[int], scored: Sequence[tuple[int, Scores]]
    ) -> None:
        for i, s in scored:
            for hi, head in enumerate(heads):
                row = (doc_id, i, layer, head, float(s.mass_target[hi]),
                       float(s.mass_distractor[hi]),
                       None if s.correct is None else bool(s.correct[hi]),
                       None if s.strict_correct is None else bool(s.strict_correct[hi]))  # fmt: skip
                for key, value in zip(self.SCORES, row, strict=True):
                    self.scores[key].append(value)

    def __bool__(self) -> bool:
        return bool(self.probes["doc_id"])

    def tables(self) -> dict[str, dict[str, Any]]:
        return {"probes": self.probes, "probe_scores": self.scores}


# ------------------------------------------------------------------------------------------------
# reading: kinds, best heads
# ------------------------------------------------------------------------------------------------
def kinds(store: Store) -> list[str]:
    """The probe kinds a store holds items of."""
    return [str(k) for k in store.sql("SELECT DISTINCT kind FROM probes ORDER BY kind").column(0)
            .to_pylist()]  # fmt: skip


def check_kind(store: Store, kind: str) -> str:
    """``kind`` if the store has items of it; else :class:`~attnstore.errors.QueryError`."""
    from attnstore.errors import QueryError

    have = kinds(store)
    if kind not in have:
        raise QueryError(
            f"No probe items of kind {kind!r} in this store. Kinds: "
            f"{', '.join(have) if have else 'none'} (add probes with `attnstore probe STORE "
            "--corpus FILE.jsonl`, or extract with --corpus probe:coref / probe:ioi)."
        )
    return kind


def best_heads(store: Store, kind: str | None = None, *, top: int = 5, min_n: int = 1) -> pa.Table:
    """The ``top`` best heads of each probe kind (or of ``kind``) from ``probe_heads``.

    Heads that meet the mass rule of ``semantic:<kind>`` (mass_target ≥ max(0.10,
    2 · mass_distractor)) come first, then by gain, then by mass on the target: accuracy alone can
    come from tiny masses.
    """
    from attnstore import catalog

    if kind is not None:
        check_kind(store, kind)
    else:
        catalog.require(store, "probe")
    return catalog.run(store, catalog.probe_best_sql(kind, top, min_n))
