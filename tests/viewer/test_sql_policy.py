"""One read-only SQL policy for Store.sql, `attnstore query` and the viewer; the viewer's bounds."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import attnstore
from attnstore.errors import QueryError
from attnstore.serve import API_HEADER, ApiError, Viewer, make_server

SECRET = "attnstore-temp-secret"


@pytest.fixture
def temp_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose DuckDB default temp folder (.tmp) holds a file."""
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text(SECRET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


READ_TEMP = "SELECT content FROM read_text('.tmp/secret.txt')"


def test_store_sql_cannot_read_the_temp_folder(viewer_store: Path, temp_secret: Path) -> None:
    store = attnstore.open(str(viewer_store))
    with pytest.raises(QueryError, match="disabled by configuration"):
        store.sql(READ_TEMP)
    assert store.sql("SELECT current_setting('temp_directory') AS t").to_pylist() == [{"t": ""}]


def test_query_command_cannot_read_the_temp_folder(viewer_store: Path, temp_secret: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "attnstore", "query", str(viewer_store), READ_TEMP],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=temp_secret,
    )
    assert done.returncode == 1
    assert SECRET not in done.stdout
    assert "disabled by configuration" in done.stderr


def test_viewer_sql_cannot_read_the_temp_folder(viewer_store: Path, temp_secret: Path) -> None:
    viewer = Viewer([viewer_store])
    try:
        with pytest.raises(ApiError, match="disabled by configuration"):
            viewer.user_sql({"q": READ_TEMP})
    finally:
        viewer.close()


def test_one_policy_for_every_connection(viewer_store: Path) -> None:
    """query.py and the viewer hold no lockdown of their own: both use attnstore.sqlpolicy."""
    root = Path(attnstore.__file__).parent
    for path in [root / "query.py", root / "serve.py", *sorted((root / "viewer").glob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        assert "enable_external_access" not in text.split('"""', 2)[-1], path
        assert "lock_configuration = true" not in text, path


@pytest.fixture(scope="module")
def small_server(viewer_store: Path) -> Iterator[Any]:
    srv = make_server([viewer_store], port=0, time_limit=2.0, result_bytes=100_000)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(server: Any, path: str, header: bool = True, **params: Any) -> tuple[int, Any]:
    url = server.url.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url, headers={API_HEADER: "1"} if header else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_result_bytes_are_capped(small_server: Any) -> None:
    status, body = _get(
        small_server, "/api/sql", q="SELECT range, repeat('x', 100) FROM range(900)"
    )
    assert status == 200
    answer = json.loads(body)
    assert answer["truncated"] is True
    assert 0 < len(answer["rows"]) < 900
    assert len(body) < 120_000
    # one huge value (the 25 MB answer): nothing of it is converted
    status, body = _get(small_server, "/api/sql", q="SELECT list(range) AS l FROM range(3000000)")
    assert status == 200
    answer = json.loads(body)
    assert (answer["truncated"], answer["rows"]) == (True, [])
    assert len(body) < 120_000


def test_api_needs_the_header_a_cross_origin_page_cannot_send(small_server: Any) -> None:
    for path in ("/api/sql", "/api/meta", "/api/tile"):
        status, body = _get(small_server, path, header=False, q="SELECT 1")
        assert status == 403
        assert API_HEADER in json.loads(body)["error"]
    status, _ = _get(small_server, "/", header=False)  # the page itself needs no header
    assert status == 200


def test_over_long_request_line_gets_json(small_server: Any) -> None:
    host, port = small_server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"GET /api/sql?q=" + b"x" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 414", b"HTTP/1.1 414")), head
    assert b"application/json" in head
    assert "too long" in json.loads(body)["error"]


def test_sql_concurrency_is_bounded(viewer_store: Path) -> None:
    viewer = Viewer([viewer_store])
    try:
        held = 0
        while viewer._sql_slots.acquire(blocking=False):  # every slot busy
            held += 1
        assert held >= 1
        with pytest.raises(ApiError) as err:
            viewer.user_sql({"q": "SELECT 1"})
        assert err.value.status == 429
        for _ in range(held):
            viewer._sql_slots.release()
        assert viewer.user_sql({"q": "SELECT 1 AS one"})["rows"] == [{"one": 1}]
    finally:
        viewer.close()
