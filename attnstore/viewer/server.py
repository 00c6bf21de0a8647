"""``attnstore serve``'s HTTP side: a stdlib threading server for the static pages and the JSON API
(the host check, the API header, security headers, JSON errors; see :mod:`attnstore.viewer`)."""

from __future__ import annotations

import http.server
import json
import mimetypes
import socket
import sys
import traceback
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from attnstore.viewer.api import Viewer
from attnstore.viewer.params import ApiError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from attnstore.storage import Location
    from attnstore.store import Store

__all__ = ["API_HEADER", "make_server", "serve"]

STATIC: Final = Path(__file__).with_name("static")
#: The header every ``/api/`` request must carry (a cross-origin ``no-cors`` request cannot).
API_HEADER: Final = "X-Attnstore"
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})


_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "attnstore"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        body = json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def _host_ok(self) -> bool:
        if self.server.server_address[0] not in _LOOPBACK:
            return True  # bound to a public address on purpose: any Host may reach it
        host = (self.headers.get("Host") or "").strip()
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0]
        return name in _LOOPBACK

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the standard library raises itself (an over-long request line or header, a
        malformed request) as the documented JSON ``{"error": ...}``, not its HTML page."""
        self.close_connection = True
        short, _ = self.responses.get(code, ("Error", ""))
        text = f"{message or short} (HTTP {code})."
        if code in (414, 431):
            text = f"{message or short}: the request line or a header is too long (HTTP {code})."
        body = json.dumps({"error": text}).encode()
        try:
            self.send_response(code, short)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            for k, v in _SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:  # the client went away
            pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._json(405, {"error": "Only GET requests are served (the API is read-only)."})

    def do_GET(self) -> None:
        try:
            if not self._host_ok():
                raise ApiError(403, "Requests must address this server by a loopback host name.")
            url = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            if url.path.startswith("/api/"):
                if self.headers.get(API_HEADER) != "1":  # cross-origin no-cors cannot set it
                    raise ApiError(
                        403,
                        f"API requests must carry the header '{API_HEADER}: 1' (the viewer's "
                        "page sends it; a page on another origin cannot).",
                    )
                self._api(url.path[5:], params)
            else:
                self._static(url.path)
        except ApiError as err:
            self._json(err.status, {"error": err.message})
        except BrokenPipeError:  # the browser went away
            pass
        except Exception as err:  # noqa: BLE001 - never a stack trace to the client; the log gets it
            traceback.print_exc(file=sys.stderr)
            self._json(
                500, {"error": f"Internal error ({type(err).__name__}). See the server log."}
            )

    def _api(self, name: str, params: dict[str, str]) -> None:
        viewer = self.server.viewer
        if name in ("tile", "overview"):
            body, headers = viewer.tile(params) if name == "tile" else viewer.overview(params)
            headers["Cache-Control"] = "private, max-age=3600"
            self._send(200, body, "application/octet-stream", headers)
            return
        routes: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
            "meta": viewer.meta,
            "heads": viewer.heads,
            "grid": viewer.grid,
            "head": viewer.head,
            "doc": viewer.doc,
            "row": viewer.row,
            "col": viewer.col,
            "pair": viewer.pair,
            "sql": viewer.user_sql,
        }
        handler = routes.get(name)
        if handler is None:
            raise ApiError(
                404,
                f"No API endpoint /api/{name}. Endpoints: {', '.join(routes)}, tile, overview.",
            )
        self._json(200, handler(params))

    def _static(self, path: str) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        if path not in ("/", "/index.html") and not path.startswith("/static/"):
            raise ApiError(404, f"Nothing at {path[:80]}. The viewer is at /.")
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:  # only the shipped files, by exact name: no path traversal
            raise ApiError(404, f"No static file {name[:80]!r}.")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, files[name].read_bytes(), ctype, {"Cache-Control": "no-cache"})


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], viewer: Viewer, *, verbose: bool) -> None:
        self.viewer = viewer
        self.verbose = verbose
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.viewer.close()


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(
    paths: Sequence[Location | Store],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    verbose: bool = False,
    **viewer_options: Any,
) -> _Server:
    """A ready, not yet running server (``port=0`` picks a free port; see ``.url``)."""
    viewer = Viewer(paths, **viewer_options)
    cls = _Server6 if ":" in host else _Server
    return cls((host, port), viewer, verbose=verbose)


def serve(
    *paths: Location | Store,
    host: str = "127.0.0.1",
    port: int = 8765,
    verbose: bool = False,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the viewer for ``paths`` until interrupted (Ctrl-C); prints or hands over its URL."""
    server = make_server(paths, host=host, port=port, verbose=verbose)
    (ready or (lambda url: print(f"attnstore viewer at {url} (Ctrl-C stops it)", flush=True)))(
        server.url
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
