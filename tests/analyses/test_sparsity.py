"""The sparsity analysis (schemas/sparsity.md) against a plain implementation from full matrices,
the needle probe's documents, the sparsity_summary view and its CLI listings."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnstore.abc.analysis import Analysis, Batch
from attnstore.analyses.sparsity import (
    COLUMNS,
    NEEDLES_SCHEMA,
    SCHEMA,
    Sparsity,
    align_needle,
)
from attnstore.needles import Needle
from tests.helpers import GOLDEN

# ------------------------------------------------------------------------------------------------
# the reference: the spec read literally, one full matrix at a time
# ------------------------------------------------------------------------------------------------


def reference(
    a: np.ndarray, ids: list[int], needle: tuple[list[int], list[int]] | None
) -> dict[str, list[float | None]]:
    """Columns of one document (``a``: float32 ``[H, n, n]``, causal) per head."""
    n_heads, n, _ = a.shape
    out: dict[str, list[float | None]] = {c: [] for c in (*COLUMNS, "n_queries", "n_retrieval")}
    for h in range(n_heads):
        if n < 2:
            for c in COLUMNS:
                out[c].append(None)
            out["n_queries"].append(0)
            out["n_retrieval"].append(0)
            continue
        m = a[h].astype(np.float64)
        sink = local = stream = span50 = span90 = 0.0
        cols = np.zeros(n)
        diags = np.zeros(n)
        for q in range(1, n):
            row = m[q, : q + 1]
            sink += sum(row[k] for k in range(min(4, q + 1)))
            local += sum(row[k] for k in range(q + 1) if q - k <= 63)
            stream += sum(row[k] for k in range(q + 1) if k < 128 or q - k < 256)
            back = np.cumsum(row[::-1])  # Σ_{q-D ≤ k ≤ q} for D = 0 … q
            r = back[-1]
            span50 += next(d for d in range(q + 1) if back[d] >= 0.5 * r)
            span90 += next(d for d in range(q + 1) if back[d] >= 0.9 * r)
            for k in range(q + 1):
                cols[k] += row[k]
                diags[q - k] += row[k]
        nq = n - 1
        top = math.ceil(n / 100)
        out["sink4"].append(sink / nq)
        out["local64"].append(local / nq)
        out["stream"].append(stream / nq)
        out["span50"].append(span50 / nq)
        out["span90"].append(span90 / nq)
        out["vertical1"].append(
            float(np.sort(cols)[::-1][:top].sum() / cols.sum()) if cols.sum() > 0 else None
        )
        out["slash1"].append(
            float(np.sort(diags)[::-1][:top].sum() / diags.sum()) if diags.sum() > 0 else None
        )
        if needle is None:
            out["retrieval"].append(None)
            out["n_retrieval"].append(0)
        else:
            value, answer = needle
            hits = 0
            for pos in answer:
                q = pos - 1
                row = m[q, : q + 1]
                best = int(np.flatnonzero(row == row.max())[0])  # lowest k on ties
                hits += best in value and ids[best] == ids[pos]
            out["retrieval"].append(hits / len(answer))
            out["n_retrieval"].append(len(answer))
        out["n_queries"].append(nq)
    return out


# ------------------------------------------------------------------------------------------------
# random batches
# ------------------------------------------------------------------------------------------------


def causal_matrix(
    rng: np.random.Generator, n_heads: int, n: int, *, unit_rows: bool = False
) -> np.ndarray:
    """Random causal rows: sparse, with ties, some summing below 1 (a dropped sink logit), some 0."""
    a = np.zeros((n_heads, n, n), np.float32)
    for h in range(n_heads):
        for q in range(n):
            kind = rng.integers(0, 6)
            if kind == 0 and unit_rows:
                # the tile path compares its float32 tile sums with p·1: no exact ties at p·r_q
                kind = 2
            if kind == 0:  # quantized weights: exact ties in argmax, columns and diagonals
                w = rng.integers(0, 3, q + 1).astype(np.float64)
            elif kind == 1:  # a peaked row
                w = np.zeros(q + 1)
                w[rng.integers(0, q + 1)] = 1.0
            else:
                w = rng.random(q + 1) ** 4
                w[rng.random(q + 1) < 0.3] = 0.0
            total = w.sum()
            # rows summing below 1 (a learned sink), except for a softmax's rows (the tile path)
            mass = 1.0 if kind < 4 or unit_rows else rng.uniform(0.2, 1.0)
            if total > 0:
                a[h, q, : q + 1] = (w / total * mass).astype(np.float32)
    return a


def make_batch(
    lengths: list[int], n_heads: int, seed: int, pad: int, needles: bool, unit_rows: bool = False
) -> tuple[Batch, list[np.ndarray], list[list[int]], list[tuple[list[int], list[int]] | None]]:
    rng = np.random.default_rng(seed)
    t = max(lengths) + pad
    token_ids = torch.zeros(len(lengths), t, dtype=torch.int64)
    mats, all_ids, marks, documents = [], [], [], []
    for i, n in enumerate(lengths):
        ids = rng.integers(0, 5, n).tolist()  # a small vocabulary: equal ids away from the value
        mark = None
        doc: Any = SimpleNamespace(doc=SimpleNamespace(needle=None), spans=None)
        if needles and n >= 6 and rng.random() < 0.7:
            v0 = int(rng.integers(0, n // 2 - 1))
            width = int(rng.integers(1, min(3, n // 2 - v0) + 1))
            a0 = int(rng.integers(max(v0 + width, n // 2), n - width + 1))
            ids[a0 : a0 + width] = ids[v0 : v0 + width]
            value, answer = list(range(v0, v0 + width)), list(range(a0, a0 + width))
            mark = (value, answer)
            # one character per token: token i covers [i, i + 1)
            needle = Needle(0.5, (v0, v0 + width), (a0, a0 + width))
            doc = SimpleNamespace(
                doc=SimpleNamespace(needle=needle), spans=[(k, k + 1) for k in range(n)]
            )
        a = causal_matrix(rng, n_heads, n, unit_rows=unit_rows)
        if mark is not None:  # make some answer rows look at the value
            for pos in mark[1]:
                a[0, pos - 1, :] = 0
                a[0, pos - 1, mark[0][0]] = 1.0
        token_ids[i, :n] = torch.tensor(ids)
        mats.append(a)
        all_ids.append(ids)
        marks.append(mark)
        documents.append(doc)
    batch = Batch(
        doc_ids=[100 + i for i in range(len(lengths))],
        token_ids=token_ids,
        lengths=torch.tensor(lengths),
        n_layers=8,
        n_heads=n_heads + 2,
        device=torch.device("cpu"),
        texts=[""] * len(lengths),
        layers=(2, 5),
        heads=tuple(range(1, n_heads + 1)),
        documents=documents,
    )
    return batch, mats, all_ids, marks


def padded(batch: Batch, mats: list[np.ndarray]) -> np.ndarray:
    """The batch's matrices of one layer, ``[B, H, T, T]`` float32, zero past each length."""
    t = batch.token_ids.shape[1]
    full = np.zeros((len(mats), len(batch.heads), t, t), np.float32)
    for i, a in enumerate(mats):
        n = a.shape[1]
        full[i, :, :n, :n] = a
    return full


