"""SQL over a store: bound parameters, read-only statements, clear errors, empty stores."""

from __future__ import annotations

from pathlib import Path

import pytest

import attnstore
from attnstore.errors import MatrixNotFoundError, QueryError


def test_parameters_are_bound(llama_store: Path) -> None:
    store = attnstore.open(str(llama_store))
    n = (
        store.sql("SELECT count(*) FROM heads WHERE layer = ? AND head = ?", [1, 2])
        .column(0)[0]
        .as_py()
    )
    assert n == 12
    named = store.sql("SELECT count(*) FROM docs WHERE doc_id < $k", {"k": 5}).column(0)[0].as_py()
    assert named == 5
    # a parameter is a value, never SQL
    text = (
        store.sql("SELECT count(*) FROM docs WHERE text = ?", ["x' OR '1'='1"]).column(0)[0].as_py()
    )
    assert text == 0


@pytest.mark.parametrize(
    "sql",
    ["CREATE TABLE x AS SELECT 1", "COPY docs TO 'x.csv'", "SELECT 1; SELECT 2", "ATTACH 'x.db'"],
)
def test_only_one_read_statement(llama_store: Path, sql: str) -> None:
    with pytest.raises(QueryError):
        attnstore.open(str(llama_store)).sql(sql)


@pytest.mark.parametrize(
    ("sql", "target"),
    [
        ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/out.csv'", "out.csv"),
        ("SELECT * FROM read_text('{tmp}/secret.txt')", None),
        ("SELECT * FROM read_parquet('{tmp}/*.parquet')", None),
        ("EXPLAIN ANALYZE SET enable_external_access = true", None),
    ],
)
def test_statements_cannot_reach_the_file_system(
    llama_store: Path, tmp_path: Path, sql: str, target: str | None
) -> None:
    (tmp_path / "secret.txt").write_text("not for SQL")
    store = attnstore.open(str(llama_store))
    with pytest.raises(QueryError):
        store.sql(sql.format(tmp=tmp_path))
    if target:
        assert not (tmp_path / target).exists()
    assert store.sql("SELECT count(*) FROM heads").column(0)[0].as_py() > 0  # the views still work


def test_scores_are_null_not_nan(llama_store: Path) -> None:
    store = attnstore.open(str(llama_store))
    nan = (
        store.sql("SELECT count(*) FROM heads WHERE isnan(prev_token) OR isnan(induction)")
        .column(0)[0]
        .as_py()
    )
    assert nan == 0
    # NULL exactly where the query set is empty
    bad = (
        store.sql("SELECT count(*) FROM heads WHERE (induction IS NULL) != (n_induction = 0)")
        .column(0)[0]
        .as_py()
    )
    assert bad == 0


def test_matrix_errors_name_what_exists(llama_store: Path) -> None:
    store = attnstore.open(str(llama_store))
    with pytest.raises(MatrixNotFoundError, match=r"No doc_id 999.*0…11 \(12 docs\)"):
        store.matrix(999, 0, 0)
    with pytest.raises(MatrixNotFoundError, match=r"No head 4.*\[0, 1, 2, 3\]"):
        store.matrix(0, 0, 4)
    with pytest.raises(KeyError):  # also a KeyError, for callers that expect one
        store.matrix(0, 99, 0)
