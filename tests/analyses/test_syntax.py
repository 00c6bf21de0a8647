"""Syntactic heads (schemas/syntax.md): alignment, counts against a direct reading of the spec,
the CoNLL-U reader, and the store tables and views."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import attnstore
from attnstore import syntax
from attnstore.cli import cli
from attnstore.errors import CorpusError, ModelError
from attnstore.syntax import OFFSETS, Word, align, instances, read_conllu


def w(text: str, start: int, relation: str = "dep", head: int = -1) -> Word:
    return Word(text, start, start + len(text), relation, head)


# ------------------------------------------------------------------------------------------------
# alignment
# ------------------------------------------------------------------------------------------------
def test_alignment_most_overlap_ties_to_earlier_and_cutoff() -> None:
    #            0123456789012345
    text = "  Héllo, wörld!"
    words = [w("Héllo", 2), w(",", 7), w("wörld", 9), w("!", 14)]
    assert all(text[x.char_start : x.char_end] == x.text for x in words)
    spans = [None, (0, 4), (4, 8), (8, 12), (12, 14)]  # BOS, "  Hé", "llo,", " wör", "ld" (cut)
    a = align(words, spans, cutoff=14)
    assert [x.text for x in a.words] == ["Héllo", ",", "wörld"]  # "!" lies past the cutoff
    # "llo," overlaps Héllo by 3 and "," by 1; " wör" overlaps wörld only; BOS belongs to none
    assert a.token_word.tolist() == [-1, 0, 0, 2, 2]
    assert a.first_token == [1, None, 3]
    assert a.last_token == [2, None, 4]


def test_alignment_tie_goes_to_the_earlier_word() -> None:
    words = [w("ab", 0), w("cd", 2)]
    a = align(words, [(1, 3)], cutoff=4)  # one char of each
    assert a.token_word.tolist() == [0]


def test_alignment_with_a_real_tokenizer(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "  Déjà vu — naïve café, résumé!"
    enc = tok(text, return_offsets_mapping=True)
    spans = [tuple(s) for s in enc.offset_mapping][:9]  # truncated mid-text
    cutoff = max(s[1] for s in spans)
    words, pos = [], 0
    for piece in text.split():
        start = text.index(piece, pos)
        words.append(w(piece, start))
        pos = start + len(piece)
    a = align(words, spans, cutoff)
    assert all(x.char_end <= cutoff for x in a.words)
    for t, word in enumerate(a.token_word.tolist()):
        if word >= 0:  # the token really overlaps its word
            x = a.words[word]
            assert min(spans[t][1], x.char_end) > max(spans[t][0], x.char_start)


# ------------------------------------------------------------------------------------------------
# counts against the spec, literally
# ------------------------------------------------------------------------------------------------
def reference(a: np.ndarray, token_word: list[int], words: list[Word]) -> tuple[dict, dict]:
    """Per (relation, direction): (n, correct) for one head, and baseline (n, [correct per k])."""
    nw = len(words)
    pieces = [[t for t, x in enumerate(token_word) if x == i] for i in range(nw)]
    big_w = np.zeros((nw, nw))
    for i in range(nw):
        for j in range(nw):
            if pieces[i]:
                big_w[i, j] = np.mean([sum(a[q, k] for k in pieces[j]) for q in pieces[i]])
    pred = {}
    for i in range(1, nw):
        if pieces[i]:
            best = max(range(i), key=lambda j: (big_w[i, j], -j))  # ties → earliest j
            pred[i] = best
    inst = []
    for i in pred:
        if 0 <= words[i].head < i:
            inst.append(((words[i].relation, "dep->head"), i, {words[i].head}))
        deps = {r: {d for d in range(i) if words[d].head == i and words[d].relation == r}
                for r in {words[d].relation for d in range(i) if words[d].head == i}}  # fmt: skip
        inst.extend(((r, "head->dep"), i, ds) for r, ds in deps.items())
    acc: dict = {}
    base: dict = {}
    for key, i, targets in inst:
        n, c = acc.get(key, (0, 0))
        acc[key] = (n + 1, c + (pred[i] in targets))
        bn, bc = base.get(key, (0, [0] * len(OFFSETS)))
        base[key] = (
            bn + 1,
            [c2 + (i - k >= 0 and (i - k) in targets) for c2, k in zip(bc, OFFSETS, strict=True)],
        )
    return acc, base


@pytest.mark.parametrize("seed", range(6))
def test_counts_match_the_spec(seed: int) -> None:
    rng = np.random.default_rng(seed)
    nw = int(rng.integers(4, 14))
    relations = ["det", "nsubj", "obj"]
    words = [
        Word(f"w{i}", 3 * i, 3 * i + 2, str(rng.choice(relations)), int(rng.integers(-1, nw)))
        for i in range(nw)
    ]
    words = [
        x if x.head != i else Word(x.text, x.char_start, x.char_end, "root", -1)
        for i, x in enumerate(words)
    ]
    spans: list[tuple[int, int] | None] = [None]
    for x in words:
        if rng.random() < 0.15:
            continue  # a word no token belongs to
        cuts = sorted({x.char_start, x.char_end, int(rng.integers(x.char_start, x.char_end + 1))})
        spans.extend((lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo)
    t = len(spans)
    heads = 3
    logits = rng.normal(size=(heads, t, t)) * 2
    logits[:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if seed == 0:  # exact ties in W: the earliest word must win
        probs[:] = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    alignment = align(words, spans, cutoff=10**6)
    inst = instances(alignment)
    got = syntax.head_counts(torch.from_numpy(probs.astype(np.float32)), alignment, inst)
    n, base_correct = syntax.baseline_counts(inst)
    for h in range(heads):
        acc, base = reference(
            probs[h].astype(np.float64), alignment.token_word.tolist(), alignment.words
        )
        assert sorted(acc) == inst.keys
        for g, key in enumerate(inst.keys):
            assert (int(n[g]), int(got[h, g])) == acc[key], key
            assert base[key] == (int(n[g]), base_correct[g].tolist())


# ------------------------------------------------------------------------------------------------
# CoNLL-U
# ------------------------------------------------------------------------------------------------
GOLD = """# newdoc id = a
# text = Vino del mar.
1-2\tdel\t_\t_\t_\t_\t_\t_\t_\t_
1\tde\tde\tADP\tSP\t_\t3\tcase\t_\t_
2\tel\tel\tDET\tDA\t_\t3\tdet\t_\t_
3\tmar\tmar\tNOUN\tNC\t_\t0\troot\t_\tSpaceAfter=No
3.1\tx\t_\t_\t_\t_\t_\t_\t_\t_
4\t.\t.\tPUNCT\tFP\t_\t3\tpunct\t_\t_

