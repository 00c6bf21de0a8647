"""What a new user meets first: one-line errors without tracebacks, `heads` ranking and label
checks, one line per table row, quiet extraction, reruns that do not load the model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import attnstore
from attnstore.cli import cli
from attnstore.errors import IncompatibleStoreError
from attnstore.labels import LABELS, THRESHOLDS, label_of
from tests.helpers import GOLDEN

GOLDEN_PARSED = GOLDEN / "v1.1.attn"


def run(*args: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output, result.exception


@pytest.fixture
def bad_inputs(llama_store: Path, tmp_path: Path) -> list[list[str]]:
    s, missing = str(llama_store), str(tmp_path / "missing" / "dir")
    not_a_store = tmp_path / "not-a-store"
    not_a_store.mkdir()
    (not_a_store / "notes.txt").write_text("hello\n")
    return [
        ["plot", "matrix", s, "--doc", "0", "--layer", "0", "--head", "0", "-o", f"{missing}/x.png"],
        ["plot", "grid", s, "-o", f"{missing}/g.png"],
        ["plot", "tokens", s, "--doc", "0", "--layer", "0", "--head", "0", "--query", "9999",
         "-o", str(tmp_path / "t.png")],
        ["plot", "matrix", s, "--doc", "99999", "--layer", "0", "--head", "0", "-o",
         str(tmp_path / "m.png")],
        ["plot", "grid", s, "--where", "no_such_column > 1", "-o", str(tmp_path / "g.png")],
        ["export", s, "-o", f"{missing}/e.h5"],
        ["export", s, "--where", "doc_id <", "-o", str(tmp_path / "e.h5")],
        ["query", s, "SELEC nonsense"],
        ["query", s, "DROP VIEW heads"],
        ["query", str(not_a_store), "SELECT 1"],
        ["info", str(tmp_path / "nothing-here.attn")],
        ["verify", str(tmp_path / "nothing-here.attn")],
        ["heads", s, "--label", "inductoin"],
        ["heads", str(not_a_store)],
        ["extract", "--out", str(tmp_path / "x.attn"), "--corpus", str(tmp_path / "none.txt")],
        ["extract", "--out", str(tmp_path / "x.attn"), "--corpus", "probe:induction?bogus=1"],
        ["extract", "--out", str(tmp_path / "x.attn"), "--codec", "zip"],
        ["extract", "--out", str(tmp_path / "x.attn"), "--model", str(tmp_path / "no-model")],
        ["extract", "--out", str(not_a_store), "--model", str(tmp_path / "no-model")],
    ]  # fmt: skip


def test_no_command_leaks_a_traceback_on_bad_input(bad_inputs: list[list[str]]) -> None:
    for args in bad_inputs:
        code, output, exc = run(*args)
        assert code != 0, (args, output)
        assert isinstance(exc, SystemExit), (args, repr(exc))
        assert "Traceback" not in output, args
        lines = [line for line in output.splitlines() if line.strip()]
        assert lines[-1].startswith("Error: "), (args, output)
        assert len(lines) == 1 or "Usage:" in output, (args, output)


def test_missing_output_folder_is_one_line_in_a_real_process(
    llama_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "missing" / "dir" / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "attnstore", "plot", "matrix", str(llama_store), "--doc", "0",
         "--layer", "0", "--head", "0", "-o", str(out)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "does not exist" in proc.stderr
    assert str(out.parent) in proc.stderr


def test_unexpected_errors_are_one_line_unless_debugging(
    llama_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnstore import store as store_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(store_module.Store, "info", broken)
    code, output, _ = run("info", str(llama_store))
    assert code == 1
    assert output.strip() == (
        "Error: internal error, RuntimeError: something inside broke "
        "(ATTNSTORE_DEBUG=1 shows the traceback; please report it)"
    )
    monkeypatch.setenv("ATTNSTORE_DEBUG", "1")
    result = CliRunner().invoke(cli, ["info", str(llama_store)])
    assert isinstance(result.exception, RuntimeError)


# -- heads ----------------------------------------------------------------------------------


def _margin(row: dict[str, float | None]) -> float:
    """The label rule's margin in Python, independent of the SQL used by the command."""
    from attnstore.labels import _margin as margin_of

    return max(margin_of(label, row) for label in THRESHOLDS)


