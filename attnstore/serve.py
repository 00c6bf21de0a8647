"""``attnstore serve``'s old home: the viewer is the package :mod:`attnstore.viewer`."""

from __future__ import annotations

from attnstore.viewer import (
    API_HEADER,
    ROW_CAP,
    SQL_TIME_LIMIT,
    TILE,
    ApiError,
    Viewer,
    make_server,
    serve,
)

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
