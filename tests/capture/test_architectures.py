"""The architecture matrix: every decoder architecture of the installed transformers that attnstore
lists extracts exactly (matrices and scores within 1e-5 of each document's own reference, in one
padded batch, under both --attention modes) or is refused loudly; never zero matrices.

Tiny random-init models (2 layers, hidden 32, 4 heads, initializer_range 0.2, fixed seed) are built
in memory (attnstore.testing); the README's capability table is generated from the same results.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import attnstore
from attnstore import testing
from attnstore.capture import Extractor, hook, prepare_model
from attnstore.codecs import get_codec
from attnstore.corpus import Document
from attnstore.errors import AttentionCaptureError, ModelError
from attnstore.testing import ARCHITECTURES, MODES, UNSEEN, MatrixResult
from tests.helpers import ROOT

README = ROOT / "README.md"
NAMES = [a.name for a in ARCHITECTURES]
#: architectures whose attention does not go through attnstore's attention function, and how
#: they are captured instead (all others: "function")
OTHER_PATHS = {
    "Falcon (rotary)": "recompute",
    "Falcon (ALiBi)": "recompute",
    "Bloom": "output_attentions",
    "MPT": "output_attentions",
    "GPT-Neo": "output_attentions",
}


@functools.cache
def _tokenizer() -> Any:
    return testing.tiny_tokenizer()


@functools.cache
def result(name: str, mode: str) -> MatrixResult:
    return testing.check_architecture(name, mode, tokenizer=_tokenizer())


def test_matrix_covers_the_architectures_of_the_issue() -> None:
    types = {a.model_type for a in ARCHITECTURES}
    assert len(ARCHITECTURES) >= 20
    assert {
        "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_neox", "gpt2", "opt",
        "falcon", "gptj", "phi", "phi3", "stablelm", "gpt_bigcode", "olmo", "olmo2", "cohere",
        "granite", "mixtral", "bloom", "mpt", "smollm3",
    } <= types  # fmt: skip
    for arch in ARCHITECTURES:
        model = testing.tiny_model(arch.name)
        cfg = model.config
        assert (cfg.num_hidden_layers, cfg.num_attention_heads) == (2, 4), arch.name
        assert model.get_input_embeddings().embedding_dim == 32, arch.name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_architecture_extracts_exactly(name: str, mode: str) -> None:
    r = result(name, mode)
    assert r.path is not None, f"{name} refused: {r.failures}"
    assert r.path == OTHER_PATHS.get(name, "function")
    assert r.matrix_error <= testing.EXACT
    assert r.score_error <= testing.EXACT


def test_tiny_models_have_sharp_attention() -> None:
    """initializer_range 0.2 makes attention far from uniform, so the comparison means something:
    a row's largest weight is on average well above the uniform 1 / (q + 1)."""
    ids = _tokenizer()(testing.MATRIX_TEXTS[0]).input_ids
    for name in ("Llama", "Falcon (ALiBi)", "Bloom", "MPT", "Gemma2"):
        ref = testing.reference_attention(name, ids)
        q = np.arange(ref.shape[-1])
        assert (ref.max(-1) * (q + 1))[:, :, 4:].mean() > 2.5, name


def test_references_are_seed_deterministic_and_falcon_eager_is_really_wrong() -> None:
    """The reference weights are the same model's; transformers' Falcon output_attentions are not
    what the model computes (rotary: the boolean mask is added; ALiBi: the bias counts twice)."""
    ids = _tokenizer()(testing.MATRIX_TEXTS[1]).input_ids
    a = testing.tiny_model("Falcon (rotary)").state_dict()
    b = testing.tiny_model("Falcon (rotary)", attn_implementation="eager").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.tensor([ids])
    for name in ("Falcon (rotary)", "Falcon (ALiBi)"):
        model = testing.tiny_model(name)  # sdpa, as loaded by default
        with torch.no_grad():
            plain = model(input_ids=x).logits
            asked = model(input_ids=x, output_attentions=True)
        assert (asked.logits - plain).abs().max() > 1e-3, name
        returned = torch.stack(asked.attentions)[:, 0].double().numpy()
        assert np.abs(returned - testing.reference_attention(name, ids)).max() > 1e-3, name


@pytest.mark.parametrize("arch", UNSEEN, ids=lambda a: a.name)
def test_unseen_attention_module_is_exact_or_refused(arch: testing.Architecture) -> None:
    """A model class the matrix has never seen (hand-written attention that bypasses
    AttentionInterface) is captured exactly when it returns exact weights, and refused otherwise."""
    for mode in MODES:
        r = result(arch.name, mode)
        if arch.name.endswith("(exact)"):
            assert r.path == "output_attentions"
            assert r.exact
        else:
            assert r.path is None
            assert any("never called" in f for f in r.failures)
            why = "no attention weights" if "(none)" in arch.name else "future or padding keys"
            assert any(why in f for f in r.failures), r.failures