def feed(analysis: Sparsity, batch: Batch, layer_mats: dict[int, list[np.ndarray]],
         blocks: list[int], rng: np.random.Generator) -> None:  # fmt: skip
    """Rows of every layer in blocks of the given sizes, K between the block's end and T."""
    t = batch.token_ids.shape[1]
    for layer, mats in layer_mats.items():
        full = padded(batch, mats)
        q0, j = 0, 0
        while q0 < t:
            q = min(blocks[j % len(blocks)], t - q0)
            k = int(rng.integers(q0 + q, t + 1))
            analysis.rows(layer, q0, torch.from_numpy(full[:, :, q0 : q0 + q, :k].copy()))
            q0, j = q0 + q, j + 1


def feed_tiles(analysis: Sparsity, batch: Batch, layer_mats: dict[int, list[np.ndarray]],
               q_block: int, k_block: int) -> None:  # fmt: skip
    """The tile protocol: per block of rows, tiles from the diagonal down to key 0."""
    t = batch.token_ids.shape[1]
    for layer, mats in layer_mats.items():
        full = padded(batch, mats)
        for q0 in range(0, t, q_block):
            q1 = min(q0 + q_block, t)
            for k0 in reversed(range(0, q1, k_block)):
                k1 = min(k0 + k_block, q1)
                analysis.tile(layer, q0, k0, torch.from_numpy(full[:, :, q0:q1, k0:k1].copy()))