1\tIt\tit\tPRON\tPRP\t_\t2\tnsubj\t_\t_
2\tworks\twork\tVERB\tVBZ\t_\t0\troot\t_\tSpaceAfter=No
3\t.\t.\tPUNCT\t.\t_\t2\tpunct\t_\t_

# newdoc id = b
1\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
"""


def test_conllu_documents_mwt_and_text(tmp_path: Path) -> None:
    p = tmp_path / "g.conllu"
    text_a = GOLD.split("# newdoc id = b")[0].replace("# text = Vino del mar.\n", "")
    p.write_text(text_a)  # no "# text": the text comes from FORM and SpaceAfter
    docs = list(read_conllu(p))
    assert len(docs) == 1  # one # newdoc: both sentences belong to it
    text, words = docs[0]
    assert text == "del mar. It works."
    assert [x.text for x in words] == ["de", "el", "mar", ".", "It", "works", "."]
    assert words[0].char_start == words[1].char_start == 0  # the MWT "del" spans both words
    assert words[0].char_end == 3
    assert [x.head for x in words] == [2, 2, -1, 2, 5, -1, 5]  # document-level indices
    assert words[2].relation == "root"
    assert all(text[x.char_start : x.char_end] in (x.text, "del") for x in words)


def test_conllu_sentences_are_documents_without_newdoc(tmp_path: Path) -> None:
    p = tmp_path / "s.conllu"
    p.write_text("# text = Hi there\n1\tHi\t_\t_\t_\t_\t0\troot\t_\t_\n2\tthere\t_\t_\t_\t_\t1\tadvmod\t_\t_\n\n"
                 "1\tBye\t_\t_\t_\t_\t0\troot\t_\t_\n\n")  # fmt: skip
    assert [t for t, _ in read_conllu(p)] == ["Hi there", "Bye"]


def test_conllu_errors_carry_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "bad.conllu"
    p.write_text("1\tA\t_\t_\t_\t_\t0\troot\t_\t_\n2\tB\t_\t_\t_\t_\t1\n")
    with pytest.raises(CorpusError, match=r"bad\.conllu:2: expected 10"):
        list(read_conllu(p))
    p.write_text("x\tA\t_\t_\t_\t_\t0\troot\t_\t_\n")
    with pytest.raises(CorpusError, match=r":1: ID and HEAD must be integers"):
        list(read_conllu(p))
    p.write_text("# text = Something else\n1\tA\t_\t_\t_\t_\t0\troot\t_\t_\n")
    with pytest.raises(CorpusError, match=r":2: word 'A' not found.*cannot align"):
        list(read_conllu(p))


def test_missing_pipeline() -> None:
    with pytest.raises(ModelError, match="No spaCy pipeline named 'nope_pipeline'"):
        syntax.load_parser("nope_pipeline")


# ------------------------------------------------------------------------------------------------
# through the store
# ------------------------------------------------------------------------------------------------
def test_gold_corpus_store_tables_and_views(tmp_path: Path, llama_dir: Path) -> None:
    corpus = tmp_path / "g.conllu"
    corpus.write_text(GOLD.split("# newdoc id = b")[0])
    out = tmp_path / "g.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), progress=False)
    store = attnstore.open(str(out))
    words = store.sql("SELECT * FROM words ORDER BY word").to_pylist()
    assert [x["text"] for x in words] == ["de", "el", "mar", ".", "It", "works", "."]
    tokens = store.sql("SELECT pos, char_start, char_end FROM tokens ORDER BY pos").to_pylist()
    text = store.sql("SELECT text FROM docs").column(0)[0].as_py()
    for x in words:  # first/last token overlap the word
        for pos in {x["first_token"], x["last_token"]} - {None}:
            assert tokens[pos]["char_end"] > x["char_start"]
            assert tokens[pos]["char_start"] < x["char_end"]
    assert text.startswith("Vino del mar.")
    n_heads = store.sql("SELECT count(DISTINCT (layer, head)) FROM syntax").column(0)[0].as_py()
    assert n_heads == 3 * 4
    view = store.sql(
        "SELECT * FROM syntax_heads WHERE relation = 'det' AND direction = 'head->dep'"
    ).to_pylist()
    assert len(view) == 12
    for r in view:
        assert math.isclose(r["gain"], r["accuracy"] - r["baseline"])
        assert 1 <= r["baseline_offset"] <= 6
    assert store.commits[0]["parser"] == "gold (corpus)"


spacy = pytest.importorskip("spacy")


def test_parse_later_equals_parse_at_extraction_when_lossless(
    tmp_path: Path, llama_dir: Path, corpus_txt: Path
) -> None:
    if not spacy.util.is_package(syntax.DEFAULT_PARSER):
        pytest.skip(f"{syntax.DEFAULT_PARSER} is not installed")
    now, later = tmp_path / "now.attn", tmp_path / "later.attn"
    attnstore.extract(
        str(now),
        model=str(llama_dir),
        corpus=str(corpus_txt),
        codec="lossless",
        parse=syntax.DEFAULT_PARSER,
        progress=False,
    )
    attnstore.extract(
        str(later), model=str(llama_dir), corpus=str(corpus_txt), codec="lossless", progress=False
    )
    runner = CliRunner()
    result = runner.invoke(cli, ["parse", str(later), "--json"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(cli, ["parse", str(later), "--json"])
    assert '"parsed": 0' in again.stdout  # resumable: nothing parsed twice
    q = "SELECT * FROM {} ORDER BY ALL"
    for table in ("words", "syntax", "syntax_baseline"):
        assert attnstore.open(str(now)).sql(q.format(table)) == attnstore.open(str(later)).sql(
            q.format(table)
        )
    from attnstore.verify import verify_store

    assert verify_store(later).ok
    heads = runner.invoke(cli, ["heads", str(later), "--syntax", "--min-n", "1", "-f", "json"])
    assert heads.exit_code == 0, heads.output
    assert heads.stdout.strip().startswith("[")


def test_word_attention_of_row_blocks_adds_up() -> None:
    rng = np.random.default_rng(3)
    words = [w(f"w{i}", 2 * i) for i in range(6)]
    spans = [(2 * i, 2 * i + 1) for i in range(6)] + [(2 * i + 1, 2 * i + 2) for i in range(6)]
    spans.sort()
    alignment = align(words, spans, cutoff=100)
    probs = torch.from_numpy(rng.random((2, 12, 12)).astype(np.float32))
    whole = syntax.word_attention(probs, alignment)
    blocks = sum(
        syntax.word_attention(probs[:, q0 : q0 + 5], alignment, q0) for q0 in range(0, 12, 5)
    )
    torch.testing.assert_close(blocks, whole)
