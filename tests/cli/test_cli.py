"""The CLI: each command runs, documents itself, and turns bad input into a clear exit 1."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from attnstore.cli import cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help(runner: CliRunner, command: str) -> None:
    result = runner.invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    assert cli.commands[command].help


def test_extract_query_info(
    runner: CliRunner, llama_dir: Path, corpus_txt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c.attn"
    result = runner.invoke(
        cli,
        ["extract", "--out", str(out), "-m", str(llama_dir), "-c", str(corpus_txt), "--json", "-q"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["docs_written"] == 5
    assert report["docs_skipped"] == {"empty": 2}

    sql = "SELECT layer, head, avg(induction) AS ind FROM heads GROUP BY ALL ORDER BY ind DESC LIMIT 5"
    table = runner.invoke(cli, ["query", str(out), sql])
    assert table.exit_code == 0, table.output
    assert "(5 rows)" in table.output

    as_json = runner.invoke(
        cli,
        [
            "query",
            str(out),
            "SELECT doc_id FROM docs WHERE n_tokens > ? ORDER BY 1",
            "-p",
            "10",
            "-f",
            "json",
        ],
    )
    ids = [r["doc_id"] for r in json.loads(as_json.stdout)]
    assert ids
    as_csv = runner.invoke(
        cli,
        [
            "query",
            str(out),
            "SELECT doc_id, n_tokens FROM docs WHERE n_tokens > ? ORDER BY 1",
            "-p",
            "10",
            "-f",
            "csv",
        ],
    )
    rows = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [int(r["doc_id"]) for r in rows] == ids
    assert all(int(r["n_tokens"]) > 10 for r in rows)

    stdin = runner.invoke(
        cli, ["query", str(out), "-", "-f", "json"], input="SELECT count(*) AS n FROM tokens"
    )
    assert json.loads(stdin.output)[0]["n"] > 0

    info = runner.invoke(cli, ["info", str(out), "--json"])
    summary = json.loads(info.output)
    assert summary["docs"] == 5
    assert summary["docs_skipped"] == 2
    assert summary["layers"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["query", "{missing}", "SELECT 1"], "does not exist"),
        (["query", "{store}", "SELEC 1"], "Malformed SQL"),
        (["query", "{store}", "DELETE FROM heads"], "read-only"),
        (["query", "{store}", "SELECT * FROM nope"], "nope"),
        (["info", "{file}"], "Got a file"),
        (["extract", "--out", "{tmp}/x", "-c", "{tmp}/none.txt"], "not found"),
        (["extract", "--out", "{tmp}/x", "-c", "{store}", "--codec", "zfp"], "Unknown codec"),
    ],
)
def test_errors_exit_1_with_message(
    runner: CliRunner, llama_store: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "f.txt").write_text("x")
    values = {
        "missing": str(tmp_path / "missing"),
        "store": str(llama_store),
        "file": str(tmp_path / "f.txt"),
        "tmp": str(tmp_path),
    }
    result = runner.invoke(cli, [a.format(**values) for a in args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