def test_refusal_names_the_architecture_and_writes_nothing(tmp_path: Path) -> None:
    model = testing._with_custom_attention(testing.tiny_model("Llama"), "none")
    loaded = prepare_model(model, _tokenizer(), model_id="my-model")
    out = tmp_path / "s.attn"
    with pytest.raises(AttentionCaptureError, match=r"LlamaForCausalLM \(my-model\)") as err:
        attnstore.extract(str(out), model=loaded, corpus="pydoc:topics", limit=3, progress=False)
    assert isinstance(err.value, ModelError)
    assert "never called" in str(err.value)
    assert "capability table" in str(err.value)
    assert not list(out.glob("tables/*/_delta_log"))  # nothing committed


def test_a_batch_that_goes_wrong_later_is_never_returned() -> None:
    """The check runs on every batch, not only when the path is chosen."""
    model = testing._with_custom_attention(testing.tiny_model("Llama"), "exact")
    loaded = prepare_model(model, _tokenizer())
    with pytest.warns(UserWarning, match="'output_attentions' path .*never called"):
        ex = Extractor(loaded, get_codec("float32"), 64)
    docs = [ex.tokenize(Document(i, t)) for i, t in enumerate(testing.MATRIX_TEXTS)]
    assert ex.run(docs).codes[0].any()
    for layer in model.model.layers:
        layer.self_attn.behaviour = "future"
    with pytest.raises(AttentionCaptureError, match="future or padding keys"):
        ex.run(docs)


def test_function_path_that_delivers_bad_rows_falls_back_exactly(monkeypatch: Any) -> None:
    """Rows that do not sum to 1 are never encoded: the batch is redone through the next path."""
    from transformers import AttentionInterface

    loaded = prepare_model(testing.tiny_model("Llama"), _tokenizer())
    ex = Extractor(loaded, get_codec("float32"), 64)
    docs = [ex.tokenize(Document(i, t)) for i, t in enumerate(testing.MATRIX_TEXTS)]
    good = ex.run(docs)

    def halving(*args: Any, **kwargs: Any) -> Any:
        cap = hook._ACTIVE
        assert cap is not None
        real = cap.consume
        cap.consume = lambda layer, q0, probs: real(layer, q0, probs * 0.5)
        try:
            return hook._attention(*args, **kwargs)
        finally:
            cap.consume = real

    AttentionInterface.register("attnstore", halving)
    try:
        with pytest.warns(UserWarning, match="do not sum to 1"):
            again = ex.run(docs)
    finally:
        AttentionInterface.register("attnstore", hook._attention)
    assert loaded.path == "output_attentions"
    for a, b in zip(good.codes, again.codes, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_per_layer_delivery_is_counted() -> None:
    """A model whose second layer bypasses the attention function is not half captured."""
    model = testing.tiny_model("Llama")
    cls = testing._custom_attention_class()
    model.model.layers[1].self_attn.__class__ = cls
    model.model.layers[1].self_attn.behaviour = "none"
    loaded = prepare_model(model, _tokenizer())
    with pytest.raises(AttentionCaptureError) as err:
        Extractor(loaded, get_codec("float32"), 64)
    assert re.search(r"function: .*\{1: 0\}", err.value.failures[0])
    assert "layers [1]" in err.value.failures[-1]


def test_readme_capability_table_is_generated_from_the_matrix() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index(testing.TABLE_BEGIN) + len(testing.TABLE_BEGIN)
    end = text.index(testing.TABLE_END)
    results = [result(a.name, mode) for a in (*ARCHITECTURES, *UNSEEN) for mode in MODES]
    assert text[start:end].strip() == testing.capability_table(results), (
        "README capability table is stale: run python scripts/capability_table.py"
    )


@pytest.mark.parametrize(
    ("name", "path", "manifest"),
    [("Falcon (rotary)", "recompute", "recompute"), ("MPT", "output_attentions", "eager")],
)
def test_store_records_the_path_and_verifies(
    name: str, path: str, manifest: str, tmp_path: Path
) -> None:
    import json
    import warnings

    from attnstore.verify import verify_store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = prepare_model(testing.tiny_model(name), _tokenizer(), model_id=name)
    out = tmp_path / "s.attn"
    attnstore.extract(str(out), model=loaded, corpus="pydoc:topics", limit=3, max_length=40,
                      progress=False)  # fmt: skip
    assert json.loads((out / "attnstore.json").read_text())["settings"]["attention"] == manifest
    store = attnstore.open(str(out))
    assert store.commits
    assert {c.get("attention") for c in store.commits} == {path}
    assert verify_store(out).ok
    for doc_id in range(3):
        a = store.matrices(doc_id)
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-4)


def test_kv_heads_follow_the_architecture() -> None:
    expected = {"Llama": 2, "GPT-2": 4, "GPTBigCode": 1, "Falcon (rotary)": 1, "Falcon (ALiBi)": 4}
    for name, n_kv in expected.items():
        loaded = prepare_model(testing.tiny_model(name), _tokenizer())
        assert loaded.info["n_kv_heads"] == n_kv, name
