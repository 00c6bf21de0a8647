"""Where a store's bytes live: the one seam between store logic and a file system.

Table and matrix code never opens a path itself. It asks a :class:`Storage` for

- a Zarr store for one array (``zarr_store``), so arrays use zarr's own storage abstraction;
- a Delta table URI plus ``storage_options`` (``table_uri``), handed to delta-rs as they are;
- small whole-file reads and atomic writes (the manifest, writer files) and listings;
- byte ranges of one file (:class:`RangeReads`: a file's tail and ranges in it), which the
  zarr-free segment reader (:mod:`attnstore.store.shards`) reads shards with.

:class:`LocalStorage` is the implementation for a folder on a local disk, :class:`ObjectStorage`
for an ``s3://``, ``gs://`` or ``az://`` root (zarr's ``ObjectStore`` over obstore, delta-rs storage
options, a ``pyarrow.fs`` file system); :func:`open_storage` picks one by the root's scheme.

A store's location is opened once, with its options, and the opened :class:`Storage` is what is
passed down (a :data:`Location` may be one): nothing reopens a store by its path, and no option is
kept anywhere but in the storage it belongs to.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

__all__ = [
    "LocalStorage",
    "Location",
    "ObjectStorage",
    "RangeReads",
    "Storage",
    "is_url",
    "location_text",
    "open_storage",
]


class Storage(Protocol):
    """The operations a store needs from where its bytes live. ``rel`` paths use ``/``."""

    root: str

    def zarr_store(self, rel: str, *, read_only: bool) -> Any:
        """A zarr v3 store (``zarr.abc.store.Store``) rooted at ``rel``."""
        ...

    def table_uri(self, rel: str) -> str:
        """The URI delta-rs opens for the table at ``rel``."""
        ...

    @property
    def storage_options(self) -> dict[str, str] | None:
        """Options for delta-rs (credentials, endpoints); ``None`` for a local disk."""
        ...

    def arrow_filesystem(self) -> Any:
        """The ``pyarrow.fs.FileSystem`` that reads the Parquet files (fork-safe, unlike delta-rs)."""
        ...

    def arrow_path(self, uri: str) -> str:
        """The path of a Delta table ``uri`` within :meth:`arrow_filesystem`."""
        ...

    def exists(self, rel: str) -> bool: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write a whole small file so a reader sees the old or the new content, never a mix."""
        ...

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Write a whole small file only if ``rel`` does not exist; True if this call created it."""
        ...

    def upload(self, rel: str, local: str | os.PathLike[str]) -> None:
        """Put a finished local file at ``rel`` (visible once complete)."""
        ...

    def delete(self, rel: str) -> None:
        """Remove one file; no error if it is gone."""
        ...

    def walk(self, rel: str) -> list[tuple[str, int]]:
        """Every file under ``rel`` (recursive): its path relative to the root, and its size."""
        ...

    def list(self, rel: str) -> list[str]:
        """Names directly inside folder ``rel`` (empty when it does not exist)."""
        ...

    def size(self, rel: str) -> int: ...

    def local_path(self, rel: str) -> Path:
        """A local path for writers that need one (Parquet parts); local storage only."""
        ...

    def sync(self, rel: str) -> None:
        """Make every file under ``rel`` durable before a commit points at it."""
        ...

    def lock(self, rel: str) -> AbstractContextManager[None]:
        """An exclusive lock between processes (one writer's flushes under one app id)."""
        ...


@runtime_checkable
class RangeReads(Protocol):
    """Whole files and byte ranges of them, as a :class:`Storage` may read them (both storages
    here do; a storage without ranges has its segments read through zarr)."""

    def read_bytes(self, rel: str) -> bytes: ...

    def read_tail(self, rel: str, n: int) -> tuple[int, bytes]:
        """The size of file ``rel`` and its last ``n`` bytes (all of it when it is shorter);
        ``FileNotFoundError`` when it does not exist."""
        ...

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Bytes ``start … end − 1`` of file ``rel`` for each ``(start, end)`` (fewer where the
        file ends first)."""
        ...


class LocalStorage:
    """A store folder on a local disk. Atomic writes: temporary name, fsync, rename."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root)
        self.root = str(self.path)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def zarr_store(self, rel: str, *, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.path / rel, read_only=read_only)

    def table_uri(self, rel: str) -> str:
        return str((self.path / rel).absolute())

    @property
    def storage_options(self) -> dict[str, str] | None:
        return None

    def arrow_filesystem(self) -> Any:
        from pyarrow.fs import LocalFileSystem

        return LocalFileSystem()

    def arrow_path(self, uri: str) -> str:
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path) if uri.startswith("file:") else uri.rstrip("/")

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return (self.path / rel).read_bytes()

    def read_tail(self, rel: str, n: int) -> tuple[int, bytes]:
        with open(self.path / rel, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            return size, os.pread(fh.fileno(), min(n, size), max(0, size - n))

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        with open(self.path / rel, "rb") as fh:
            return [os.pread(fh.fileno(), end - start, start) for start, end in ranges]

    def _durable_temp(self, rel: str, data: bytes) -> tuple[Path, Path]:
        """``data`` fsync'ed under a temporary name beside ``rel``; (temporary, final) paths."""
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp, path

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        tmp, path = self._durable_temp(rel, data)
        os.replace(tmp, path)

    def create_bytes(self, rel: str, data: bytes) -> bool:
        tmp, path = self._durable_temp(rel, data)
        try:
            os.link(tmp, path)  # complete content, and fails if the name exists (like O_EXCL)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def upload(self, rel: str, local: str | os.PathLike[str]) -> None:
        import shutil

        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        self.sync(str(tmp.relative_to(self.path)))
        os.replace(tmp, path)

    def delete(self, rel: str) -> None:
        (self.path / rel).unlink(missing_ok=True)

    def walk(self, rel: str) -> list[tuple[str, int]]:
        base = self.path / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        return [(p.relative_to(self.path).as_posix(), p.stat().st_size) for p in files]

    def list(self, rel: str) -> list[str]:
        folder = self.path / rel
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def size(self, rel: str) -> int:
        return (self.path / rel).stat().st_size

    def local_path(self, rel: str) -> Path:
        return self.path / rel

    def sync(self, rel: str) -> None:
        target = self.path / rel
        for f in [target] if target.is_file() else (p for p in target.rglob("*") if p.is_file()):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        import fcntl

        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released by the kernel if the process dies
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


#: URL schemes a store may live at besides a local folder (``file://`` is a local folder).
OBJECT_SCHEMES: Final = ("s3", "s3a", "gs", "az", "abfs", "abfss")
#: Standard AWS variables read for ``s3://`` stores; ``storage_options`` override them.
AWS_ENVIRONMENT: Final = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ALLOW_HTTP",
)
#: An object-storage lock older than this is taken over (its holder is presumed dead). A holder on
#: this machine whose process is gone is taken over at once.
LOCK_LEASE_SECONDS: Final = 600.0
#: Options that configure the HTTP client rather than the store (obstore ``client_options``).
_CLIENT_KEYS: Final = frozenset({
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
    "http1_only", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host", "proxy_url",
    "proxy_ca_certificate", "proxy_excludes", "timeout", "user_agent",
})  # fmt: skip
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
#: The process whose object-storage clients started obstore's runtime (threads do not survive a fork).
_runtime_pid: int | None = None


