"""The viewer's JSON API (``attnstore serve``): answers against the store, refusals, lockdown."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnstore
from attnstore.serve import ROW_CAP, SQL_TIME_LIMIT, TILE, ApiError, Viewer, make_server
from tests.helpers import ROOT
from tests.viewer_store import HEADS, LAYERS, LONG, N_SHORT, PREV, SHORT, SINK, SYNTAX


@pytest.fixture(scope="module")
def server(viewer_store: Path) -> Iterator[Any]:
    srv = make_server([viewer_store], port=0, time_limit=1.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(server: Any, path: str, **params: Any) -> tuple[int, Any, dict[str, str]]:
    url = server.url.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        req = urllib.request.Request(url, headers={"X-Attnstore": "1"})
        with urllib.request.urlopen(req, timeout=30) as res:
            body, status, headers = res.read(), res.status, dict(res.headers)
    except urllib.error.HTTPError as err:
        body, status, headers = err.read(), err.code, dict(err.headers)
    if headers.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(body), headers
    return status, body, headers


def api(server: Any, name: str, **params: Any) -> Any:
    status, body, _ = get(server, f"/api/{name}", **params)
    assert status == 200, body
    return body


def test_meta_describes_the_store(server: Any) -> None:
    meta = api(server, "meta")
    (s,) = meta["stores"]
    assert (s["layers"], s["heads"]) == (list(range(LAYERS)), list(range(HEADS)))
    assert s["docs"] == N_SHORT + 1
    assert s["max_tokens"] == LONG
    assert {"prev_token", "sink", "induction", "entropy"} <= set(s["scores"])


def test_grid_mean_is_head_summary(server: Any, viewer_store: Path) -> None:
    cells = api(server, "grid", score="prev_token")["cells"]
    want = attnstore.open(str(viewer_store)).sql("SELECT layer, head, prev_token FROM head_summary")
    expected = {(r["layer"], r["head"]): r["prev_token"] for r in want.to_pylist()}
    assert [(c["layer"], c["head"]) for c in cells] == [
        (la, h) for la in range(LAYERS) for h in range(HEADS)
    ]
    assert {(c["layer"], c["head"]): c["value"] for c in cells} == expected
    top = max(cells, key=lambda c: c["value"])
    assert ((top["layer"], top["head"]), top["label"]) == (PREV, "previous-token")


@pytest.mark.parametrize(("agg", "fn"), [("max", np.max), ("median", np.median), ("p90", None)])
def test_grid_aggregates_over_documents(server: Any, viewer_store: Path, agg: str, fn: Any) -> None:
    heads = attnstore.open(str(viewer_store)).table("heads").to_pylist()
    cells = api(server, "grid", score="sink", agg=agg)["cells"]
    for c in cells:
        values = [r["sink"] for r in heads if (r["layer"], r["head"]) == (c["layer"], c["head"])]
        want = np.quantile(values, 0.9) if fn is None else fn(values)
        assert c["value"] == pytest.approx(want, rel=1e-9)


def test_grid_by_label(server: Any) -> None:
    labels = {
        (c["layer"], c["head"]): c["value"] for c in api(server, "grid", score="label")["cells"]
    }
    assert labels[PREV] == "previous-token"
    assert labels[SINK] == "sink"


def test_head_page_data(server: Any, viewer_store: Path) -> None:
    d = api(server, "head", layer=PREV[0], head=PREV[1], by="prev_token", k=3)
    assert d["label"] == "previous-token"
    ranks = {s["score"]: (s["rank"], s["of"]) for s in d["scores"]}
    assert ranks["prev_token"] == (1, LAYERS * HEADS)
    heads = attnstore.open(str(viewer_store)).table("heads").to_pylist()
    mine = sorted(
        (r for r in heads if (r["layer"], r["head"]) == PREV), key=lambda r: -r["prev_token"]
    )
    assert [t["doc_id"] for t in d["top"]] == [r["doc_id"] for r in mine[:3]]
    assert [t["value"] for t in d["top"]] == [r["prev_token"] for r in mine[:3]]
    # deciles: lower deciles hold lower scores
    by_decile: dict[int, list[float]] = {}
    for r in d["deciles"]:
        by_decile.setdefault(r["decile"], []).append(r["value"])
    ordered = [by_decile[k] for k in sorted(by_decile)]
    assert len(ordered) >= 5
    assert all(max(a) <= min(b) for a, b in itertools.pairwise(ordered))
    assert [r["relation"] for r in d["syntax"]] == ["det"]
    assert d["syntax"][0]["gain"] < 0  # this head is no better than the fixed offset


def test_syntactic_results(server: Any) -> None:
    assert api(server, "meta")["stores"][0]["syntax"] is True
    cells = api(server, "grid", score="syntactic")["cells"]
    best = max(cells, key=lambda c: c["value"])
    assert ((best["layer"], best["head"]), best["value"]) == (SYNTAX, pytest.approx(0.5))
    (row,) = api(server, "head", layer=SYNTAX[0], head=SYNTAX[1])["syntax"]
    assert row == {"relation": "det", "direction": "dep->head", "n": 80, "accuracy": 0.9,
                   "baseline": 0.4, "gain": pytest.approx(0.5)}  # fmt: skip


def test_doc_tokens(server: Any, viewer_store: Path) -> None:
    d = api(server, "doc", doc=3)
    tokens = attnstore.open(str(viewer_store)).sql(
        "SELECT token FROM tokens WHERE doc_id = 3 ORDER BY pos"
    )
    assert d["n_tokens"] == SHORT
    assert d["tokens"] == tokens["token"].to_pylist()


def _tile(server: Any, **params: Any) -> np.ndarray:
    status, body, headers = get(server, "/api/tile", **params)
    assert status == 200, body
    rows, cols = map(int, headers["X-Shape"].split(","))
    return np.frombuffer(body, dtype="<f4").reshape(rows, cols)


def _pooled(m: np.ndarray, pool: int) -> np.ndarray:
    t = m.shape[0]
    side = -(-t // pool)
    out = np.zeros((side, side), dtype=np.float32)
    for i in range(side):
        for j in range(i + 1):
            out[i, j] = m[i * pool : (i + 1) * pool, j * pool : (j + 1) * pool].max()
    return out


def test_tile_at_pool_1_is_the_stored_matrix(server: Any, viewer_store: Path) -> None:
    m = attnstore.open(str(viewer_store)).matrix(2, *PREV)
    assert np.array_equal(_tile(server, doc=2, layer=PREV[0], head=PREV[1]), m)


def test_long_document_tiles_are_max_pooled(server: Any, viewer_store: Path) -> None:
    m = attnstore.open(str(viewer_store)).matrix(N_SHORT, *SINK)
    pool, side = 8, LONG // 8
    image = np.zeros((side, side), dtype=np.float32)
    for ty in range(side // TILE):
        for tx in range(side // TILE):
            part = _tile(server, doc=N_SHORT, layer=SINK[0], head=SINK[1], pool=pool, ty=ty, tx=tx)
            image[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE] = part
    assert np.array_equal(image, m.reshape(side, pool, side, pool).max(axis=(1, 3)))
    assert (image[:, 0] >= 0.6).all()  # the sink column survives pooling


@settings(max_examples=15, deadline=None)
@given(
    doc=st.integers(0, N_SHORT - 1),
    log_pool=st.integers(0, 6),
    head=st.sampled_from([PREV, SINK, (1, 3)]),
)
def test_any_pooling_is_the_block_maximum(
    server: Any, viewer_store: Path, doc: int, log_pool: int, head: tuple[int, int]
) -> None:
    pool = 2**log_pool
    m = attnstore.open(str(viewer_store)).matrix(doc, *head)
    got = _tile(server, doc=doc, layer=head[0], head=head[1], pool=pool)
    assert np.array_equal(got, _pooled(m, pool))


def test_row_and_col_are_exact(server: Any, viewer_store: Path) -> None:
    m = attnstore.open(str(viewer_store)).matrix(5, *PREV)
    row = api(server, "row", doc=5, layer=PREV[0], head=PREV[1], q=40)["values"]
    col = api(server, "col", doc=5, layer=PREV[0], head=PREV[1], k=40)["values"]
    assert row == [float(v) for v in m[40, :41]]
    assert col == [float(v) for v in m[40:, 40]]
    assert int(np.argmax(row)) == 39


def test_sql_returns_rows(server: Any) -> None:
    r = api(server, "sql", q="SELECT layer, head, label FROM head_summary WHERE label = ?",
            params=json.dumps(["sink"]))  # fmt: skip
    assert r["rows"] == [{"layer": SINK[0], "head": SINK[1], "label": "sink"}]
    assert r["truncated"] is False


def test_sql_row_cap(server: Any) -> None:
    r = api(server, "sql", q="SELECT * FROM range(5000)")
    assert len(r["rows"]) == r["row_cap"] == 1000
    assert r["truncated"] is True


REFUSED = {
    "copy": "COPY (SELECT 1) TO '/tmp/attnstore-serve-test.csv'",
    "copy_table": "COPY heads TO '/tmp/attnstore-serve-test.parquet'",
    "attach": "ATTACH '/tmp/attnstore-serve-test.duckdb' AS other",
    "read_text": "SELECT * FROM read_text('/etc/passwd')",
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "glob": "SELECT * FROM glob('/etc/*')",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "set": "SET enable_external_access = true",
    "pragma": "PRAGMA enable_profiling",
    "create": "CREATE TABLE t AS SELECT 1",
    "explain_analyze": "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "two_statements": "SELECT 1; SELECT 2",
    "cross_join": "SELECT count(*) FROM range(1000000000) a, range(1000000000) b",
    "malformed": "SELEC 1",
}


@pytest.mark.parametrize("sql", REFUSED.values(), ids=REFUSED.keys())
def test_sql_refusals(server: Any, sql: str) -> None:
    status, body, _ = get(server, "/api/sql", q=sql)
    assert 400 <= status < 500
    assert set(body) == {"error"}
    assert body["error"]
    assert "Traceback" not in body["error"]
    assert not Path("/tmp/attnstore-serve-test.csv").exists()


def test_lockdown_holds_beneath_the_statement_check(viewer_store: Path) -> None:
    """Statements the API refuses up front are refused by DuckDB itself too."""
    viewer = Viewer([viewer_store], time_limit=1.0)
    src = viewer.sources[0]
    try:
        for sql, message in [
            ("COPY (SELECT 1) TO '/tmp/attnstore-lock.csv'", "disabled by configuration"),
            ("ATTACH '/tmp/attnstore-lock.duckdb' AS x", "disabled by configuration"),
            ("SET enable_external_access = true", "configuration has been locked"),
            ("SET allowed_directories = ['/']", "configuration has been locked"),
            ("LOAD httpfs", "disabled"),
        ]:
            with pytest.raises(ApiError, match=message):
                viewer.query(src, sql, time_limit=1.0)
        # the store stays readable through its views; DuckDB itself has no file system at all,
        # not even the store's own files (they are read by pyarrow, with path and checksum checks)
        _, rows, _ = viewer.query(src, "SELECT count(*) FROM docs")
        assert rows[0][0] > 0
        inside = next(viewer_store.rglob("*.parquet"))
        with pytest.raises(ApiError, match="disabled by configuration"):
            viewer.query(src, f"SELECT count(*) FROM read_parquet('{inside}')")
    finally:
        viewer.close()
    assert not Path("/tmp/attnstore-lock.csv").exists()


BAD = {
    "layer_not_int": ("/api/head", {"layer": "x", "head": 1}, 400, "integer"),
    "layer_missing": ("/api/head", {"head": 1}, 400, "layer"),
    "no_such_layer": ("/api/head", {"layer": 99, "head": 1}, 404, "Stored layers"),
    "no_such_doc": ("/api/doc", {"doc": 999}, 404, "No document 999"),
    "no_such_store": ("/api/grid", {"store": 5}, 400, "store"),
    "bad_score": ("/api/grid", {"score": "nope"}, 400, "prev_token"),
    "bad_agg": ("/api/grid", {"agg": "sum"}, 400, "median"),
    "pool_not_pow2": ("/api/tile", {"doc": 0, "layer": 0, "head": 0, "pool": 3}, 400, "power of two"),
    "tile_out_of_range": ("/api/tile", {"doc": 0, "layer": 0, "head": 0, "ty": 9}, 400, "ty"),
    "row_out_of_range": ("/api/row", {"doc": 0, "layer": 0, "head": 0, "q": SHORT}, 400, "q"),
    "no_endpoint": ("/api/nope", {}, 404, "Endpoints"),
    "empty_sql": ("/api/sql", {"q": ""}, 400, "SQL"),
    "bad_params": ("/api/sql", {"q": "SELECT ?", "params": "{}"}, 400, "JSON array"),
    "traversal": ("/static/../../../etc/passwd", {}, 404, ""),
    "encoded_traversal": ("/static/..%2f..%2fserve.py", {}, 404, ""),
    "not_static": ("/etc/passwd", {}, 404, ""),
}  # fmt: skip


@pytest.mark.parametrize(("path", "params", "status", "words"), BAD.values(), ids=BAD.keys())
def test_bad_requests_get_a_message(
    server: Any, path: str, params: dict[str, Any], status: int, words: str
) -> None:
    got, body, _ = get(server, path, **params)
    assert got == status
    assert words in body["error"]
    assert "Traceback" not in body["error"]


def test_other_host_names_are_refused(server: Any) -> None:
    """DNS rebinding: a page on another origin that resolves to 127.0.0.1 gets nothing."""
    req = urllib.request.Request(
        server.url + "api/meta", headers={"Host": "attacker.example", "X-Attnstore": "1"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403


def test_pages_and_assets_are_local(server: Any) -> None:
    status, body, headers = get(server, "/")
    assert status == 200
    assert b'src="/static/app.js"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    static = Path(attnstore.__file__).parent / "viewer" / "static"
    names = sorted(p.name for p in static.iterdir())
    assert {"index.html", "app.js", "style.css"} <= set(names)
    for name in names:
        text = (static / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), name  # no CDN, no URLs
        assert get(server, f"/static/{name}")[0] == 200


def test_server_binds_loopback_by_default(viewer_store: Path) -> None:
    srv = make_server([viewer_store], port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
        assert srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.server_close()


def test_cli_serve_prints_its_url(viewer_store: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnstore", "serve", str(viewer_store), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        req = urllib.request.Request(url.group(0) + "api/meta", headers={"X-Attnstore": "1"})
        with urllib.request.urlopen(req, timeout=30) as res:
            assert json.load(res)["stores"][0]["docs"] == N_SHORT + 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_refuses_a_missing_store(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "attnstore", "serve", str(tmp_path / "nope.attn")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "nope.attn" in proc.stderr


def test_api_doc_and_readme_state_the_code_limits() -> None:
    root = ROOT
    spec = " ".join((root / "schemas" / "serve.md").read_text(encoding="utf-8").split())
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    assert f"interrupted after the time limit ({SQL_TIME_LIMIT:g} s;" in spec
    assert f"at most {ROW_CAP:,} rows" in spec
    assert f"cut into {TILE} × {TILE} tiles" in spec
    assert f"stopped after {SQL_TIME_LIMIT:g} s, capped at {ROW_CAP:,} rows" in readme
