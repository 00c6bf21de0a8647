"""Extraction against transformers' own eager attention, padding invariance, and the store it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import attnstore
from attnstore.capture import Extractor, load_model, probe_documents
from attnstore.codecs import get_codec
from attnstore.corpus import Document, InductionProbe
from attnstore.errors import ModelError
from attnstore.scores import SCORE_COLUMNS
from tests.analyses.test_scores import reference_scores

TEXTS = [
    "The cat sat on the mat and the cat slept.",
    "def f(x): return x + 1  # def f(x): return x + 1",
    "Short.",
]


def eager_attentions(folder: Path, text: str) -> tuple[list[int], np.ndarray]:
    """[layer, head, T, T] from transformers' eager path with output_attentions=True."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = tok(text).input_ids
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    return ids, torch.stack(out.attentions)[:, 0].numpy()


@pytest.mark.parametrize("arch", ["llama_dir", "gpt2_dir"])
@pytest.mark.parametrize(
    ("mode", "chunk_bytes"),
    [("eager", 1 << 28), ("sdpa", 1 << 28), ("eager", 4096), ("sdpa", 4096)],
)
def test_capture_equals_eager_and_padding_is_invisible(
    arch: str, mode: str, chunk_bytes: int, request: pytest.FixtureRequest
) -> None:
    """Every capture path (own output or sdpa's, whole layers or blocks of a few query rows) gives
    transformers' eager attention, and the same scores as the spec computed on it."""
    folder = request.getfixturevalue(arch)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.captured
    ex = Extractor(loaded, get_codec("float32"), max_length=64, mode=mode, chunk_bytes=chunk_bytes)
    docs = [ex.tokenize(Document(i, t)) for i, t in enumerate(TEXTS)]
    batch = ex.run(docs)  # padded: three different lengths
    alone = ex.run(docs[2:])  # the shortest document on its own
    n = len(docs[2].ids)
    np.testing.assert_allclose(batch.codes[2], alone.codes[0], atol=1e-6)
    for i, text in enumerate(TEXTS):
        ids, eager = eager_attentions(folder, text)
        assert ids == docs[i].ids
        m = len(ids)
        got = batch.codes[i].reshape(eager.shape[0], eager.shape[1], -1)
        expected = eager.reshape(*eager.shape[:2], m * m)[
            ..., np.flatnonzero(np.tril(np.ones((m, m))))
        ]
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # scores of the padded batch equal the spec computed on eager attention, document by document
    n_l, n_h = eager.shape[:2]
    heads = batch.heads
    for i, text in enumerate(TEXTS):
        ids, eager = eager_attentions(folder, text)
        for layer in range(n_l):
            for head in range(n_h):
                row = (i * n_l + layer) * n_h + head
                assert heads["doc_id"][row] == i
                assert heads["layer"][row] == layer
                ref = reference_scores(eager[layer, head].astype(np.float64), ids)
                for name in SCORE_COLUMNS:
                    value = heads[name][row]
                    if ref[name] is None:
                        assert np.isnan(value)
                    else:
                        assert value == pytest.approx(ref[name], abs=1e-5)
    assert n == len(alone.tokens["pos"])


