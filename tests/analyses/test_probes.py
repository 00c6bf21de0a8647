"""Span probes (schemas/probes.md): scores against an independent reading of the spec on planted and
random attention, the probe_heads view and semantic labels, CorefUD parsing, bad input, the built-in
corpora, and extraction-time scores against `attnstore probe` on a lossless store."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import attnstore
from attnstore import probes
from attnstore.cli import cli
from attnstore.errors import CorpusError, QueryError
from attnstore.probes import Item, align, read_corefud

Span = tuple[int, int]


# ------------------------------------------------------------------------------------------------
# the spec, read literally (loops and sets, no code shared with attnstore.probes)
# ------------------------------------------------------------------------------------------------
def ref_tokens(span: Span, spans: list[Span | None]) -> list[int]:
    return [t for t, s in enumerate(spans) if s is not None and max(s[0], span[0]) < min(s[1], span[1])]  # fmt: skip


def reference(item: Item, spans: list[Span | None], a: np.ndarray | None) -> dict[str, Any]:
    """One item: its probes row and, with ``a`` ([head, T, T]), per-head scores."""
    q = ref_tokens(item.query, spans)
    if not q:
        return {"skipped": "query not stored", "query_first": None, "n_targets": 0}
    targets = [ref_tokens(t, spans) for t in item.targets]
    targets = [t for t in targets if t and all(k < min(q) for k in t)]
    distractors = [ref_tokens(d, spans) for d in item.distractors]
    distractors = [d for d in distractors if d and all(k < min(q) for k in d)]
    row: dict[str, Any] = {"query_first": min(q), "query_last": max(q),
                           "n_targets": len(targets), "n_distractors": len(distractors)}  # fmt: skip
    if not targets:
        return {**row, "skipped": "no target before the query"}
    row["skipped"] = None
    cands = [(t, True) for t in targets] + [(d, False) for d in distractors]
    if distractors:
        latest = max(c[-1] for c, _ in cands)
        earliest = min(c[0] for c, _ in cands)
        row["nearest_correct"] = all(is_t for c, is_t in cands if c[-1] == latest)
        row["first_correct"] = all(is_t for c, is_t in cands if c[0] == earliest)
    else:
        row["nearest_correct"] = row["first_correct"] = None
    if a is None:
        return row
    heads = []
    target_tokens = {k for t in targets for k in t}
    for h in range(a.shape[0]):
        abar = [sum(float(a[h, qq, k]) for qq in q) / len(q) for k in range(a.shape[-1])]

        def m(tokens: set[int], abar: list[float] = abar) -> float:
            return sum(abar[k] for k in tokens)

        correct = None
        if distractors:
            correct = max(m(set(t)) for t in targets) > max(m(set(d)) for d in distractors)
        strict = None
        if min(q) > 1:
            best = min(range(1, min(q)), key=lambda k, abar=abar: (-abar[k], k))
            strict = best in target_tokens
        heads.append({
            "mass_target": m(target_tokens),
            "mass_distractor": m({k for d in distractors for k in d}),
            "correct": correct,
            "strict_correct": strict,
        })  # fmt: skip
    row["heads"] = heads
    return row


def score(
    items: list[Item], spans: list[Span | None], a: np.ndarray, blocks: list[int] | None = None
):
    """attnstore.probes on one document and layer, rows fed in the given blocks."""
    aligned = align(items, spans)
    scorer = probes.DocumentScorer(aligned)
    t = a.shape[-1]
    cuts = [0, *(blocks or []), t]
    for lo, hi in itertools.pairwise(cuts):
        rows = scorer.rows_in(lo, hi)
        if rows:
            scorer.add_rows(0, rows, a[:, rows, :])
    return aligned, dict(scorer.finish(0))


def assert_matches_reference(
    items: list[Item], spans: list[Span | None], a: np.ndarray, got
) -> None:
    aligned, scored = got
    for i, (item, al) in enumerate(zip(items, aligned, strict=True)):
        want = reference(item, spans, a)
        assert al.skipped == want["skipped"]
        assert (al.query[0] if al.query else None) == want["query_first"]
        assert len(al.targets) == want["n_targets"]
        if want["skipped"]:
            assert i not in scored
            continue
        assert len(al.distractors) == want["n_distractors"]
        assert (al.nearest_correct, al.first_correct) == (want["nearest_correct"], want["first_correct"])  # fmt: skip
        s = scored[i]
        for h, ref in enumerate(want["heads"]):
            assert math.isclose(s.mass_target[h], ref["mass_target"], rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(s.mass_distractor[h], ref["mass_distractor"], rel_tol=1e-9, abs_tol=1e-12)  # fmt: skip
            assert (None if s.correct is None else bool(s.correct[h])) == ref["correct"]
            assert (None if s.strict_correct is None else bool(s.strict_correct[h])) == ref["strict_correct"]  # fmt: skip


def word_spans(n: int) -> tuple[str, list[Span | None]]:
    """A text of n two-character words and one token per word."""
    text = " ".join(f"{i:02d}" for i in range(n))
    return text, [(3 * i, 3 * i + 2) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# planted attention
# ------------------------------------------------------------------------------------------------
HEADS = ("target", "recency", "sink", "tie", "target-twin")
T = 12


def planted_corpus(n_pairs: int = 20, seed: int = 0) -> list[tuple[list[Item], np.ndarray]]:
    """Order-twinned items (query = last token, one target, one distractor), attention per head."""
    rng = np.random.default_rng(seed)
    _text, _spans = word_spans(T)
    out = []
    for _ in range(n_pairs):
        a_pos, b_pos = sorted(rng.choice(np.arange(1, T - 1), size=2, replace=False).tolist())
        for target, other in ((a_pos, b_pos), (b_pos, a_pos)):
            item = Item("planted", (3 * (T - 1), 3 * (T - 1) + 2), ((3 * target, 3 * target + 2),),
                        ((3 * other, 3 * other + 2),))  # fmt: skip
            uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
            a = np.stack([uniform] * len(HEADS))
            q = T - 1
            a[0, q] = 0.02 / (T - 1)
            a[0, q, target] = 0.98  # always the target
            a[1, q] = 0.0
            a[1, q, max(target, other)] = 1.0  # the latest candidate
            a[2, q] = 0.0
            a[2, q, 0] = 1.0  # the sink
            a[4] = a[0]
            out.append(([item], a))
    return out


def test_planted_heads_match_the_spec() -> None:
    _, spans = word_spans(T)
    for items, a in planted_corpus(5):
        assert_matches_reference(items, spans, a, score(items, spans, a))


def test_planted_heads_expected_values() -> None:
    _, spans = word_spans(T)
    results = [score(items, spans, a)[1][0] for items, a in planted_corpus()]
    acc = np.mean([r.correct for r in results], axis=0)
    assert acc.tolist() == [1.0, 0.5, 0.0, 0.0, 1.0]  # target, recency, sink (0 vs 0), tie
    sink = list(results)
    assert all(r.mass_target[2] == r.mass_distractor[2] == 0 for r in sink)
    # the sink head's strict argmax over 1 … min(Q)-1 is all zeros: the earliest key, token 1
    rows = [(items[0], r) for (items, _), r in zip(planted_corpus(), results, strict=True)]
    for item, r in rows:
        assert bool(r.strict_correct[2]) == (item.targets[0][0] == 3)


def test_rows_in_any_blocks_give_identical_scores() -> None:
    rng = np.random.default_rng(1)
    _text, spans = word_spans(20)
    items = [Item("x", (3 * q, 3 * q + 5), ((3 * t, 3 * t + 2),), ((3 * d, 3 * d + 2), (0, 2)))
             for q, t, d in ((10, 3, 5), (15, 14, 2), (18, 1, 9))]  # fmt: skip
    a = rng.random((3, 20, 20)).astype(np.float32)
    whole = score(items, spans, a)[1]
    for blocks in ([5], [11, 16], list(range(1, 20))):
        parts = score(items, spans, a, blocks)[1]
        for i in whole:
            for field in ("mass_target", "mass_distractor", "correct", "strict_correct"):
                np.testing.assert_array_equal(getattr(parts[i], field), getattr(whole[i], field))


@st.composite
def random_document(draw: st.DrawFn) -> tuple[list[Item], list[Span | None], np.ndarray]:
    n_words = draw(st.integers(3, 14))
    text, spans = word_spans(n_words)
    spans = [None if draw(st.booleans()) and i == 0 else s for i, s in enumerate(spans)]  # a BOS
    n_chars = len(text)
    span = st.tuples(st.integers(0, n_chars), st.integers(0, n_chars)).map(
        lambda p: (min(p), max(p))
    )
    items = draw(st.lists(st.builds(
        lambda q, t, d: Item("k", q, tuple(t), tuple(d)),
        span, st.lists(span, min_size=1, max_size=3), st.lists(span, max_size=3),
    ), min_size=1, max_size=4))  # fmt: skip
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    a = np.tril(rng.random((2, n_words, n_words)) ** 4)
    if draw(st.booleans()):
        a = np.round(a, 1)  # exact ties in masses and argmax
    a /= np.maximum(a.sum(-1, keepdims=True), 1e-12)
    return items, spans, a


@settings(max_examples=150, deadline=None)
@given(random_document())
def test_random_items_match_the_spec(doc: tuple[list[Item], list[Span | None], np.ndarray]) -> None:
    items, spans, a = doc
    assert_matches_reference(items, spans, a, score(items, spans, a))


# ------------------------------------------------------------------------------------------------
# through a store: probe_heads and labels
# ------------------------------------------------------------------------------------------------
def write_planted_store(path: Path) -> Path:
    from attnstore.codecs import get_codec
    from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING
    from attnstore.scores import SCORE_COLUMNS
    from attnstore.store import Segment, StoreWriter

    corpus = planted_corpus()
    text, spans = word_spans(T)
    n, h = len(corpus), len(HEADS)
    manifest: Any = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "tests",
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model": {"id": "planted", "revision": None, "architecture": "none", "n_layers": 1,
                  "n_heads": h, "n_kv_heads": h, "dtype": "float32"},
        "tokenizer": {"id": "planted", "vocab_size": T, "bos_token_id": None, "adds_bos": False},
        "codec": get_codec("lossless").get_config(), "packing": PACKING, "max_length": T,
        "layers": [0], "heads": list(range(h)), "matrices": False, "settings": {},
    }  # fmt: skip
    tables = probes.ProbeTables()
    for doc_id, (items, a) in enumerate(corpus):
        aligned = align(items, spans)
        tables.add_document(doc_id, aligned)
        scorer = probes.DocumentScorer(aligned)
        scorer.add_rows(0, scorer.rows, a[:, scorer.rows, :])
        tables.add_scores(doc_id, 0, list(range(h)), scorer.finish(0))
    ids = np.arange(n)
    # syntactic counts: head 0 gains 0.3 over a 0.1 baseline, head 4 gains 0.9 (40 instances)
    syntax = {
        "doc_id": [0] * h,
        "layer": [0] * h,
        "head": list(range(h)),
        "relation": ["det"] * h,
        "direction": ["head->dep"] * h,
        "n": [40] * h,
        "correct": [16, 0, 0, 0, 40],
    }
    baseline = {"doc_id": [0], "relation": ["det"], "direction": ["head->dep"], "n": [40],
                **{f"correct_{k}": [4 if k == 1 else 0] for k in range(1, 7)}}  # fmt: skip
    segment = Segment(
        docs={"doc_id": ids.tolist(), "n_tokens": [T] * n, "n_tokens_input": [T] * n,
              "truncated": [False] * n, "skipped": [None] * n, "n_chars": [len(text)] * n,
              "text": [text] * n},
        tokens={"doc_id": np.repeat(ids, T), "pos": np.tile(np.arange(T), n),
                "token_id": np.tile(np.arange(T), n), "token": [f"{i:02d}" for i in range(T)] * n,
                "char_start": [s[0] for s in spans] * n, "char_end": [s[1] for s in spans] * n},
        heads={"doc_id": np.repeat(ids, h), "layer": np.zeros(n * h, int),
               "head": np.tile(np.arange(h), n), "kv_head": np.tile(np.arange(h), n),
               "n_tokens": np.full(n * h, T), **{c: np.full(n * h, np.nan) for c in SCORE_COLUMNS},
               "n_queries": np.full(n * h, T), "n_duplicate": np.zeros(n * h, int),
               "n_induction": np.zeros(n * h, int)},
        extra={**tables.tables(), "syntax": syntax, "syntax_baseline": baseline},
    )  # fmt: skip
    StoreWriter(path, manifest).commit(segment)
    return path


def wilson_low(p: float, n: int, z: float = 1.959963984540054) -> float:
    return (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)  # fmt: skip


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> attnstore.Store:
    return attnstore.open(str(write_planted_store(tmp_path_factory.mktemp("planted") / "p.attn")))


def test_probe_heads_view_aggregates_as_specified(planted_store: attnstore.Store) -> None:
    rows = planted_store.sql("SELECT * FROM probe_heads ORDER BY head").to_pylist()
    assert [r["head"] for r in rows] == list(range(len(HEADS)))
    items = planted_store.sql("SELECT * FROM probes").to_pylist()
    base = max(np.mean([i["nearest_correct"] for i in items]), np.mean([i["first_correct"] for i in items]))  # fmt: skip
    assert base == 0.5  # order twins: nearest and first are exactly 0.5
    for r in rows:
        s = planted_store.sql("SELECT * FROM probe_scores WHERE head = ?", [r["head"]]).to_pylist()
        acc = np.mean([x["correct"] for x in s])
        assert r["n"] == len(s) == 40
        assert math.isclose(r["accuracy"], acc)
        assert math.isclose(r["mass_target"], np.mean([x["mass_target"] for x in s]))
        assert math.isclose(r["mass_distractor"], np.mean([x["mass_distractor"] for x in s]))
        assert math.isclose(r["strict_accuracy"], np.mean([x["strict_correct"] for x in s]))
        assert math.isclose(r["baseline"], base)
        assert math.isclose(r["gain"], acc - base)
        assert math.isclose(r["accuracy_low"], wilson_low(acc, 40), abs_tol=1e-12)
    assert [round(r["accuracy"], 6) for r in rows] == [1.0, 0.5, 0.0, 0.0, 1.0]


def test_semantic_labels_and_larger_gain_wins(planted_store: attnstore.Store) -> None:
    rows = planted_store.sql("SELECT head, label FROM head_summary").to_pylist()
    labels = {r["head"]: r["label"] for r in rows}
    assert labels[0] == "semantic:planted"  # semantic gain 0.5 beats syntactic gain 0.3
    assert labels[4] == "syntactic:det"  # syntactic gain 0.9 beats semantic gain 0.5
    assert labels[1] == labels[2] == labels[3] == "none"  # no gain / no mass
    semantic = planted_store.sql("SELECT semantic FROM head_summary WHERE head = 4").column(0)
    assert semantic.to_pylist() == ["planted"]


def test_heads_probe_cli_and_plot(planted_store: attnstore.Store, tmp_path: Path) -> None:
    runner = CliRunner()
    path = str(planted_store.path)
    result = runner.invoke(cli, ["heads", path, "--probe", "-f", "json", "--top", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["kind"], r["head"]) for r in rows] == [("planted", 0), ("planted", 4)]
    assert rows[0]["gain"] == 0.5
    assert rows[0]["n"] == 40
    assert rows[0]["baseline"] == 0.5
    one = runner.invoke(cli, ["heads", path, "--probe", "planted", "--top", "1"])
    assert one.exit_code == 0
    assert "planted" in one.stdout
    bad = runner.invoke(cli, ["heads", path, "--probe", "coref"])
    assert bad.exit_code == 1
    assert "No probe items of kind 'coref'" in bad.output
    assert "planted" in bad.output
    png = tmp_path / "probe.png"
    plotted = runner.invoke(cli, ["plot", "probe", path, "--kind", "planted", "-o", str(png)])
    assert plotted.exit_code == 0, plotted.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(QueryError, match="Kinds: planted"):
        probes.best_heads(planted_store, "ioi")


# ------------------------------------------------------------------------------------------------
# JSONL items and bad input
# ------------------------------------------------------------------------------------------------
TEXT = "Mary met John in the garden, and then she"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"kind": "coref", "query": [41, 38], "targets": [[0, 4]]},
            r"probes\[0\]\.query: span \[41, 38\] is reversed",
        ),
        (
            {"kind": "coref", "query": [38, 99], "targets": [[0, 4]]},
            r"lies outside the text, which has 41",
        ),
        (
            {"kind": "coref", "query": [38, 41], "targets": [[-1, 4]]},
            r"targets\[0\]: span \[-1, 4\] lies outside",
        ),
        (
            {"kind": "coref", "query": [38, 41], "targets": []},
            r"targets: expected a non-empty list",
        ),
        ({"kind": "coref", "query": [38], "targets": [[0, 4]]}, r"expected a span \[start, end\]"),
        ({"kind": "co ref!", "query": [38, 41], "targets": [[0, 4]]}, r"kind: expected a kind"),
        ({"kind": 3, "query": [38, 41], "targets": [[0, 4]]}, r"kind: expected a kind"),
        (
            {"kind": "coref", "query": [38, 41], "target": [[0, 4]]},
            r"unknown field\(s\) \['target'\]",
        ),
        ({"query": [38, 41], "targets": [[0, 4]]}, r"missing field 'kind'"),
        ({"kind": "coref", "query": [True, 41], "targets": [[0, 4]]}, r"two integers"),
    ],
)
def test_bad_items_are_refused_with_their_line(entry: dict[str, Any], message: str, tmp_path: Path) -> None:  # fmt: skip
    from attnstore.corpus import read_corpus

    path = tmp_path / "c.jsonl"
    good = {"text": TEXT, "probes": [{"kind": "coref", "query": [38, 41], "targets": [[0, 4]]}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"text": TEXT, "probes": [entry]}) + "\n")
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: .*" + message):
        list(read_corpus(str(path)))


def test_bad_item_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    good = {"text": TEXT, "probes": [{"kind": "coref", "query": [38, 41], "targets": [[0, 4]]}]}
    bad = {"text": TEXT, "probes": [{"kind": "coref", "query": [38, 41], "targets": [[4, 0]]}]}
    path.write_text((json.dumps(good) + "\n") * 50 + json.dumps(bad) + "\n")
    out = tmp_path / "never.attn"
    with pytest.raises(CorpusError, match=r"c\.jsonl:51: .*reversed"):
        attnstore.extract(str(out), model=str(tmp_path / "no-model-needed"), corpus=str(path))
    assert not out.exists()


def test_alignment_skips_are_counted_not_raised() -> None:
    _text, spans = word_spans(6)  # tokens 0 … 5
    items = [
        Item("k", (12, 14), ((0, 2),), ((3, 5),)),  # fine
        Item("k", (3, 5), ((9, 11),)),  # target after the query
        Item("k", (6, 8), ((6, 11),)),  # target overlapping the query
        Item("k", (8, 8), ((0, 2),)),  # empty query span
        Item(
            "k", (12, 14), ((0, 2),), ((13, 14), (2, 3), (6, 8))
        ),  # distractors: overlap, none, ok
        Item("k", (12, 14), ((0, 2),), ((0, 2),)),  # target and distractor on the same token: tie
    ]
    got = align(items, spans[:5])  # the last word was truncated away
    assert [a.skipped for a in got] == [None, "no target before the query",
                                        "no target before the query", "query not stored",
                                        None, None]  # fmt: skip
    assert got[4].distractors == ((2,),)
    assert (got[5].nearest_correct, got[5].first_correct) == (False, False)
    late = [Item("k", (15, 17), ((0, 2),))]
    assert align(late, spans)[0].skipped is None
    assert align(late, spans[:5])[0].skipped == "query not stored"  # truncated query


# ------------------------------------------------------------------------------------------------
# CorefUD
# ------------------------------------------------------------------------------------------------
def conllu(rows: list[tuple[str, str]], header: str = "# global.Entity = eid-etype-head-other\n") -> str:  # fmt: skip
    lines = [header.rstrip("\n")] if header else []
    for i, (form, misc) in enumerate(rows, start=1):
        lines.append(f"{i}\t{form}\t_\t_\t_\t_\t0\troot\t_\t{misc or '_'}")
    return "\n".join(lines) + "\n\n"


def corefud_items(tmp_path: Path, text: str) -> list[tuple[str, tuple[Item, ...] | None]]:
    p = tmp_path / "c.conllu"
    p.write_text(text)
    return [(t, items) for t, _, items in read_corefud(p)]


def words_of(text: str, items: tuple[Item, ...]) -> list[tuple[str, list[str], list[str]]]:
    return [(text[slice(*i.query)], [text[slice(*t)] for t in i.targets],
             [text[slice(*d)] for d in i.distractors]) for i in items]  # fmt: skip


def test_corefud_nested_multiword_singleword_and_close_before_open(tmp_path: Path) -> None:
    doc = conllu([
        ("The", "Entity=(e1-animal-3"), ("big", ""), ("dog", "Entity=e1)"),
        ("saw", ""), ("the", "Entity=(e2-animal-2"), ("cat", "Entity=e2)"),
        ("and", ""), ("it", "Entity=(e1-animal-1)"),
        ("chased", ""), ("its", "Entity=(e3-object-2(e1-animal-1)"), ("tail", "Entity=e3)"),
        ("near", ""), ("the", "Entity=(e4-place-2"), ("garden", "Entity=e4)(e2-animal-1)"),
    ])  # fmt: skip
    [(text, items)] = corefud_items(tmp_path, doc)
    assert text.startswith("The big dog saw the cat and it chased its tail")
    assert items is not None
    got = words_of(text, items)
    # "it" → dog (head word 3 of "The big dog"); the cat is a distractor
    assert got[0] == ("it", ["dog"], ["cat"])
    # nested: "its" (e1) inside "its tail" (e3, head "tail"): targets dog and it
    assert got[1] == ("its", ["dog", "it"], ["cat", "tail"])  # "tail" comes after: dropped later
    # closing before opening on one word: "garden" closes e4 then is a one-word e2 mention
    assert got[2] == ("garden", ["cat"], ["dog", "it", "tail", "its"])  # not itself (e4's head)
    assert len(items) == 3


def test_corefud_head_default_discontinuous_and_no_entities(tmp_path: Path) -> None:
    doc = conllu([
        ("Anna", "Entity=(e1-person-"), ("Smith", "Entity=e1)"), ("met", ""),
        ("Bob", "Entity=(e2[1/2]-person-1)"), ("and", ""),
        ("she", "Entity=(e1-person-1)"), ("and", ""), ("he", "Entity=(e2[2/2]-person-1)"),
    ])  # fmt: skip
    [(text, items)] = corefud_items(tmp_path, doc)
    assert items is not None
    assert words_of(text, items) == [("she", ["Smith"], [])]  # no head: last word; e2 skipped
    plain = conllu([("Hi", ""), ("there", "SpaceAfter=No")], header="")
    assert corefud_items(tmp_path, plain) == [("Hi there", None)]


def test_corefud_documents_follow_newdoc(tmp_path: Path) -> None:
    one = conllu([("Ann", "Entity=(e1-person-1)"), ("left", "")]).replace("# global", "# newdoc id = a\n# global")  # fmt: skip
    two = conllu([("She", "Entity=(e1-person-1)"), ("saw", ""), ("Ann", "Entity=(e1-person-1)")], header="")  # fmt: skip
    three = "# newdoc id = b\n" + conllu([("Bo", "Entity=(e5-person-1)"), ("sat", "")], header="")
    docs = corefud_items(tmp_path, one + two + three)
    assert [t for t, _ in docs] == ["Ann left She saw Ann", "Bo sat"]
    assert words_of(docs[0][0], docs[0][1] or ()) == [("She", ["Ann"], []), ("Ann", ["Ann", "She"], [])]  # fmt: skip
    assert docs[1][1] == ()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("a", "Entity=e1)")], r":2: .*closes a mention of 'e1' that is not open"),
        ([("a", "Entity=(e1-x-1"), ("b", "")], r":2: mention '\(e1' is not closed by the end"),
        (
            [("a", "Entity=(e1-x-3"), ("b", "Entity=e1)")],
            r":2: mention '\(e1' spans 2 words but names word 3",
        ),
        ([("a", "Entity=(e1-x-zero)")], r":2: .*head must be a 1-based word index"),
        ([("a", "Entity=e1"), ("b", "")], r":2: malformed Entity='e1'"),
        ([("a", ""), ("b", "Entity=(e1-x-1)junk")], r":3: malformed Entity"),
    ],
)
def test_corefud_malformed_brackets_name_the_line(rows: list[tuple[str, str]], message: str, tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(CorpusError, match=r"c\.conllu" + message):
        corefud_items(tmp_path, conllu(rows))


# ------------------------------------------------------------------------------------------------
# built-in corpora
# ------------------------------------------------------------------------------------------------
def whitespace_spans(text: str) -> list[Span | None]:
    import re

    return [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]


@pytest.mark.parametrize("kind", ["coref", "ioi"])
def test_builtin_probes_are_deterministic_twinned_and_balanced(kind: str) -> None:
    probe = probes.parse_builtin(f"probe:{kind}?count=40&seed=3")
    one_token = lambda s: (
        [1] if s.strip() in {"Mary", "John", "David", "Sarah", "Kevin"} else [1, 2]
    )
    docs = probes.builtin_documents(probe, one_token)
    assert docs == probes.builtin_documents(probe, one_token)
    assert docs != probes.builtin_documents(probes.parse_builtin(f"probe:{kind}?count=40&seed=4"), one_token)  # fmt: skip
    assert len(docs) == 40
    rows = []
    for text, (item,) in docs:
        assert item.kind == kind
        assert item.query[1] == len(text)  # the prompt ends at the query
        rows.append(align([item], whitespace_spans(text))[0])
    assert all(r.skipped is None for r in rows)
    nearest = np.mean([r.nearest_correct for r in rows])
    first = np.mean([r.first_correct for r in rows])
    assert first == 0.5
    assert nearest == (0.0 if kind == "ioi" else 0.5)
    for (t1, (i1,)), (t2, (i2,)) in zip(docs[::2], docs[1::2], strict=True):  # order twins
        assert i1.group == i2.group
        assert sorted(t1.split()) == sorted(t2.split())
        assert t1[slice(*i1.targets[0])] == t2[slice(*i2.targets[0])]
    if kind == "ioi":
        for text, (item,) in docs:
            io, (s1, s2) = (
                text[slice(*item.targets[0])],
                (text[slice(*d)] for d in item.distractors),
            )
            assert io in {"Mary", "John", "David", "Sarah", "Kevin"}
            assert s1 == s2 != io
            assert text[slice(*item.query)] == "to"
    else:
        pronouns = {text[slice(*item.query)] for text, (item,) in docs}
        assert pronouns == {"it", "they", "she", "he"}


def test_builtin_probe_options_are_checked() -> None:
    with pytest.raises(CorpusError, match="even number"):
        probes.parse_builtin("probe:coref?count=3")
    with pytest.raises(CorpusError, match="Unknown probe option 'n'"):
        probes.parse_builtin("probe:ioi?n=3")
    with pytest.raises(CorpusError, match="at least two first names"):
        probes.builtin_documents(probes.parse_builtin("probe:ioi?count=2"), lambda s: [1, 2])


# ------------------------------------------------------------------------------------------------
# extraction (tiny model): extraction-time scores, `attnstore probe` later, CoNLL-U coreference
# ------------------------------------------------------------------------------------------------
def probe_corpus(tmp_path: Path) -> tuple[Path, Path]:
    lines = [
        {"text": "The dog chased the cats into the garden because it",
         "probes": [{"kind": "coref", "query": [48, 50], "targets": [[4, 7]], "distractors": [[19, 23]]}]},
        {"text": "", "probes": [{"kind": "coref", "query": [0, 0], "targets": [[0, 0]]}]},
        {"text": TEXT, "probes": [
            {"kind": "coref", "query": [38, 41], "targets": [[0, 4]], "distractors": [[9, 13]], "group": "g"},
            {"kind": "coref", "query": [0, 4], "targets": [[9, 13]]},
            {"kind": "bridging", "query": [21, 27], "targets": [[9, 13], [0, 4]]}]},
        {"text": "No probes here."},
        {"text": "Paul gave a ring to Anna, and then Paul gave a book to", "probes": [
            {"kind": "ioi", "query": [52, 54], "targets": [[20, 24]], "distractors": [[0, 4], [35, 39]]}]},
    ]  # fmt: skip
    jsonl, txt = tmp_path / "c.jsonl", tmp_path / "c.txt"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    txt.write_text("".join(x["text"] + "\n" for x in lines))  # type: ignore[operator]
    return jsonl, txt


def test_extraction_matches_reference_and_probe_later(tmp_path: Path, llama_dir: Path) -> None:
    jsonl, txt = probe_corpus(tmp_path)
    now, later = tmp_path / "now.attn", tmp_path / "later.attn"
    for out, corpus in ((now, jsonl), (later, txt)):
        attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), codec="lossless",
                          batch_size=2, progress=False)  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(cli, ["probe", str(later), "--corpus", str(jsonl), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["documents"], summary["items"], summary["skipped_items"]) == (4, 6, 2)
    again = runner.invoke(cli, ["probe", str(later), "--corpus", str(jsonl), "--json"])
    assert json.loads(again.stdout)["already_probed"] == 4  # resumable: nothing scored twice
    a, b = attnstore.open(str(now)), attnstore.open(str(later))
    for table in ("probes", "probe_scores", "probe_heads"):
        q = f"SELECT * FROM {table} ORDER BY ALL"
        assert a.sql(q) == b.sql(q), table
    assert any(c.get("source") == "decoded" for c in b.commits)
    # every score against the spec, from the stored matrices
    rows = {(r["doc_id"], r["item"]): r for r in a.sql("SELECT * FROM probes").to_pylist()}
    scores = a.sql("SELECT * FROM probe_scores ORDER BY doc_id, item, layer, head").to_pylist()
    from attnstore.corpus import read_corpus

    n_checked = 0
    for doc in read_corpus(str(jsonl)):
        for i, item in enumerate(doc.probes or ()):
            row = rows[(doc.doc_id, i)]
            tokens = a.sql("SELECT char_start, char_end FROM tokens WHERE doc_id = ? ORDER BY pos",
                           [doc.doc_id]).to_pylist() if doc.text else []  # fmt: skip
            spans = [None if t["char_start"] is None else (t["char_start"], t["char_end"]) for t in tokens]  # fmt: skip
            mats = a.matrices(doc.doc_id) if doc.text else None
            for layer in range(3):
                want = reference(
                    item, spans, None if mats is None else mats[layer].astype(np.float64)
                )
                assert row["skipped"] == want["skipped"]
                if want["skipped"]:
                    continue
                assert (row["nearest_correct"], row["first_correct"]) == (want["nearest_correct"], want["first_correct"])  # fmt: skip
                got = [s for s in scores if (s["doc_id"], s["item"], s["layer"]) == (doc.doc_id, i, layer)]  # fmt: skip
                for s, ref in zip(got, want["heads"], strict=True):
                    assert math.isclose(s["mass_target"], ref["mass_target"], rel_tol=1e-9)
                    assert s["correct"] == ref["correct"]
                    assert s["strict_correct"] == ref["strict_correct"]
                    n_checked += 1
    assert n_checked == 4 * 3 * 4
    assert a.sql("SELECT DISTINCT kind FROM probe_heads ORDER BY 1").column(0).to_pylist() == ["bridging", "coref", "ioi"]  # fmt: skip


def test_query_rows_in_any_block_at_extraction(llama_dir: Path, tmp_path: Path) -> None:
    """One query row per block at extraction gives the scores of the whole captured matrices."""
    from attnstore.capture import Extractor, load_model
    from attnstore.codecs import get_codec
    from attnstore.corpus import read_corpus
    from attnstore.packing import unpack_tril

    jsonl, _ = probe_corpus(tmp_path)
    loaded = load_model(str(llama_dir), progress=False)
    ex = Extractor(loaded, get_codec("lossless"), 64, chunk_bytes=1)  # one query row per block
    batch = [ex.tokenize(d) for d in read_corpus(str(jsonl)) if d.text and d.probes]
    segment = ex.run(batch)
    whole = probes.ProbeTables()
    for t, codes in zip(batch, segment.codes, strict=True):
        assert t.probe_items is not None
        mats = unpack_tril(codes.astype(np.float32), len(t.ids))  # lossless: the captured values
        whole.add_document(t.doc.doc_id, t.probe_items)
        scorer = probes.DocumentScorer(t.probe_items)
        for li in range(3):
            scorer.add_rows(li, scorer.rows, mats[li][:, scorer.rows, :])
            whole.add_scores(t.doc.doc_id, li, range(4), scorer.finish(li))
    for name, columns in whole.tables().items():
        got = sorted(zip(*segment.extra[name].values(), strict=True), key=str)
        assert got == sorted(zip(*columns.values(), strict=True), key=str), name
    assert len(whole.scores["doc_id"]) == 4 * 3 * 4


def test_probe_later_refuses_other_texts_and_builtins(tmp_path: Path, llama_store: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "not the stored text", "probes": [
        {"kind": "k", "query": [4, 7], "targets": [[0, 3]]}]}) + "\n")  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(cli, ["probe", str(llama_store), "--corpus", str(path)])
    assert result.exit_code == 1
    assert "Document 0" in result.output
    assert "differs from the stored text" in result.output
    none = runner.invoke(cli, ["heads", str(llama_store), "--probe"])
    assert none.exit_code == 1
    assert "no probe items" in none.output
    builtin = runner.invoke(cli, ["probe", str(llama_store), "--corpus", "probe:ioi"])
    assert builtin.exit_code == 1
    assert "scored at extraction" in builtin.output


def test_conllu_coreference_through_extraction(tmp_path: Path, llama_dir: Path) -> None:
    corpus = tmp_path / "c.conllu"
    corpus.write_text(conllu([
        ("The", "Entity=(e1-animal-2"), ("dog", "Entity=e1)"), ("saw", ""),
        ("the", "Entity=(e2-animal-2"), ("cat", "Entity=e2)"), ("and", ""),
        ("it", "Entity=(e1-animal-1)"), ("ran", ""),
    ]))  # fmt: skip
    out = tmp_path / "c.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), progress=False)
    store = attnstore.open(str(out))
    [row] = store.sql("SELECT * FROM probes").to_pylist()
    assert (row["kind"], row["n_targets"], row["n_distractors"], row["skipped"]) == ("coref", 1, 1, None)  # fmt: skip
    assert store.sql("SELECT count(*) FROM probe_scores").column(0)[0].as_py() == 3 * 4
    assert store.sql("SELECT count(*) FROM words").column(0)[0].as_py() == 8  # gold parse too


# ------------------------------------------------------------------------------------------------
# the real default model (one load for both probes)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_model() -> Any:
    from attnstore.capture import load_model

    return load_model(progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ioi", "coref"])
def test_default_model_has_semantic_heads(kind: str, default_model: Any, tmp_path: Path) -> None:
    out = tmp_path / f"{kind}.attn"
    attnstore.extract(str(out), model=default_model, corpus=f"probe:{kind}?count=48",
                      batch_size=16, scores_only=True, progress=False)  # fmt: skip
    store = attnstore.open(str(out))
    assert store.sql("SELECT count(*) FROM probes WHERE skipped IS NULL").column(0)[0].as_py() == 48
    best = store.sql(
        "SELECT * FROM probe_heads WHERE n >= 40 AND gain >= 0.3 "
        "AND mass_target >= 2 * mass_distractor ORDER BY gain DESC"
    ).to_pylist()
    # a trained model has heads that send the query to the target far beyond position baselines
    assert best, probes.best_heads(store, kind, top=5).to_pylist()
    assert best[0]["baseline"] == 0.5  # order twins: first = 0.5 (IOI: nearest = 0)
