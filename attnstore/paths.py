"""The one place that turns a path read from a store's own metadata into a place to read.

A store is data from elsewhere (a colleague's bucket, a download), and its metadata names files:
Delta log ``add`` paths, ``docs.segment`` values, writer intents, format-1 commit records. Every
such name goes through :func:`inside` before anything opens it. A name is accepted only when it is
relative, has no ``.``/``..``/empty component, no backslash, no NUL and no URL scheme (after
percent-decoding, as Delta stores URIs), so it cannot name anything outside its base folder on a
local disk or on object storage alike; on a local disk the resolved real path (symbolic links
followed) must also stay inside the store. Anything else raises :class:`UnsafeStorePathError`,
naming the file that holds the name and the name itself.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from attnstore.errors import UnsafeStorePathError

if TYPE_CHECKING:
    from attnstore.storage import Storage

__all__ = [
    "check_local",
    "damaged_file_message",
    "inside",
    "local_files_inside",
    "relative_name",
]


def relative_name(name: object, *, source: str, what: str, uri: bool = False) -> str:
    """``name`` as a safe ``/``-separated relative path, or :class:`UnsafeStorePathError`.

    ``source`` is the store file the name was read from, ``what`` what it names (for the message);
    ``uri`` percent-decodes first (Delta ``add`` paths are URIs).
    """
    if not isinstance(name, str) or not name:
        raise UnsafeStorePathError(
            f"{source}: expected a relative path for {what}. Got {name!r}; the store is damaged."
        )
    text = urllib.parse.unquote(name) if uri else name
    parts = text.split("/")
    bad = (
        "\x00" in text
        or "\\" in text
        or ":" in parts[0]  # a URL scheme (file:, s3:) or a Windows drive
        or text.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
    )
    if bad:
        raise UnsafeStorePathError(
            f"{source}: {what} {name!r} leaves the store (absolute, a URL or '..'); refused. "
            "A store may only name files inside itself; this one is damaged or was made to "
            "read elsewhere."
        )
    return text


def inside(
    storage: Storage, base: str, name: object, *, source: str, what: str, uri: bool = False
) -> str:
    """The store-relative path of ``name`` under folder ``base``, checked (see the module doc)."""
    rel = f"{base.strip('/')}/{relative_name(name, source=source, what=what, uri=uri)}"
    check_local(storage, rel, source=source, what=what)
    return rel


def check_local(storage: Storage, rel: str, *, source: str, what: str) -> None:
    """On a local disk: ``rel``'s real path (links followed) must stay inside the store."""
    root = getattr(storage, "path", None)
    if not isinstance(root, Path):
        return  # object storage: keys are names, a relative name cannot leave its prefix
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / rel)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafeStorePathError(
            f"{source}: {what} {rel!r} resolves outside the store (a symbolic link to "
            f"{real!r}); refused."
        )


def local_files_inside(storage: Storage, rel: str, *, source: str, what: str) -> None:
    """On a local disk: every file under folder ``rel`` (a segment) stays inside the store."""
    root = getattr(storage, "path", None)
    if not isinstance(root, Path):
        return
    check_local(storage, rel, source=source, what=what)
    folder = root / rel
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in [*filenames, *dirnames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                check_local(storage, path.relative_to(root).as_posix(), source=source, what=what)


_PARQUET_OPEN = re.compile(
    r"Could not open Parquet input source '([^']+)': (.*?)(?:\.? Either .*)?$"
)


def damaged_file_message(err: BaseException) -> str | None:
    """One line naming the file and the problem for a reader error that a damaged store file
    causes (pyarrow refusing a Parquet file, in any wrapping), or None if ``err`` is not one."""
    text = " ".join(str(err).split())
    found = _PARQUET_OPEN.search(text)
    if found:
        path, problem = found.group(1), found.group(2).rstrip(".")
        return (
            f"{path}: not a readable Parquet file ({problem}); the store is damaged. "
            "`attnstore verify` lists every damaged file."
        )
    return None