def check(
    table: pa.Table,
    batch: Batch,
    expected: dict[tuple[int, int], dict[str, list[Any]]],
    rel: float = 1e-9,
) -> None:
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert len(rows) == sum(len(v["n_queries"]) for v in expected.values())
    for row in rows:
        ref = expected[(row["doc_id"], row["layer"])]
        j = batch.heads.index(row["head"])
        for c in (*COLUMNS, "n_queries", "n_retrieval"):
            want, got = ref[c][j], row[c]
            if want is None:
                assert got is None, (c, row)
            else:
                assert got == pytest.approx(want, rel=rel, abs=1e-12), (c, row, want)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    n_heads=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    pad=st.integers(0, 3),
    blocks=st.lists(st.integers(1, 17), min_size=1, max_size=4),
    tiles=st.none() | st.integers(1, 23),
)
def test_columns_equal_the_spec_from_full_matrices(
    lengths: list[int], n_heads: int, seed: int, pad: int, blocks: list[int], tiles: int | None
) -> None:
    """Row blocks (``rows``) or, with ``tiles`` keys per tile, the tile protocol of scores-only
    sdpa runs: softmax rows there (mass 1), column and diagonal masses float32 within a tile."""
    unit = tiles is not None
    batch, mats, ids, marks = make_batch(lengths, n_heads, seed, pad, True, unit_rows=unit)
    rng = np.random.default_rng(seed + 1)
    layer_mats = {2: mats, 5: [causal_matrix(rng, n_heads, n, unit_rows=unit) for n in lengths]}
    analysis = Sparsity()
    analysis.begin(batch)
    if tiles is None:
        feed(analysis, batch, layer_mats, blocks, rng)
    else:
        feed_tiles(analysis, batch, layer_mats, blocks[0], tiles)
    out = analysis.end()
    expected = {
        (100 + i, layer): reference(m[i], ids[i], marks[i])
        for layer, m in layer_mats.items()
        for i in range(len(lengths))
    }
    check(out["sparsity"], batch, expected, rel=1e-6 if unit else 1e-9)
    needles = out["needles"].to_pylist()
    want = [
        {"doc_id": 100 + i, "depth": 0.5, "value_first": v[0], "value_last": v[-1],
         "answer_first": a[0], "answer_last": a[-1]}
        for i, mark in enumerate(marks) if mark is not None for v, a in [mark]
    ]  # fmt: skip
    assert needles == want
    assert out["needles"].schema == NEEDLES_SCHEMA


def test_long_tiles_windows() -> None:
    """Windows of 64 and 128 + 256 tokens and 1% of 700 keys, in tiles that do not divide T."""
    batch, mats, ids, _marks = make_batch([700, 450], 2, 7, 5, needles=False, unit_rows=True)
    analysis = Sparsity()
    analysis.begin(batch)
    feed_tiles(analysis, batch, {2: mats}, 97, 61)
    expected = {(100 + i, 2): reference(m, ids[i], None) for i, m in enumerate(mats)}
    check(analysis.end()["sparsity"], batch, expected, rel=1e-6)


def test_long_rows_windows_and_blocks() -> None:
    """Windows of 64 and 128 + 256 tokens and 1% of 700 keys, in blocks that do not divide T."""
    batch, mats, ids, _marks = make_batch([700, 450], 2, 7, 5, needles=False)
    analysis = Sparsity()
    analysis.begin(batch)
    feed(analysis, batch, {2: mats}, [97, 256], np.random.default_rng(0))
    expected = {(100 + i, 2): reference(m, ids[i], None) for i, m in enumerate(mats)}
    check(analysis.end()["sparsity"], batch, expected)


def test_short_documents_are_null() -> None:
    batch, mats, _ids, _marks = make_batch([1, 2], 1, 3, 0, needles=False)
    analysis = Sparsity()
    analysis.begin(batch)
    feed(analysis, batch, {2: mats}, [1], np.random.default_rng(0))
    rows = {r["doc_id"]: r for r in analysis.end()["sparsity"].to_pylist()}
    assert all(rows[100][c] is None for c in COLUMNS)
    assert rows[100]["n_queries"] == 0
    assert rows[100]["n_retrieval"] == 0
    assert rows[101]["n_queries"] == 1
    assert rows[101]["sink4"] == pytest.approx(1.0)
    assert rows[101]["span50"] == 0.0 or rows[101]["span50"] == 1.0
    assert rows[101]["retrieval"] is None


