"""A Delta table's snapshot read straight from its log (``_delta_log/``), without delta-rs.

Opening a store and reading one matrix needs, per table, three things from the Delta log: the
version, the Parquet files that are live (with their ``doc_id`` range from the ``add`` statistics)
and each writer's application-transaction version. For the tables attnstore writes (reader
protocol 1, no partition columns, no deletion vectors, classic checkpoints) these come from the
JSON commits after the newest checkpoint plus that checkpoint's Parquet, read with
``pyarrow.parquet``; so ``attnstore.open(path).matrix(...)`` never loads delta-rs (nor pandas).

The replay follows the Delta protocol: commits newest first, an ``add`` or ``remove`` of a path
hides every older action on that path, the newest ``txn`` of an application wins. Files come out
in the order delta-rs lists them (newest commit first, each commit's adds in order, then the
checkpoint's rows), so a table reads back in the same row order whichever reader took the snapshot.

Anything else (a newer reader protocol, a v2 or damaged checkpoint, a gap in the commits, a line
that is not a known action) raises :class:`LogNotUnderstood`, and the caller reads the table with
delta-rs instead (:mod:`attnstore.store.delta`), which either reads it or names the damage. This
reader never accepts a log that delta-rs would read differently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from attnstore.layout import TABLES_DIR

if TYPE_CHECKING:
    from attnstore.storage import Storage

__all__ = ["AddedFile", "LogNotUnderstood", "TableLog", "log_path", "read_log", "table_path"]

_COMMIT: Final = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT: Final = re.compile(r"^(\d{20})\.checkpoint\.parquet$")
_CHECKPOINT_PART: Final = re.compile(r"^(\d{20})\.checkpoint\.(\d{10})\.(\d{10})\.parquet$")
_ANY_CHECKPOINT: Final = re.compile(r"^\d{20}\.checkpoint\.")
#: Actions that do not change which files are live or which transactions are done.
_IGNORED: Final = frozenset({"commitInfo", "cdc", "domainMetadata"})


class LogNotUnderstood(Exception):
    """The log uses something this reader does not implement; read the table with delta-rs."""


@dataclass(frozen=True)
class AddedFile:
    """One live Parquet file: its path as the log writes it (URI-encoded, relative to the table)
    and its ``doc_id`` range when the ``add`` statistics hold one."""

    path: str
    min_doc: int | None
    max_doc: int | None


@dataclass(frozen=True)
class TableLog:
    """A table at one version: its live files and the application transactions it holds."""

    version: int
    files: tuple[AddedFile, ...]
    txns: Mapping[str, int] = field(default_factory=dict)

    def txn_version(self, app_id: str) -> int:
        """The version of ``app_id``'s last transaction in this table (0 if none)."""
        return self.txns.get(app_id, 0)


def table_path(name: str) -> str:
    """The store-relative folder of table ``name``."""
    return f"{TABLES_DIR}/{name}"


def log_path(name: str) -> str:
    """The store-relative folder of table ``name``'s Delta log."""
    return f"{table_path(name)}/_delta_log"


def read_log(storage: Storage, name: str) -> TableLog | None:
    """Table ``name`` at its latest version, or ``None`` if no writer created it yet.

    Raises :class:`LogNotUnderstood` for a log to be read by delta-rs instead (see the module doc).
    """
    rel = log_path(name)
    names = storage.list(rel)
    commits: dict[int, str] = {}
    singles: set[int] = set()
    parts: dict[tuple[int, int], set[int]] = {}
    for n in names:
        if m := _COMMIT.match(n):
            commits[int(m.group(1))] = n
        elif m := _CHECKPOINT.match(n):
            singles.add(int(m.group(1)))
        elif m := _CHECKPOINT_PART.match(n):
            key = (int(m.group(1)), int(m.group(3)))
            parts.setdefault(key, set()).add(int(m.group(2)))
        elif _ANY_CHECKPOINT.match(n):
            raise LogNotUnderstood(f"{rel}/{n}: not a classic checkpoint")
    complete = singles | {v for (v, total), got in parts.items() if got == set(range(1, total + 1))}
    if not commits and not complete:
        if names:
            raise LogNotUnderstood(f"{rel}: no commit")
        return None  # no writer created the table yet
    checkpoint = max(complete, default=-1)
    latest = max([checkpoint, *commits])
    wanted = range(checkpoint + 1, latest + 1)
    if any(v not in commits for v in wanted):
        raise LogNotUnderstood(f"{rel}: a gap in the commits")
    replay = _Replay()
    for v in reversed(wanted):  # newest first
        try:
            text = storage.read_bytes(f"{rel}/{commits[v]}").decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:  # gone (expired meanwhile) or unreadable
            raise LogNotUnderstood(f"{rel}/{commits[v]}: {err}") from None
        replay.commit([_json_line(line, rel) for line in text.splitlines() if line.strip()])
    if checkpoint >= 0:
        n_parts = [t for (v, t), got in parts.items() if v == checkpoint and len(got) == t]
        names_ = (
            [f"{checkpoint:020d}.checkpoint.parquet"]
            if checkpoint in singles
            else [
                f"{checkpoint:020d}.checkpoint.{i:010d}.{n_parts[0]:010d}.parquet"
                for i in range(1, n_parts[0] + 1)
            ]
        )
        for n in names_:
            replay.checkpoint(_checkpoint_rows(storage, f"{rel}/{n}"))
    return replay.result(latest)