def is_url(root: str | os.PathLike[str]) -> bool:
    """True if ``root`` names object storage (``s3://…`` and the other :data:`OBJECT_SCHEMES`)."""
    scheme, sep, _ = str(root).partition("://")
    return bool(sep) and scheme.lower() in OBJECT_SCHEMES


def _option_key(key: str) -> str:
    """``AWS_ENDPOINT_URL`` → ``endpoint_url``: one spelling per option, whatever the prefix."""
    low = key.lower()
    for prefix in ("aws_", "google_", "azure_"):
        if low.startswith(prefix):
            return low[len(prefix) :]
    return low


def _option(options: dict[str, str], *names: str) -> str | None:
    for key, value in options.items():
        if _option_key(key) in names:
            return value
    return None


class ObjectStorage:
    """A store under an object-storage URL: ``s3://bucket/prefix/name.attn`` (also ``gs://``, ``az://``).

    The same options reach every client: zarr's ``ObjectStore`` over obstore for segments (a read
    fetches ``zarr.json``, the shard index and one byte range), delta-rs for the tables, and a
    ``pyarrow.fs`` file system for reading Parquet. For ``s3://`` the standard AWS variables
    (:data:`AWS_ENVIRONMENT`) are read first and ``storage_options`` override them; an
    ``http://`` endpoint (a local S3 such as MinIO) allows plain HTTP unless ``allow_http`` says
    otherwise. A whole-object PUT is atomic, so small files need no temporary name; creating a file
    only if it is absent is a conditional PUT (``If-None-Match``).
    """

    def __init__(self, url: str, storage_options: dict[str, str] | None = None) -> None:
        from attnstore.errors import StorageConfigError

        try:
            import obstore  # noqa: F401
        except ImportError:
            raise StorageConfigError(
                f"A store at {url!r} needs obstore: pip install 'attnstore[s3]'."
            ) from None
        scheme, sep, rest = url.partition("://")
        self.scheme = scheme.lower()
        if not sep or self.scheme not in OBJECT_SCHEMES:
            raise StorageConfigError(
                f"Expected a URL starting with one of {', '.join(s + '://' for s in OBJECT_SCHEMES)}. "
                f"Got {url!r}."
            )
        self.bucket, _, self.prefix = rest.rstrip("/").partition("/")
        rest = rest.rstrip("/")
        if not self.bucket:
            raise StorageConfigError(
                f"Expected a bucket in {url!r}, as in {self.scheme}://BUCKET/path/name.attn."
            )
        self.root = f"{self.scheme}://{rest}"
        options: dict[str, str] = {}
        if self.scheme in ("s3", "s3a"):
            options.update({k: os.environ[k] for k in AWS_ENVIRONMENT if os.environ.get(k)})
        options.update({str(k): str(v) for k, v in (storage_options or {}).items()})
        self.options = options
        self._pid = -1
        self._cache: dict[str, Any] = {}
        self._object_store()  # a malformed option fails here, not at the first read

    def __repr__(self) -> str:
        return f"ObjectStorage({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}, "_pid": -1}

    def _cached(self, key: str, make: Any) -> Any:
        if self._pid != os.getpid():  # a forked child builds its own clients
            self._cache, self._pid = {}, os.getpid()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- option views per client ----------------------------------------------------------------
    def _endpoint(self) -> str | None:
        return _option(self.options, "endpoint_url_s3", "endpoint_url", "endpoint")

    def _allow_http(self) -> bool:
        given = _option(self.options, "allow_http")
        if given is not None:
            return given.strip().lower() in _TRUE
        return (self._endpoint() or "").startswith("http://")

    @property
    def storage_options(self) -> dict[str, str] | None:
        """The options as delta-rs takes them (it accepts obstore's spellings)."""
        options = dict(self.options)
        if self._allow_http() and _option(options, "allow_http") is None:
            options["allow_http"] = "true"
        return options

    def _forked(self) -> bool:
        """True in a child forked after this process started obstore: read through pyarrow."""
        return _runtime_pid is not None and _runtime_pid != os.getpid()

    def _arrow_key(self, rel: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, rel.strip("/")) if p)

    def _object_store(self, rel: str = "") -> Any:
        """The obstore store at the root (cached), or a new one rooted at ``rel``."""

        def make() -> Any:
            from obstore import store as obstores

            from attnstore.errors import StorageConfigError

            global _runtime_pid
            if _runtime_pid is not None and _runtime_pid != os.getpid():
                raise StorageConfigError(
                    f"Cannot write to {self.root!r} from a forked process: the object-storage "
                    "client of the parent does not survive a fork (reads fall back to pyarrow). "
                    "Start writing processes with 'spawn' (multiprocessing.get_context('spawn'))."
                )
            _runtime_pid = os.getpid()

            from_url: Any = obstores.from_url  # options are checked by obstore, not typed here
            config, client = self._split_options()
            try:
                return from_url(self.table_uri(rel), config=config, client_options=client)
            except Exception as err:  # obstore names the offending option
                raise StorageConfigError(
                    f"Cannot use the storage options for {self.root!r}: {err}. Check the "
                    "--storage-option KEY=VALUE pairs (and the AWS_* variables for s3://)."
                ) from err

        return self._cached("object_store", make) if not rel.strip("/") else make()

    def _split_options(self) -> tuple[dict[str, str] | None, dict[str, Any] | None]:
        """obstore's ``config`` (the store) and ``client_options`` (HTTP) from :attr:`options`."""
        config = {k: v for k, v in self.options.items() if _option_key(k) not in _CLIENT_KEYS}
        client: dict[str, Any] = {
            _option_key(k): v for k, v in self.options.items() if _option_key(k) in _CLIENT_KEYS
        }
        for key in ("allow_http", "allow_invalid_certificates", "http1_only", "http2_only"):
            if key in client:
                client[key] = str(client[key]).strip().lower() in _TRUE
        if self._allow_http():
            client["allow_http"] = True
        return config or None, client or None

    def zarr_store(self, rel: str, *, read_only: bool) -> Any:
        from zarr.storage import ObjectStore

        if read_only and self._forked():
            return arrow_zarr_store(self.arrow_filesystem(), self._arrow_key(rel))
        # a store rooted at the array: through a path below a root store, zarr would also write
        # group metadata for every parent folder
        return ObjectStore(self._object_store(rel), read_only=read_only)

    def table_uri(self, rel: str) -> str:
        return f"{self.root}/{rel.strip('/')}" if rel.strip("/") else self.root

    def arrow_filesystem(self) -> Any:
        return self._cached("arrow", self._make_arrow_filesystem)

    def _make_arrow_filesystem(self) -> Any:
        if self.scheme in ("s3", "s3a"):
            from pyarrow.fs import S3FileSystem

            kwargs: dict[str, Any] = {
                "access_key": _option(self.options, "access_key_id"),
                "secret_key": _option(self.options, "secret_access_key"),
                "session_token": _option(self.options, "session_token", "token"),
                "region": _option(self.options, "region", "default_region"),
                "endpoint_override": self._endpoint(),
            }
            if self._endpoint() is not None:
                kwargs["scheme"] = "http" if self._allow_http() else "https"
            return S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
        # gs://, az://: obstore's fsspec adapter, so one set of options serves every client
        from obstore import fsspec as obfsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fsspec_store: Any = obfsspec.FsspecStore
        config, client = self._split_options()
        return PyFileSystem(
            FSSpecHandler(fsspec_store(self.scheme, config=config, client_options=client))
        )

    def arrow_path(self, uri: str) -> str:
        return uri.partition("://")[2].rstrip("/") if "://" in uri else uri.rstrip("/")

    # -- whole objects ----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        import obstore

        key = rel.strip("/")
        if self._forked():
            from pyarrow.fs import FileSelector, FileType

            fs, path = self.arrow_filesystem(), self._arrow_key(rel)
            if fs.get_file_info(path).type != FileType.NotFound:
                return True
            return bool(fs.get_file_info(FileSelector(path, allow_not_found=True)))
        try:
            obstore.head(self._object_store(), key)
            return True
        except FileNotFoundError:
            listing = obstore.list_with_delimiter(self._object_store(), key or None)
            return bool(listing["objects"] or listing["common_prefixes"])

    def read_bytes(self, rel: str) -> bytes:
        import obstore

        if self._forked():
            with self.arrow_filesystem().open_input_stream(self._arrow_key(rel)) as fh:
                return bytes(fh.read())
        return bytes(obstore.get(self._object_store(), rel.strip("/")).bytes())

    def read_tail(self, rel: str, n: int) -> tuple[int, bytes]:
        """One GET of a suffix range (its answer carries the object's size)."""
        import obstore

        if self._forked():
            with self.arrow_filesystem().open_input_file(self._arrow_key(rel)) as fh:
                size = fh.size()
                return size, bytes(fh.read_at(min(n, size), max(0, size - n)))
        got = obstore.get(self._object_store(), rel.strip("/"), options={"range": {"suffix": n}})
        return int(got.meta["size"]), bytes(got.bytes())

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Ranges close together are fetched by one GET (obstore coalesces them)."""
        import obstore

        if not ranges:
            return []
        if self._forked():
            with self.arrow_filesystem().open_input_file(self._arrow_key(rel)) as fh:
                return [bytes(fh.read_at(end - start, start)) for start, end in ranges]
        got = obstore.get_ranges(
            self._object_store(),
            rel.strip("/"),
            starts=[start for start, _ in ranges],
            ends=[end for _, end in ranges],
        )
        return [bytes(b) for b in got]

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        import obstore

        obstore.put(self._object_store(), rel.strip("/"), data)  # a PUT is all or nothing

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist (a conditional PUT). True if this call wrote it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        try:
            obstore.put(self._object_store(), rel.strip("/"), data, mode="create")
        except AlreadyExistsError:
            return False
        return True

    def upload(self, rel: str, local: str | os.PathLike[str]) -> None:
        """Copy a finished local file to ``rel`` (multipart for big files; visible when complete)."""
        import obstore

        obstore.put(self._object_store(), rel.strip("/"), Path(local))

    def delete(self, rel: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            obstore.delete(self._object_store(), rel.strip("/"))

    def walk(self, rel: str) -> list[tuple[str, int]]:
        """Every object under ``rel`` (recursive): its path relative to the root, and its size."""
        import obstore

        key = rel.strip("/")
        return sorted(
            (meta["path"], int(meta["size"]))
            for chunk in obstore.list(self._object_store(), key or None)
            for meta in chunk
        )

    def list(self, rel: str) -> list[str]:
        import obstore

        key = rel.strip("/")
        if self._forked():
            from pyarrow.fs import FileSelector

            infos = self.arrow_filesystem().get_file_info(
                FileSelector(self._arrow_key(rel), allow_not_found=True)
            )
            return sorted(i.base_name for i in infos)
        listing = obstore.list_with_delimiter(self._object_store(), key or None)
        names = [m["path"].rsplit("/", 1)[-1] for m in listing["objects"]]
        names += [p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"]]
        return sorted(names)

    def size(self, rel: str) -> int:
        import obstore

        return int(obstore.head(self._object_store(), rel.strip("/"))["size"])

    def local_path(self, rel: str) -> Path:
        from attnstore.errors import StorageConfigError

        raise StorageConfigError(
            f"{self.root!r} is object storage: it has no local path for {rel!r}. "
            "Write the file locally and upload it (ObjectStorage.upload)."
        )

    def sync(self, rel: str) -> None:
        """Nothing to do: an acknowledged PUT is durable."""

    @contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        """A lease: the object ``rel``, created only if absent, holding who holds it.

        A holder that died is taken over (on this machine at once, elsewhere after
        :data:`LOCK_LEASE_SECONDS`) by a conditional overwrite, so only one waiter wins.
        """
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        store, key = self._object_store(), rel.strip("/")
        token = uuid.uuid4().hex
        mine = json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "expires": time.time() + LOCK_LEASE_SECONDS,
        }).encode()  # fmt: skip
        delay = 0.02
        while True:
            try:
                obstore.put(store, key, mine, mode="create")
                break
            except AlreadyExistsError:
                pass
            try:
                held = obstore.get(store, key)
                holder = parse_lock(bytes(held.bytes()))
            except FileNotFoundError:
                continue  # released between the two requests
            if holder is None or lock_is_stale(holder):
                try:
                    obstore.put(store, key, mine, mode={"e_tag": held.meta["e_tag"]})
                    break
                except (PreconditionError, FileNotFoundError):
                    continue  # another waiter took it over first
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                if (parse_lock(bytes(obstore.get(store, key).bytes())) or {}).get("token") == token:
                    obstore.delete(store, key)


def arrow_zarr_store(fs: Any, root: str) -> Any:
    """A read-only zarr store over a ``pyarrow.fs`` file system (safe in forked processes).

    A read of part of an object costs a HEAD (its size) and a ranged GET.
    """
    return _arrow_store_class()(fs, root)


@functools.cache
def _arrow_store_class() -> Any:
    import asyncio

    from pyarrow.fs import FileSelector, FileType
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    class ArrowReadStore(Store):
        supports_writes = False
        supports_deletes = False
        supports_partial_writes = False
        supports_listing = True

        def __init__(self, fs: Any, root: str) -> None:
            super().__init__(read_only=True)
            self.fs, self.root = fs, root.rstrip("/")

        def __eq__(self, other: object) -> bool:
            return isinstance(other, ArrowReadStore) and (other.fs, other.root) == (self.fs, self.root)

        def _read(self, key: str, byte_range: Any) -> bytes:
            path = f"{self.root}/{key}"
            if byte_range is None:
                with self.fs.open_input_stream(path) as fh:
                    return bytes(fh.read())
            with self.fs.open_input_file(path) as fh:
                size = fh.size()
                if isinstance(byte_range, RangeByteRequest):
                    start, end = byte_range.start, byte_range.end
                elif isinstance(byte_range, OffsetByteRequest):
                    start, end = byte_range.offset, size
                elif isinstance(byte_range, SuffixByteRequest):
                    start, end = max(0, size - byte_range.suffix), size
                else:
                    raise TypeError(f"Unexpected byte range {byte_range!r}.")
                return bytes(fh.read_at(max(0, min(end, size) - start), start))

        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            prototype = prototype or default_buffer_prototype()
            try:
                data = await asyncio.to_thread(self._read, key, byte_range)
            except FileNotFoundError:
                return None
            return prototype.buffer.from_bytes(data)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            return [await self.get(k, prototype, r) for k, r in key_ranges]

        async def exists(self, key: str) -> bool:
            info = await asyncio.to_thread(self.fs.get_file_info, f"{self.root}/{key}")
            return bool(info.type != FileType.NotFound)

        async def set(self, key: str, value: Any) -> None:
            self._check_writable()

        async def delete(self, key: str) -> None:
            self._check_writable()

        def _keys(self, prefix: str) -> list[str]:
            selector = FileSelector(self.root, recursive=True, allow_not_found=True)
            base = len(self.root) + 1
            return sorted(
                i.path[base:]
                for i in self.fs.get_file_info(selector)
                if i.type == FileType.File and i.path[base:].startswith(prefix)
            )

        async def list(self) -> Any:
            for key in await asyncio.to_thread(self._keys, ""):
                yield key

        async def list_prefix(self, prefix: str) -> Any:
            for key in await asyncio.to_thread(self._keys, prefix):
                yield key

        async def list_dir(self, prefix: str) -> Any:
            prefix = prefix.rstrip("/") + "/" if prefix else ""
            seen = sorted({k[len(prefix) :].split("/")[0] for k in self._keys(prefix)})
            for name in seen:
                yield name

    return ArrowReadStore


def parse_lock(data: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def lock_is_stale(holder: dict[str, Any]) -> bool:
    if float(holder.get("expires", 0)) < time.time():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


#: Where a store is: a folder, a URL, or an already opened :class:`Storage` (with its options).
Location: TypeAlias = "str | os.PathLike[str] | Storage"


def location_text(where: Location) -> str:
    """How ``where`` is named in reports and messages: as given, or an opened storage's root."""
    return str(where) if isinstance(where, (str, os.PathLike)) else where.root