def test_heads_top_without_score_ranks_by_label_margin(llama_store: Path) -> None:
    import json

    code, output, _ = run("heads", str(llama_store), "--format", "json")
    assert code == 0
    everything = json.loads(output)
    code, output, _ = run("heads", str(llama_store), "--top", "5", "--format", "json")
    assert code == 0
    top = json.loads(output)
    assert len(top) == 5
    expected = sorted(everything, key=lambda r: (-_margin(r), r["layer"], r["head"]))[:5]
    assert [(r["layer"], r["head"]) for r in top] == [(r["layer"], r["head"]) for r in expected]
    for r in top:
        assert math.isclose(r["margin"], _margin(r), abs_tol=2e-4)
        assert (r["label"] == "none") == (r["margin"] < 0)


def test_heads_top_with_score_ranks_by_that_score(llama_store: Path) -> None:
    import json

    code, output, _ = run("heads", str(llama_store), "--score", "sink", "-k", "3", "-f", "json")
    assert code == 0
    sinks = [r["sink"] for r in json.loads(output)]
    assert sinks == sorted(sinks, reverse=True)


def test_unknown_label_is_an_error_listing_the_valid_ones(llama_store: Path) -> None:
    code, output, _ = run("heads", str(llama_store), "--label", "inductoin")
    assert code == 1
    assert "Unknown label 'inductoin'" in output
    for label in LABELS:
        assert label in output
    assert "syntactic:<relation>" in output
    assert "semantic:<kind>" in output


def test_every_pattern_label_is_accepted(llama_store: Path) -> None:
    for label in LABELS:
        code, output, _ = run("heads", str(llama_store), "--label", label)
        assert code == 0, output
        assert output.rstrip().endswith("rows)") or output.rstrip().endswith("row)")


def test_syntactic_labels_come_from_the_store(tmp_path: Path) -> None:
    import shutil

    store = shutil.copytree(GOLDEN_PARSED, tmp_path / "parsed.attn")
    rows = attnstore.open(store).sql("SELECT DISTINCT relation FROM syntax_heads").to_pylist()
    relation = rows[0]["relation"]
    code, output, _ = run("heads", str(store), "--label", f"syntactic:{relation}")
    assert code == 0, output
    code, output, _ = run("heads", str(store), "--label", "syntactic:no-such-relation")
    assert code == 1
    assert f"syntactic:{relation}" in output


def test_label_margin_matches_label_of(llama_store: Path) -> None:
    from attnstore.labels import margin_sql

    rows = attnstore.open(llama_store).sql(
        f"SELECT *, {margin_sql()} AS margin FROM head_summary"
    ).to_pylist()
    for r in rows:
        assert math.isclose(r["margin"], _margin(r), abs_tol=1e-9)
        assert label_of(r) == r["label"] or r["label"].startswith(("syntactic:", "semantic:"))


# -- table output ----------------------------------------------------------------------------


def test_table_cells_stay_on_one_line(llama_store: Path) -> None:
    code, output, _ = run(
        "query", str(llama_store), "SELECT 'a' || chr(10) || 'b' || chr(9) || 'c' AS t, 1 AS n"
    )
    assert code == 0
    lines = output.rstrip("\n").splitlines()
    assert len(lines) == 4  # header, rule, one row, row count
    assert lines[2].startswith("a\\nb\\tc")
    code, output, _ = run("query", str(llama_store), "SELECT text FROM docs WHERE text LIKE '%\n%'")
    assert code == 0
    n_rows = int(output.rstrip().rsplit("(", 1)[1].split()[0])
    assert n_rows > 0
    assert len(output.rstrip("\n").splitlines()) == n_rows + 3


def test_corpus_help_and_error_name_conllu(tmp_path: Path) -> None:
    code, output, _ = run("extract", "--help")
    assert code == 0
    assert ".conllu" in output
    code, output, _ = run("extract", "--out", str(tmp_path / "x"), "--corpus", "nope.txt")
    assert code == 1
    assert ".conllu" in output


