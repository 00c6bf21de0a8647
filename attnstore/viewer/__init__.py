"""``attnstore serve``: a local web viewer for stores, with a small JSON API.

A stdlib :class:`~http.server.ThreadingHTTPServer` serves the static pages shipped in
``attnstore/viewer/static/`` (plain JavaScript and canvas: no CDN, no build step, works offline) and the JSON
API they use, which scripts can use too (documented in ``schemas/serve.md``):

=====================  ==========================================================================
``/api/meta``           the stores: model, layers, heads, documents, score columns, syntax tables
``/api/heads``          ``head_summary`` rows (one per layer and head: corpus means and a label)
``/api/grid``           one value per (layer, head): a score's corpus aggregate, or the label
``/api/head``           one head: every score with its rank, label, top and per-decile documents
``/api/doc``            one document: text and tokens
``/api/tile``           one 256 × 256 tile of a head's max-pooled matrix, float32 (binary)
``/api/overview``       a head's stored ``--overview`` (max or mean), float32 (binary)
``/api/row``            exact attention of one query row (``/api/col``: one key column)
``/api/sql``            read-only SQL over the store's views: rows, or 4xx ``{"error": ...}``
=====================  ==========================================================================

Safety: the server binds 127.0.0.1 unless told otherwise and answers only requests addressed to
that host (DNS rebinding), and every ``/api/`` request must carry the header ``X-Attnstore: 1``
(the page sends it; a page on another origin cannot without CORS, so a cross-origin ``no-cors``
request spends no work). Each store gets its own DuckDB connection, built by
:func:`attnstore.query.connect` and locked down by the one read-only policy of
:mod:`attnstore.sqlpolicy` (no file system for DuckDB at all, no temporary folder, no extensions,
``lock_configuration``), with bounded threads and memory. User SQL must be one ``SELECT``
statement; it runs on the store's connection (one query at a time; the tables stay lazy Arrow
datasets, never copied into memory), is interrupted after a time limit that also covers the
conversion to JSON, returns at most a row cap and a byte cap (``"truncated": true``), and at most
:data:`SQL_CONCURRENCY` user queries run or wait at once (more get HTTP 429). Bad parameters get a
4xx with a message, never a stack trace; so do requests the standard library refuses itself (an
over-long request line or header: JSON, not its HTML page).


The package, by part: :mod:`~attnstore.viewer.api` (:class:`Viewer`, the JSON API without HTTP) made
of :mod:`~attnstore.viewer.core` (the served stores, bounded page queries),
:mod:`~attnstore.viewer.pages`, :mod:`~attnstore.viewer.tiles` and :mod:`~attnstore.viewer.sql`;
:mod:`~attnstore.viewer.server` (HTTP), :mod:`~attnstore.viewer.cache`,
:mod:`~attnstore.viewer.params` and :mod:`~attnstore.viewer.values`.
"""

from __future__ import annotations

from attnstore.viewer.api import Viewer
from attnstore.viewer.core import ROW_CAP, SQL_TIME_LIMIT
from attnstore.viewer.params import ApiError
from attnstore.viewer.server import API_HEADER, make_server, serve
from attnstore.viewer.tiles import TILE

__all__ = [
    "API_HEADER",
    "ROW_CAP",
    "SQL_TIME_LIMIT",
    "TILE",
    "ApiError",
    "Viewer",
    "make_server",
    "serve",
]