def test_protocol_and_state_dropped_per_layer() -> None:
    analysis = Sparsity()
    assert isinstance(analysis, Analysis)
    assert analysis.name == "sparsity"
    assert set(analysis.extra_schemas) == {"needles"}
    batch, mats, _ids, _marks = make_batch([30, 12], 2, 1, 2, needles=False)
    analysis.begin(batch)
    feed(analysis, batch, {2: mats}, [8], np.random.default_rng(0))
    assert not analysis._layers  # the layer's [H, n] accumulators went with its last block
    second = analysis.end()["sparsity"]
    assert second.num_rows == 2 * 2


def test_align_needle_edges() -> None:
    needle = Needle(0.3, (2, 4), (8, 10))
    spans = [(0, 2), (2, 4), (4, 8), (8, 10)]
    assert align_needle(needle, spans, [1, 2, 3, 2]).scorable
    assert not align_needle(needle, spans, [1, 2, 3, 4]).scorable  # different ids
    cut = align_needle(needle, spans[:3], [1, 2, 3])  # answer truncated away
    assert cut.answer is None
    assert cut.value == (1, 1)
    assert not cut.scorable
    assert align_needle(needle, None, [1, 2, 3, 2]) == align_needle(needle, None, [])


# ------------------------------------------------------------------------------------------------
# the needle probe's documents
# ------------------------------------------------------------------------------------------------