# -- extraction: quiet, reruns, model messages -------------------------------------------------


def _extract_cli(llama_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "attnstore", "extract", "--out", str(out), "--model",
         str(llama_dir), "--limit", "3", "--max-length", "32", *extra],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip


def test_quiet_means_quiet(llama_dir: Path, tmp_path: Path) -> None:
    loud = _extract_cli(llama_dir, tmp_path / "loud.attn")
    assert loud.returncode == 0, loud.stderr
    assert "doc" in loud.stderr  # the progress bar: the check below can fail
    quiet = _extract_cli(llama_dir, tmp_path / "quiet.attn", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout.count("\n") == 1


def test_quiet_silences_model_loading_bars(monkeypatch: pytest.MonkeyPatch, llama_dir: Path) -> None:
    """transformers' GGUF loader draws its own tqdm bar; a stand-in loader that does the same."""
    import io

    import tqdm
    import transformers

    from attnstore.capture import load_model

    real = transformers.AutoModelForCausalLM.from_pretrained

    def noisy(*args: object, **kwargs: object) -> object:
        for _ in tqdm.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        print("loading chatter", file=sys.stderr)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", noisy)
    for progress, expect_output in ((True, True), (False, False)):
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        load_model(str(llama_dir), progress=progress)
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        assert ("GGUF" in err.getvalue()) is expect_output, err.getvalue()


def test_rerun_with_nothing_left_does_not_load_the_model(
    llama_dir: Path, corpus_txt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnstore import capture

    out = tmp_path / "rerun.attn"
    kw = {"model": str(llama_dir), "corpus": str(corpus_txt), "max_length": 32, "progress": False}
    first = attnstore.extract(str(out), **kw)
    n_docs = first.docs_written + sum(first.docs_skipped.values())
    assert n_docs == 7
    loads: list[object] = []
    real_load = capture.load_model

    def counting(*args: object, **kwargs: object) -> object:
        loads.append(args)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(capture, "load_model", counting)
    again = attnstore.extract(str(out), **kw)
    assert loads == []
    assert (again.docs_written, again.docs_already_committed) == (0, n_docs)
    # the same through the CLI, which says so
    code, output, _ = run("extract", "--out", str(out), "--model", str(llama_dir), "--corpus",
                          str(corpus_txt), "--max-length", "32", "--quiet")  # fmt: skip
    assert code == 0, output
    assert f"already committed: {n_docs}" in output
    assert loads == []
    # something left to do, or other settings: the model is loaded and the writer decides
    with corpus_txt.open("a", encoding="utf-8") as fh:
        fh.write("One more document.\n")
    grown = attnstore.extract(str(out), **kw)
    assert len(loads) == 1
    assert (grown.docs_written, grown.docs_already_committed) == (1, n_docs)
    with pytest.raises(IncompatibleStoreError):
        attnstore.extract(str(out), **{**kw, "codec": "compact"})
    assert len(loads) == 2


def test_model_not_in_cache_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output, _ = run("extract", "--out", str(tmp_path / "x.attn"), "--model", "gpt2")
    assert code == 1
    assert "not in the local Hugging Face cache" in output
    assert "save_pretrained" in output
    assert ".gguf" in output
    assert "internet" not in output.lower()
    assert not (tmp_path / "x.attn").exists()


def test_semantic_labels_come_from_the_store(llama_dir: Path, tmp_path: Path) -> None:
    import json

    corpus = tmp_path / "probes.jsonl"
    item = {"kind": "coref", "query": [38, 41], "targets": [[0, 4]], "distractors": [[9, 13]]}
    line = {"text": "Mary met John in the garden, and then she", "probes": [item]}
    corpus.write_text(json.dumps(line) + "\n", encoding="utf-8")
    out = tmp_path / "probes.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), progress=False)
    code, output, _ = run("heads", str(out), "--label", "semantic:coref")
    assert code == 0, output
    code, output, _ = run("heads", str(out), "--label", "semantic:ioi")
    assert code == 1
    assert "semantic:<kind> (semantic:coref)" in output