@pytest.mark.parametrize("arch", ["llama_dir", "gpt2_dir"])
def test_sdpa_mode_leaves_model_outputs_unchanged(
    arch: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnstore.capture import hook

    folder = request.getfixturevalue(arch)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    eager = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    loaded = load_model(str(folder), device="cpu")
    with torch.no_grad():
        expected = eager(**batch).logits
        for mode in ("eager", "sdpa"):
            hook._ACTIVE = hook._Capture(
                lambda *a: None, lambda *a: None, mode=mode, chunk_bytes=2048
            )
            try:
                got = loaded.model(**batch).logits
            finally:
                hook._ACTIVE = None
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_store_roundtrip_matches_eager_within_codec_bound(
    llama_dir: Path, corpus_txt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.attn"
    report = attnstore.extract(
        str(out), model=str(llama_dir), corpus=str(corpus_txt), batch_size=3, progress=False
    )
    assert report.docs_written == 5
    assert report.docs_skipped == {"empty": 2}
    store = attnstore.open(str(out))
    bound = store.codec.max_abs_error
    texts = corpus_txt.read_text().splitlines()
    for doc_id in (0, 4, 6):
        ids, eager = eager_attentions(llama_dir, texts[doc_id])
        for layer, head in ((0, 0), (2, 3), (1, 2)):
            a = store.matrix(doc_id, layer, head)
            assert a.shape == (len(ids), len(ids))
            assert np.abs(a - eager[layer, head]).max() <= bound + 1e-6
            assert not np.triu(a, 1).any()
        np.testing.assert_array_equal(store.matrices(doc_id)[1, 2], store.matrix(doc_id, 1, 2))
    docs = store.sql("SELECT doc_id, n_tokens, skipped FROM docs ORDER BY doc_id").to_pylist()
    assert [d["doc_id"] for d in docs] == list(
        range(7)
    )  # ids are input positions, skipped included
    assert [d["skipped"] for d in docs] == [None, "empty", None, "empty", None, None, None]
    kv = store.sql("SELECT DISTINCT head, kv_head FROM heads ORDER BY head").to_pylist()
    assert kv == [{"head": h, "kv_head": h // 2} for h in range(4)]
    toks = (
        store.sql("SELECT token_id FROM tokens WHERE doc_id = 0 ORDER BY pos").column(0).to_pylist()
    )
    assert toks == eager_attentions(llama_dir, texts[0])[0]
    assert store.sql("SELECT count(*) FROM heads").column(0)[0].as_py() == 5 * 3 * 4


def test_truncation_is_marked(llama_dir: Path, corpus_txt: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.attn"
    attnstore.extract(
        str(out), model=str(llama_dir), corpus=str(corpus_txt), max_length=8, progress=False
    )
    store = attnstore.open(str(out))
    rows = store.sql(
        "SELECT n_tokens, n_tokens_input, truncated FROM docs WHERE skipped IS NULL"
    ).to_pylist()
    assert all(r["n_tokens"] <= 8 for r in rows)
    assert all(r["truncated"] == (r["n_tokens_input"] > 8) for r in rows)
    assert any(r["truncated"] for r in rows)
    assert any(not r["truncated"] for r in rows)


def test_rerun_resumes_without_duplicates(
    llama_dir: Path, corpus_txt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.attn"
    attnstore.extract(
        str(out), model=str(llama_dir), corpus=str(corpus_txt), limit=3, progress=False
    )
    report = attnstore.extract(
        str(out), model=str(llama_dir), corpus=str(corpus_txt), progress=False
    )
    assert report.docs_already_committed == 3
    store = attnstore.open(str(out))
    ids = store.sql("SELECT doc_id FROM docs ORDER BY doc_id").column(0).to_pylist()
    assert ids == list(range(7))


def test_probe_follows_spec(llama_dir: Path) -> None:
    loaded = load_model(str(llama_dir), device="cpu")
    docs = probe_documents(loaded, InductionProbe(n=10, reps=3, count=2, seed=5))
    special = set(loaded.tokenizer.all_special_ids)
    for d in docs:
        assert d.token_ids is not None
        ids = list(d.token_ids)
        if loaded.tokenizer_info["adds_bos"]:
            ids = ids[1:]
        assert len(ids) == 30
        assert ids[:10] == ids[10:20] == ids[20:]
        assert not special & set(ids)
    again = probe_documents(loaded, InductionProbe(n=10, reps=3, count=2, seed=5))
    assert [d.token_ids for d in docs] == [d.token_ids for d in again]


def test_layer_and_head_selection(llama_dir: Path, corpus_txt: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel.attn"
    attnstore.extract(
        str(out),
        model=str(llama_dir),
        corpus=str(corpus_txt),
        layers=[2],
        heads=[1, 3],
        progress=False,
    )
    store = attnstore.open(str(out))
    full = tmp_path / "full.attn"
    attnstore.extract(str(full), model=str(llama_dir), corpus=str(corpus_txt), progress=False)
    np.testing.assert_array_equal(store.matrix(0, 2, 3), attnstore.open(str(full)).matrix(0, 2, 3))
    with pytest.raises(attnstore.MatrixNotFoundError, match=r"Stored layers: \[2\]"):
        store.matrix(0, 1, 1)
    assert store.sql("SELECT count(*) FROM heads").column(0)[0].as_py() == 5 * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, "positive"),
        ({"max_length": 10_000}, "larger than the model's context"),
        ({"layers": [7]}, "layers in 0…2"),
    ],
)
def test_bad_settings(
    llama_dir: Path, corpus_txt: Path, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        attnstore.extract(
            str(tmp_path / "x.attn"),
            model=str(llama_dir),
            corpus=str(corpus_txt),
            progress=False,
            **kwargs,
        )
    assert not (tmp_path / "x.attn" / "tables").exists()


def test_missing_model_path(tmp_path: Path, corpus_txt: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        attnstore.extract(
            str(tmp_path / "x.attn"),
            model=str(tmp_path / "nope"),
            corpus=str(corpus_txt),
            progress=False,
        )
    with pytest.raises(ModelError, match=r"no config\.json"):
        attnstore.extract(
            str(tmp_path / "x.attn"), model=str(tmp_path), corpus=str(corpus_txt), progress=False
        )


def test_scores_only_census(llama_dir: Path, corpus_txt: Path, tmp_path: Path) -> None:
    from attnstore.verify import verify_store

    full, census = tmp_path / "full.attn", tmp_path / "census.attn"
    attnstore.extract(str(full), model=str(llama_dir), corpus=str(corpus_txt), progress=False)
    attnstore.extract(
        str(census), model=str(llama_dir), corpus=str(corpus_txt), scores_only=True, progress=False
    )
    q = "SELECT * FROM heads ORDER BY doc_id, layer, head"
    want, got = attnstore.open(str(full)).sql(q), attnstore.open(str(census)).sql(q)
    # the census runs the fused pass (auto: sdpa for scores-only), the full run eager rows: the
    # same scores within float32 rounding, every other column identical
    assert want.schema == got.schema
    for name in want.column_names:
        if name in SCORE_COLUMNS:
            np.testing.assert_allclose(
                got[name].to_numpy(zero_copy_only=False),
                want[name].to_numpy(zero_copy_only=False),
                atol=2e-5,
                err_msg=name,
            )
        else:
            assert got[name] == want[name], name
    store = attnstore.open(str(census))
    assert store.info()["attention_bytes"] == 0
    assert len(store.token_ids(0)) > 0
    with pytest.raises(attnstore.MatrixNotFoundError, match="--scores-only"):
        store.matrix(0, 0, 0)
    assert verify_store(census).ok
    with pytest.raises(attnstore.IncompatibleStoreError, match="matrices"):
        attnstore.extract(str(census), model=str(llama_dir), corpus=str(corpus_txt), progress=False)


@pytest.mark.parametrize(
    ("sparsity", "chunk_bytes"), [(False, 4096), (True, 4096), (True, 1 << 28)]
)
@pytest.mark.parametrize("arch", ["llama_dir", "gpt2_dir"])
def test_scores_only_sdpa_uses_online_softmax_and_agrees(
    arch: str, sparsity: bool, chunk_bytes: int, request: pytest.FixtureRequest, corpus_txt: Path
) -> None:
    """Scores (and, with the sparsity analysis on, its table through the tile protocol) from the
    fused pass equal the eager rows' within float32 rounding, whether each layer's pass runs
    before the next layer's forward (a small chunk_bytes) or every layer's after the forward;
    torch's thread count is what it was."""
    import attnstore.scores as scores_mod

    folder = request.getfixturevalue(arch)
    loaded = load_model(str(folder), device="cpu")
    docs = [Document(i, t) for i, t in enumerate(corpus_txt.read_text().splitlines()) if t.strip()]
    calls = {"n": 0}
    real = scores_mod.online_layer_scores

    def counting(*a: object, **k: object) -> object:
        calls["n"] += 1
        return real(*a, **k)  # type: ignore[arg-type]

    reference = Extractor(loaded, get_codec("default"), 64, mode="eager")
    census = Extractor(
        loaded,
        get_codec("default"),
        64,
        mode="sdpa",
        store_matrices=False,
        heads=[1, 3],
        chunk_bytes=chunk_bytes,
        # sparsity reads tiles of the fused pass; nothing needs materialised rows either way
        defaults=("patterns", "sparsity") if sparsity else ("patterns",),
    )
    want_segment = reference.run([reference.tokenize(d) for d in docs])
    want = want_segment.heads
    scores_mod.online_layer_scores = counting  # type: ignore[assignment]
    threads = torch.get_num_threads()
    try:
        got_segment = census.run([census.tokenize(d) for d in docs])
    finally:
        scores_mod.online_layer_scores = real  # type: ignore[assignment]
    assert torch.get_num_threads() == threads
    got = got_segment.heads
    assert calls["n"] == loaded.info["n_layers"]  # one online pass per layer, no rows materialised
    sel = np.isin(want["head"], [1, 3])
    for name in SCORE_COLUMNS:
        np.testing.assert_allclose(got[name], want[name][sel], atol=2e-5, err_msg=name)
    if sparsity:
        want_sp = want_segment.extra["sparsity"]
        got_sp = got_segment.extra["sparsity"]
        rows = np.isin(np.asarray(want_sp["head"]), [1, 3])
        assert got_sp["doc_id"] == list(np.asarray(want_sp["doc_id"])[rows])
        for name in ("sink4", "local64", "stream", "span50", "span90", "vertical1", "slash1"):
            w = np.asarray(want_sp[name], dtype=float)[rows]
            np.testing.assert_allclose(
                np.asarray(got_sp[name], dtype=float), w, atol=2e-5, err_msg=name
            )
