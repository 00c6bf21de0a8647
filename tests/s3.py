"""A loopback S3 server for tests and benchmarks: moto's threaded server on 127.0.0.1.

Every HTTP request the server answers is recorded (method, key, Range header, status, bytes sent),
so a test can state what one read costs on the wire. The ``s3_server`` fixture starts one server
per session; ``s3`` gives each test a fresh bucket and the standard ``AWS_*`` variables (so
subprocesses such as ``attnstore extract`` reach it too).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Dummy credentials: moto accepts any, but every client insists on some.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "attnstore-test",
    "AWS_SECRET_ACCESS_KEY": "attnstore-test-secret",
    "AWS_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # /bucket/key
    query: str
    range: str | None
    status: int
    bytes_out: int  # response body
    bytes_in: int  # request body


#: The path, on the server, that answers with the requests recorded so far (and forgets them).
REQUESTS_PATH = "/__attnstore_requests__"


class LoopbackS3:
    """moto's ``ThreadedMotoServer`` on ``127.0.0.1`` (a free port), recording every request.

    The server runs in its own process: some delta-rs calls hold the GIL while they wait for the
    server's answer, which would deadlock a server thread of the same process.
    """

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.s3"],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("http://"):
            self._process.kill()
            raise RuntimeError(f"the loopback S3 server did not start: {line!r}")
        self.endpoint = line.strip()
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_REGION"],
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3–63 characters) and return ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def take_requests(self) -> list[Request]:
        """The requests recorded since the last call (and forget them)."""
        with urllib.request.urlopen(self.endpoint + REQUESTS_PATH, timeout=30) as response:
            return [Request(**r) for r in json.load(response)]

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


def _serve() -> None:
    """Run the server in this process; print its endpoint, then serve until terminated."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    recorded: list[Request] = []
    lock = threading.Lock()
    wsgi = server._server  # the werkzeug server: count what its app answers
    app: Callable[..., Iterable[bytes]] = wsgi.app

    def recording(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") == REQUESTS_PATH:
            with lock:
                taken = [r.__dict__ for r in recorded]
                recorded.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(taken).encode()]
        status: list[int] = []

        def start(code: str, headers: Any, *exc: Any) -> Any:
            status.append(int(code.split()[0]))
            return start_response(code, headers, *exc)

        body = list(app(environ, start))
        with lock:
            recorded.append(
                Request(
                    environ["REQUEST_METHOD"],
                    environ.get("PATH_INFO", ""),
                    environ.get("QUERY_STRING", ""),
                    environ.get("HTTP_RANGE"),
                    status[0] if status else 0,
                    sum(len(b) for b in body),
                    int(environ.get("CONTENT_LENGTH") or 0),
                )
            )
        return body

    wsgi.app = recording
    print(f"http://{host}:{port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def bucket_name(text: str) -> str:
    """A valid, unique-enough bucket name (3–63 lower-case letters, digits, '-') from ``text``."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50].strip("-")
    return f"t-{name}-{os.urandom(3).hex()}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LoopbackS3]:
    server = LoopbackS3()
    yield server
    server.stop()


@pytest.fixture
def s3(
    s3_server: LoopbackS3, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> str:
    """A fresh bucket on the loopback S3, with ``AWS_*`` pointing at it; returns ``s3://bucket``."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    url = s3_server.make_bucket(bucket_name(request.node.name))
    s3_server.take_requests()
    return url


if __name__ == "__main__":
    _serve()
