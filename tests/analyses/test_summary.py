"""Head summary and labels: synthetic heads of each kind get their label, in SQL, Python and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import attnstore
from attnstore.cli import cli
from attnstore.labels import LABELS, label_of
from attnstore.verify import verify_store
from tests.synthetic import KINDS, write_synthetic_store


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("syn") / "syn.attn")


def test_synthetic_store_is_valid(synthetic: Path) -> None:
    assert verify_store(synthetic).ok


def test_each_kind_gets_its_label(synthetic: Path) -> None:
    rows = (
        attnstore.open(str(synthetic)).sql("SELECT * FROM head_summary ORDER BY head").to_pylist()
    )
    assert [r["label"] for r in rows] == list(KINDS)
    for r in rows:
        assert label_of(r) == r["label"]  # the Python rule and the SQL view agree
        assert r["n_docs"] == 2


def test_summary_means_are_count_weighted(llama_store: Path) -> None:
    store = attnstore.open(str(llama_store))
    got = store.sql(
        "SELECT induction, n_induction FROM head_summary WHERE layer = 1 AND head = 2"
    ).to_pylist()[0]
    rows = store.sql(
        "SELECT induction, n_induction FROM heads WHERE layer = 1 AND head = 2"
    ).to_pylist()
    num = sum(r["induction"] * r["n_induction"] for r in rows if r["induction"] is not None)
    den = sum(r["n_induction"] for r in rows)
    assert got["induction"] == pytest.approx(num / den)
    assert got["n_induction"] == den


def test_label_rule_edge_cases() -> None:
    assert label_of({}) == "none"
    assert label_of({"entropy": 0.95, "max_weight": 0.5}) == "none"  # high entropy, but peaky
    assert label_of({"entropy": 0.95, "max_weight": 0.05}) == "diffuse"
    assert label_of({"sink": 0.9, "induction": 0.5}) == "sink"  # widest margin wins
    assert label_of({"induction": float("nan"), "prev_token": 0.41}) == "previous-token"
    assert LABELS[0] == "none"


def test_heads_command(synthetic: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli, ["heads", str(synthetic), "--score", "induction", "--top", "1", "-f", "json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 1
    assert rows[0]["label"] == "induction"
    result = runner.invoke(cli, ["heads", str(synthetic), "--label", "sink", "-f", "csv"])
    assert result.stdout.splitlines()[1].split(",")[1] == str(KINDS.index("sink"))
