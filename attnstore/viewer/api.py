"""The viewer's JSON API, independent of HTTP: :class:`Viewer`, the pages, tiles and user SQL of
the served stores (:mod:`~attnstore.viewer.server` puts it on HTTP)."""

from __future__ import annotations

from attnstore.viewer.pages import Pages
from attnstore.viewer.sql import UserSql
from attnstore.viewer.tiles import Tiles

__all__ = ["Viewer"]


class Viewer(Pages, Tiles, UserSql):
    """The API behind ``attnstore serve``, independent of HTTP (each method returns JSON data).

    Parameters
    ----------
    paths
        One or more stores (folders, URLs, opened :class:`~attnstore.storage.Storage` or
        :class:`~attnstore.store.Store` objects; each is opened once); the API names them by
        position (``store=0``, ``store=1`` …).
    time_limit
        Seconds a user SQL query may run.
    row_cap
        Rows a user SQL query returns at most.
    """
