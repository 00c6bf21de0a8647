"""The one read-only SQL session policy: how every DuckDB connection over a store is locked down.

``Store.sql``, ``attnstore query`` and the viewer (``attnstore serve``) all get their connection
from :func:`attnstore.query.session`, which applies :func:`lock_down`, and check statements with
:func:`check_statement`, so the policy is written once:

- the store's tables are lazy Arrow datasets registered in the connection (read by pyarrow, with
  the store's own path checks and Parquet page checksums), and the summary views are bound while
  the connection is still open;
- then DuckDB gets **no file system at all**: ``enable_external_access = false`` with no
  ``allowed_directories`` and the temporary directory switched off (``temp_directory = ''``, 0 bytes
  of spill), so ``read_text``, ``read_parquet``, ``COPY``, ``ATTACH`` and the default ``.tmp``
  folder under the working directory are all out of reach; no extension is installed or loaded;
- optional bounds on threads and memory (the viewer sets them);
- ``lock_configuration`` last, so no statement can undo any of it;
- a statement runs only if it is exactly one statement of an allowed kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import duckdb

from attnstore.errors import QueryError

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = ["READ_ONLY", "SELECT_ONLY", "check_statement", "lock_down"]

#: What ``Store.sql`` and ``attnstore query`` run (``WITH``/``DESCRIBE``/``SUMMARIZE`` are SELECTs).
READ_ONLY: Final = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})
#: What the viewer's ``/api/sql`` runs.
SELECT_ONLY: Final = frozenset({duckdb.StatementType.SELECT})


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def lock_down(
    con: duckdb.DuckDBPyConnection, *, threads: int | None = None, memory_limit: str | None = None
) -> None:
    """Confine a connection whose tables and views are defined (see the module docstring)."""
    # Bind every view once while access is still open, so whatever a view needs is in place
    # before the doors close; the tables stay lazy Arrow datasets, nothing is loaded.
    views = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    for (name,) in views:
        con.execute(f'SELECT * FROM "{name.replace(chr(34), chr(34) * 2)}" LIMIT 0').fetchall()
    settings = [
        "SET enable_progress_bar = false",
        "SET temp_directory = ''",  # no spill folder: it would be readable (DuckDB allows it)
        "SET max_temp_directory_size = '0B'",
        "SET enable_external_access = false",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
    ]
    if threads is not None:
        settings.append(f"SET threads = {int(threads)}")
    if memory_limit is not None:
        settings.append(f"SET memory_limit = {_quote(memory_limit)}")
    settings.append("SET lock_configuration = true")
    for statement in settings:
        con.execute(statement)


def check_statement(
    con: duckdb.DuckDBPyConnection, sql: str, allowed: Collection[duckdb.StatementType] = READ_ONLY
) -> None:
    """Raise :class:`QueryError` unless ``sql`` is exactly one statement of an ``allowed`` kind."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise QueryError(f"Malformed SQL: {err}") from None
    if len(statements) != 1:
        raise QueryError(f"Expected exactly one SQL statement. Got {len(statements)}.")
    kind = statements[0].type
    if kind not in allowed:
        names = "SELECT, WITH" + (", EXPLAIN, DESCRIBE" if allowed == READ_ONLY else "")
        raise QueryError(
            f"Only read-only statements run on a store ({names}). Got a {kind.name} statement "
            "(COPY, ATTACH, SET, PRAGMA, CREATE, EXPLAIN ANALYZE … are refused)."
        )