def word_tokenizer(split: str) -> Any:
    """A fast word-level tokenizer (BOS first): ``words`` splits words from punctuation,
    ``spaces`` splits at white space only (``maple.`` is one token), ``blanks`` at spaces only."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from attnstore.needles import VALUE_WORDS

    words = ["The", "secret", "passphrase", "is", ".", "Question", ":", "What", "the", "?"]
    vocab = {"[UNK]": 0, "<s>": 1}
    for w in [*VALUE_WORDS, *words, "Answer", "a", "of", "to", "and", "in", "object"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = {
        "words": pre_tokenizers.Whitespace(),
        "spaces": pre_tokenizers.WhitespaceSplit(),
        "blanks": pre_tokenizers.CharDelimiterSplit(" "),
    }[split]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


def needle_positions(
    text: str, needle: Needle, encode: Any
) -> tuple[list[int], list[int], list[int]]:
    ids, spans = encode(text)
    aligned = align_needle(needle, spans, ids)
    assert aligned.scorable
    assert aligned.value is not None
    assert aligned.answer is not None
    v = list(range(aligned.value[0], aligned.value[1] + 1))
    a = list(range(aligned.answer[0], aligned.answer[1] + 1))
    return list(ids), v, a


@pytest.mark.parametrize("split", ["words", "spaces"])
def test_needle_value_and_answer_hold_the_same_ids_found_nowhere_else(split: str) -> None:
    from attnstore.corpus import parse_probe
    from attnstore.needles import NeedleProbe, build_documents, hf_encoder

    probe = parse_probe("probe:needle?tokens=400&count=5&seed=3")
    assert isinstance(probe, NeedleProbe)
    encode = hf_encoder(word_tokenizer(split))
    docs = build_documents(probe, encode)
    assert docs == build_documents(probe, encode)  # seeded
    assert len(docs) == 5
    for (text, needle), want in zip(docs, [0.1, 0.3, 0.5, 0.7, 0.9], strict=True):
        ids, v, a = needle_positions(text, needle, encode)
        value = [ids[i] for i in v]
        assert value == [ids[i] for i in a]
        assert 0 not in value  # no unknown token: three real words
        assert not set(value) & {t for i, t in enumerate(ids) if i not in {*v, *a}}
        assert text[needle.value[0] : needle.value[1]] == text[needle.answer[0] : needle.answer[1]]
        assert abs(needle.depth - want) < 0.1
        assert 0.8 * 400 <= len(ids) <= 1.1 * 400
        if split == "spaces":  # 'maple.' would be one token: the newline layout
            assert text.endswith("\n")
        else:
            assert text.endswith(".")


def test_needle_depth_option_and_one_document() -> None:
    from attnstore.needles import build_documents, hf_encoder, parse_needle

    encode = hf_encoder(word_tokenizer("words"))
    ((text, needle),) = build_documents(
        parse_needle("probe:needle?tokens=300&depth=0&count=1"), encode
    )
    assert needle.depth == 0.0
    assert text.startswith("The secret passphrase is ")
    docs = build_documents(parse_needle("probe:needle?tokens=300&count=1"), encode)
    assert abs(docs[0][1].depth - 0.5) < 0.1


def test_needle_refused_when_the_tokenizer_merges_or_repeats() -> None:
    from attnstore.errors import CorpusError
    from attnstore.needles import build_documents, hf_encoder, parse_needle
    from attnstore.testing import tiny_tokenizer

    probe = parse_needle("probe:needle?tokens=300&count=1")
    with pytest.raises(CorpusError, match="merges the value with its neighbours") as err:
        build_documents(probe, hf_encoder(word_tokenizer("blanks")))
    assert "\n" not in str(err.value)
    with pytest.raises(CorpusError, match="occur nowhere else") as err:
        build_documents(probe, hf_encoder(tiny_tokenizer(400)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("probe:needle?tokens=abc", "tokens must be an integer"),
        ("probe:needle?depth=deep", "depth must be a number"),
        ("probe:needle?depth=1.5", r"depth must be in \[0, 1\]"),
        ("probe:needle?count=0", "count must be ≥ 1"),
        ("probe:needle?tokens=10", "tokens must be ≥ 64"),
        ("probe:needle?needles=3", "Unknown probe option 'needles'"),
        ("probe:neddle", "probe:needle"),
    ],
)
def test_bad_needle_specs_get_one_clear_line(spec: str, match: str) -> None:
    from attnstore.corpus import parse_probe
    from attnstore.errors import CorpusError

    with pytest.raises(CorpusError, match=match) as err:
        parse_probe(spec)
    assert "\n" not in str(err.value)


def test_needle_documents_through_the_analysis() -> None:
    """Generated documents, tokenized as extraction does, scored against the reference."""
    from attnstore.corpus import Document
    from attnstore.needles import build_documents, hf_encoder, parse_needle

    encode = hf_encoder(word_tokenizer("words"))
    docs = build_documents(parse_needle("probe:needle?tokens=120&count=2&seed=1"), encode)
    encoded = [encode(text) for text, _ in docs]
    lengths = [len(ids) for ids, _ in encoded]
    token_ids = torch.zeros(2, max(lengths), dtype=torch.int64)
    documents = []
    for i, ((text, needle), (ids, spans)) in enumerate(zip(docs, encoded, strict=True)):
        token_ids[i, : len(ids)] = torch.tensor(list(ids))
        documents.append(SimpleNamespace(doc=Document(i, text, needle=needle), spans=list(spans)))
    batch = Batch(
        doc_ids=[0, 1], token_ids=token_ids, lengths=torch.tensor(lengths), n_layers=1, n_heads=2,
        device=torch.device("cpu"), texts=[t for t, _ in docs], layers=(0,), heads=(0, 1),
        documents=documents,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    mats = [causal_matrix(rng, 2, n) for n in lengths]
    marks = []
    for i, (text, needle) in enumerate(docs):
        ids, v, a = needle_positions(text, needle, encode)
        for pos, src in zip(a, v, strict=True):  # head 0 copies the value
            mats[i][0, pos - 1, :] = 0
            mats[i][0, pos - 1, src] = 1
        marks.append((v, a))
    analysis = Sparsity()
    analysis.begin(batch)
    feed(analysis, batch, {0: mats}, [33], rng)
    out = analysis.end()
    expected = {(i, 0): reference(mats[i], list(encoded[i][0]), marks[i]) for i in range(2)}
    check(out["sparsity"], batch, expected)
    rows = out["sparsity"].to_pylist()
    assert [r["retrieval"] for r in rows if r["head"] == 0] == [1.0, 1.0]
    needles = out["needles"].to_pylist()
    assert [(r["value_first"], r["answer_last"]) for r in needles] == [
        (v[0], a[-1]) for v, a in marks
    ]
    assert [r["depth"] for r in needles] == [needle.depth for _, needle in docs]


# ------------------------------------------------------------------------------------------------
# a store: sparsity_summary, the CLI listings, head profiles
# ------------------------------------------------------------------------------------------------


def add_sparsity(path: Path, *, needles: bool) -> None:
    """Score the store's decoded matrices with :class:`Sparsity` (one block per layer) and commit
    its tables; with ``needles``, pretend each document repeats a token as a needle."""
    from attnstore.store import Segment, Store, StoreWriter

    store = Store(path)
    m = store.manifest
    layers, heads = tuple(m["layers"]), tuple(m["heads"])
    analysis = Sparsity()
    tables: dict[str, list[pa.Table]] = {"sparsity": [], "needles": []}
    for doc_id in store.sql("SELECT doc_id FROM docs WHERE skipped IS NULL").column(0).to_pylist():
        ids = [int(x) for x in store.token_ids(doc_id)]
        spans = store.token_spans(doc_id)
        doc: Any = SimpleNamespace(doc=SimpleNamespace(needle=None), spans=spans)
        if needles:  # the first id seen again two or more tokens later: "value" and "answer"
            pairs = [(i, j) for i in range(1, len(ids)) for j in range(i + 2, len(ids))
                     if ids[i] == ids[j] and spans[i] and spans[j]]  # fmt: skip
            if pairs:
                i, j = pairs[0]
                needle = Needle(0.5, spans[i], spans[j])  # type: ignore[arg-type]
                doc = SimpleNamespace(doc=SimpleNamespace(needle=needle), spans=spans)
        batch = Batch(
            doc_ids=[doc_id], token_ids=torch.tensor([ids]), lengths=torch.tensor([len(ids)]),
            n_layers=m["model"]["n_layers"], n_heads=m["model"]["n_heads"],
            device=torch.device("cpu"), texts=[""], layers=layers, heads=heads, documents=[doc],
        )  # fmt: skip
        analysis.begin(batch)
        mats = store.matrices(doc_id)
        for li, layer in enumerate(layers):
            analysis.rows(layer, 0, torch.from_numpy(np.ascontiguousarray(mats[li][None])))
        for name, table in analysis.end().items():
            tables[name].append(table)
    extra = {k: pa.concat_tables(v).to_pydict() for k, v in tables.items() if v}
    StoreWriter(path, m).commit(Segment(docs={}, tokens={}, heads={}, extra=extra))


@pytest.fixture
def sparse_store(tmp_path: Path, llama_store: Path) -> Path:
    import shutil

    path = tmp_path / "sparse.attn"
    shutil.copytree(llama_store, path)
    add_sparsity(path, needles=True)
    return path


def test_sparsity_summary_weights_and_labels(sparse_store: Path) -> None:
    import attnstore
    from attnstore.analyses.sparsity import RETRIEVAL_MIN, RETRIEVAL_MIN_N

    store = attnstore.open(str(sparse_store))
    rows = store.sql("SELECT * FROM sparsity ORDER BY doc_id, layer, head").to_pylist()
    summary = {
        (r["layer"], r["head"]): r for r in store.sql("SELECT * FROM sparsity_summary").to_pylist()
    }
    assert len(summary) == len(store.manifest["layers"]) * len(store.manifest["heads"])
    for (layer, head), s in summary.items():
        mine = [r for r in rows if r["layer"] == layer and r["head"] == head]
        w = sum(r["n_queries"] for r in mine)
        assert s["n_queries"] == w
        assert s["n_docs"] == len(mine)
        for c in ("sink4", "stream", "span90", "vertical1"):
            want = sum(r[c] * r["n_queries"] for r in mine if r[c] is not None) / w
            assert s[c] == pytest.approx(want)
        nr = sum(r["n_retrieval"] for r in mine)
        assert s["n_retrieval"] == nr > 0
        hits = sum(r["retrieval"] * r["n_retrieval"] for r in mine if r["retrieval"] is not None)
        assert s["retrieval"] == pytest.approx(hits / nr)
        assert s["stream_long"] is None  # documents of ≤ 96 tokens say nothing about streaming
        want_label = (
            "retrieval" if s["retrieval"] >= RETRIEVAL_MIN and nr >= RETRIEVAL_MIN_N else "none"
        )
        assert s["label"] == want_label
    for r in rows:  # the tiny documents: every row inside the budget
        assert r["stream"] == pytest.approx(1.0, abs=1e-4)
    assert store.sql("SELECT count(*) FROM needles").column(0)[0].as_py() > 0


def test_cli_lists_retrieval_and_sparsity_heads(sparse_store: Path, llama_store: Path) -> None:
    import json

    from click.testing import CliRunner

    from attnstore.cli import cli

    runner = CliRunner()
    out = runner.invoke(
        cli, ["heads", str(sparse_store), "--retrieval", "--top", "3", "-f", "json"]
    )
    assert out.exit_code == 0, out.output
    best = json.loads(out.output)
    assert len(best) == 3
    assert [b["retrieval"] for b in best] == sorted((b["retrieval"] for b in best), reverse=True)
    out = runner.invoke(cli, ["heads", str(sparse_store), "--sparsity", "-f", "json"])
    assert out.exit_code == 0, out.output
    assert {"sink4", "stream", "span50", "slash1", "label"} <= set(json.loads(out.output)[0])
    # a store without them says why
    out = runner.invoke(cli, ["heads", str(llama_store), "--retrieval"])
    assert out.exit_code == 1
    assert "no needle documents" in out.output
    assert "probe:needle" in out.output
    # sparsity runs by default now: a 2.0 store, written before it, has no sparsity rows
    older = GOLDEN / "v2.0.attn"
    out = runner.invoke(cli, ["heads", str(older), "--sparsity"])
    assert out.exit_code == 1
    assert "no sparsity rows" in out.output
    assert "Traceback" not in out.output


def test_profile_reads_with_datasets_and_duo_attention(
    sparse_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import datasets
    from click.testing import CliRunner

    import attnstore
    from attnstore.cli import cli
    from attnstore.profiles import DATA_FILE

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out_dir = tmp_path / "profile"
    result = CliRunner().invoke(
        cli, ["profile", str(sparse_store), "--out", str(out_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    store = attnstore.open(str(sparse_store))
    m = store.manifest
    assert report["heads"] == len(m["layers"]) * len(m["heads"])
    ds = datasets.load_dataset("parquet", data_dir=str(out_dir))["train"]
    assert ds.num_rows == report["heads"]
    row = ds[0]
    assert row["model"] == m["model"]["id"]
    assert row["corpus"] == "pydoc:topics"
    tokens = store.sql("SELECT sum(n_tokens) FROM docs WHERE skipped IS NULL").column(0)[0].as_py()
    assert row["corpus_tokens"] == tokens
    for c in ("induction", "sink", "sink4", "span90", "retrieval"):
        assert {f"{c}_mean", f"{c}_p10", f"{c}_p50", f"{c}_p90"} <= set(ds.column_names)
    summary = store.sql("SELECT * FROM head_summary ORDER BY layer, head").to_pylist()
    assert [r["label"] for r in ds] == [s["label"] for s in summary]
    assert ds["induction_mean"] == pytest.approx([s["induction"] for s in summary])
    per_doc = (
        store.sql(
            "SELECT sink4 FROM sparsity WHERE layer = ? AND head = ?", [row["layer"], row["head"]]
        )
        .column(0)
        .to_pylist()
    )
    assert row["sink4_p50"] == pytest.approx(float(np.quantile(per_doc, 0.5)))
    assert (out_dir / DATA_FILE).is_file()
    card = (out_dir / "README.md").read_text()
    assert card.startswith("---\n")
    assert "data_files" in card
    # DuoAttention's layout: a row per layer, a gate per kv head; no long document: all full
    gates = np.loadtxt(out_dir / "full_attention_heads.tsv", delimiter="\t", ndmin=2)
    assert gates.shape == (m["model"]["n_layers"], m["model"]["n_kv_heads"])
    assert (gates == 1).all()
    assert json.loads((out_dir / "config.json").read_text())["recent_size"] == 256


def test_gates_rule(sparse_store: Path) -> None:
    import attnstore
    from attnstore.profiles import gates

    store = attnstore.open(str(sparse_store))
    m = store.manifest["model"]  # 3 layers, 4 query heads on 2 kv heads
    rows = [
        {"layer": 0, "head": 0, "stream_long": 0.99, "sparsity_label": "streaming"},
        {"layer": 0, "head": 1, "stream_long": 0.97, "sparsity_label": "streaming"},
        {"layer": 0, "head": 2, "stream_long": 0.99, "sparsity_label": "streaming"},
        {"layer": 0, "head": 3, "stream_long": 0.50, "sparsity_label": "none"},
        {"layer": 1, "head": 0, "stream_long": 0.99, "sparsity_label": "retrieval"},
        {"layer": 1, "head": 1, "stream_long": 0.99, "sparsity_label": "streaming"},
        {"layer": 1, "head": 2, "stream_long": None, "sparsity_label": "none"},
        {"layer": 1, "head": 3, "stream_long": 0.99, "sparsity_label": "streaming"},
    ]  # layer 2 not stored
    g = gates(store, pa.Table.from_pylist(rows))
    assert g.shape == (m["n_layers"], m["n_kv_heads"])
    assert g.tolist() == [[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]


def test_probe_documents_carry_the_needle() -> None:
    from attnstore.capture import probe_documents
    from attnstore.corpus import parse_probe

    probe = parse_probe("probe:needle?tokens=200&count=2")
    docs = probe_documents(SimpleNamespace(tokenizer=word_tokenizer("words")), probe)  # type: ignore[arg-type]
    assert [d.doc_id for d in docs] == [0, 1]
    for d in docs:
        assert d.needle is not None
        assert d.token_ids is None
        value = d.text[d.needle.value[0] : d.needle.value[1]]
        assert d.text.endswith(f"Answer: {value}.")


def test_extract_refuses_a_needle_corpus_the_tokenizer_cannot_carry(
    llama_dir: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from attnstore.cli import cli

    out = tmp_path / "n.attn"
    result = CliRunner().invoke(
        cli, ["extract", "--out", str(out), "--model", str(llama_dir), "--corpus",
              "probe:needle?tokens=100&count=1", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "occur nowhere else" in result.output
    assert "Traceback" not in result.output
    assert not (out / "tables").exists()
    bad = CliRunner().invoke(
        cli, ["extract", "--out", str(out), "--corpus", "probe:needle?depth=2"]
    )
    assert bad.exit_code == 1
    assert "depth must be in [0, 1]" in bad.output


# ------------------------------------------------------------------------------------------------
# the census pass: scores.online_layer_scores feeding the analysis (compiled loop and torch path)
# ------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 120), min_size=1, max_size=3),
    n_heads=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    pad=st.integers(0, 3),
    scale=st.sampled_from([0.2, 1.0, 4.0]),
    tile_keys=st.integers(16, 70),
    kernel=st.booleans(),
)
def test_census_pass_feeds_the_spec(
    lengths: list[int], n_heads: int, seed: int, pad: int, scale: float, tile_keys: int,
    kernel: bool,
) -> None:  # fmt: skip
    """The scores-only census: weights from queries and keys in tiles, the compiled loop's tile
    statistics (``tile_stats``) or the torch path's tiles; the table equals the spec read from the
    full matrices of the same weights, and those weights are the softmax of the logits."""
    from attnstore.scores import batch_masks, online_layer_scores

    batch, _mats, ids, marks = make_batch(lengths, n_heads, seed, pad, True, unit_rows=True)
    b, t, d = len(lengths), batch.token_ids.shape[1], 8
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n_heads, t, d, generator=gen) * scale
    k = torch.randn(b, n_heads, t, d, generator=gen) * scale
    analysis = Sparsity()
    analysis.begin(batch)
    full = torch.zeros(b, n_heads, t, t)

    def tile(q0: int, k0: int, p: torch.Tensor, stats: Any = None) -> None:
        full[:, :, q0 : q0 + p.shape[2], k0 : k0 + p.shape[3]] = p
        analysis.tile_stats(2, q0, k0, p, stats)

    online_layer_scores(
        q, k, None, batch_masks(batch.token_ids, batch.lengths), scaling=0.5,
        block_bytes=4 * b * n_heads * tile_keys * tile_keys, tile=tile,
        stats_levels=Sparsity.span_levels, kernel=kernel,
    )  # fmt: skip
    pos = torch.arange(t)
    allowed = (pos[None, :] <= pos[:, None])[None, None] & (pos < batch.lengths[:, None])[
        :, None, None, :
    ]
    softmax = torch.softmax((q @ k.mT * 0.5).masked_fill(~allowed, -math.inf), -1)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(full[i, :, :n, :n], softmax[i, :, :n, :n], atol=1e-6, rtol=1e-5)
        assert not full[i, :, n:].any()  # rows past the length carry no weight
    expected = {
        (100 + i, 2): reference(full[i, :, :n, :n].numpy(), ids[i], marks[i])
        for i, n in enumerate(lengths)
    }
    check(analysis.end()["sparsity"], batch, expected, rel=1e-5)