def open_storage(root: Location, storage_options: dict[str, str] | None = None) -> Storage:
    """The storage for a store root: a local folder (or ``file://`` URL), or an object-storage URL.

    ``storage_options`` (credentials, endpoint, region, …; the keys delta-rs and obstore accept,
    such as ``AWS_ENDPOINT_URL`` or ``endpoint_url``) apply to object storage only. An opened
    :class:`Storage` is returned as it is: its options came with it.
    """
    from attnstore.errors import StorageConfigError

    if not isinstance(root, (str, os.PathLike)):
        if storage_options:
            raise StorageConfigError(
                f"{root!r} is already opened, with its own options: pass its path to apply "
                f"others ({', '.join(sorted(storage_options))})."
            )
        return root
    text = str(root)
    if is_url(text):
        return ObjectStorage(text, storage_options)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        raise StorageConfigError(
            f"Expected a folder or a URL starting with "
            f"{', '.join(s + '://' for s in (*OBJECT_SCHEMES, 'file'))}. Got {text!r}."
        )
    if storage_options:
        raise StorageConfigError(
            f"Storage options ({', '.join(sorted(storage_options))}) apply to object storage "
            f"(s3://, gs://, az://), not to the local folder {text!r}. Leave them out."
        )
    return LocalStorage(text)