def _json_line(line: str, rel: str) -> dict[str, Any]:
    try:
        action = json.loads(line)
    except ValueError:
        raise LogNotUnderstood(f"{rel}: a line that is not JSON") from None
    if not isinstance(action, dict) or len(action) != 1:
        raise LogNotUnderstood(f"{rel}: a line that is not one action")
    return action


def _checkpoint_rows(storage: Storage, rel: str) -> list[dict[str, Any]]:
    """A checkpoint's actions, one dict per row (only the columns that matter here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(rel)
        pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        columns = [c for c in ("add", "remove", "txn", "protocol", "metaData")
                   if c in pf.schema_arrow.names]  # fmt: skip
        table = pf.read(columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise LogNotUnderstood(f"{rel}: {err}") from None
    if "sidecar" in pf.schema_arrow.names:
        sidecars = pf.read(columns=["sidecar"])["sidecar"]
        if sidecars.null_count != len(sidecars):
            raise LogNotUnderstood(f"{rel}: sidecar files")
    rows: list[dict[str, Any]] = []
    for record in table.to_pylist():
        rows.extend({k: v} for k, v in record.items() if v is not None)
    return rows


class _Replay:
    """Log replay, newest action first (the Delta protocol's reconciliation)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.files: list[AddedFile] = []
        self.txns: dict[str, int] = {}
        self.protocol: dict[str, Any] | None = None
        self.metadata: dict[str, Any] | None = None

    def commit(self, actions: list[dict[str, Any]]) -> None:
        """One commit's actions, in the order written; commits come newest first."""
        paths: set[str] = set()
        for action in actions:
            self._action(action, paths)
        self.seen |= paths  # older commits' actions on these paths are hidden

    def checkpoint(self, actions: list[dict[str, Any]]) -> None:
        """A checkpoint's rows: the live adds, tombstones, transactions, protocol, metadata."""
        paths: set[str] = set()
        for action in actions:
            if "remove" in action:  # a tombstone: names no live file of the checkpoint
                continue
            self._action(action, paths)

    def _action(self, action: dict[str, Any], paths: set[str]) -> None:
        ((kind, body),) = action.items()
        if not isinstance(body, dict):
            raise LogNotUnderstood(f"a {kind} action that is not an object")
        if kind == "add":
            path = _string(body.get("path"))
            if body.get("deletionVector") is not None or body.get("partitionValues"):
                raise LogNotUnderstood("deletion vectors or partition values")
            if path not in self.seen and path not in paths:
                self.files.append(AddedFile(path, *_doc_range(body.get("stats"))))
            paths.add(path)
        elif kind == "remove":
            if body.get("deletionVector") is not None:
                raise LogNotUnderstood("deletion vectors")
            paths.add(_string(body.get("path")))
        elif kind == "txn":
            app, version = body.get("appId"), body.get("version")
            if not isinstance(app, str) or not isinstance(version, int) or _is_bool(version):
                raise LogNotUnderstood("a txn action without appId and version")
            self.txns.setdefault(app, version)
        elif kind == "protocol":
            if self.protocol is None:
                self.protocol = body
        elif kind == "metaData":
            if self.metadata is None:
                self.metadata = body
        elif kind not in _IGNORED:
            raise LogNotUnderstood(f"a {kind!r} action")

    def result(self, version: int) -> TableLog:
        protocol, metadata = self.protocol or {}, self.metadata or {}
        if protocol.get("minReaderVersion") != 1 or protocol.get("readerFeatures"):
            raise LogNotUnderstood("a reader protocol other than 1")
        if metadata.get("partitionColumns"):
            raise LogNotUnderstood("partition columns")
        return TableLog(version, tuple(self.files), dict(self.txns))


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise LogNotUnderstood("a file action without a path")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not _is_bool(value)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _doc_range(stats: object) -> tuple[int | None, int | None]:
    """``(min, max)`` of ``doc_id`` from an ``add``'s JSON statistics, when it records both."""
    if stats is None:
        return None, None
    if not isinstance(stats, str):
        raise LogNotUnderstood("add statistics that are not a JSON string")
    try:
        doc = json.loads(stats)
    except ValueError:
        raise LogNotUnderstood("add statistics that are not JSON") from None
    if not isinstance(doc, dict):
        raise LogNotUnderstood("add statistics that are not an object")
    lows, highs = doc.get("minValues"), doc.get("maxValues")
    lo = lows.get("doc_id") if isinstance(lows, dict) else None
    hi = highs.get("doc_id") if isinstance(highs, dict) else None
    if lo is None or hi is None:
        return None, None
    if not (_is_int(lo) and _is_int(hi)):
        raise LogNotUnderstood("doc_id statistics that are not integers")
    return lo, hi
