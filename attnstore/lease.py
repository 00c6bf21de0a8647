"""The shard lease: one live ``extract`` per shard of a store.

``extract`` holds ``writers/<app_id>.lease`` (``app_id`` is ``shard-i-of-n``) for its whole run. A
second ``extract`` of the same shard (a Slurm array resubmitted while an old task still runs) finds
the lease held and stops at once with one line naming the holder, before it loads the model or
writes anything; rerun it once the holder is gone and it resumes.

- On a local disk the lease is an exclusive ``flock`` on that file: the kernel releases it when the
  holder exits or dies, so it is never stale. The file records who holds it, for the message.
- On object storage it is an object created only if absent (a conditional PUT) holding the
  holder's host, pid, a random token and an expiry; a heartbeat renews it (a conditional PUT on
  its ETag) every :data:`LEASE_SECONDS` / 4. A lease whose holder is gone (expired, or on this
  host with its process dead) is taken over by a conditional overwrite, so one waiter wins.

The lease is the first line of defence. The second, which also covers writers that hold no lease
(Ray actors, another shard layout, a lease lost to a hung heartbeat), is the *claim check* of
every flush (:meth:`attnstore.store.StoreWriter`): documents whose ``docs`` row is already
committed are dropped before the flush writes its parts, and checked again under the shard's flush
lock right before the commit, where a flush that would commit a document twice is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from attnstore.errors import ShardBusyError
from attnstore.layout import WRITERS
from attnstore.storage import lock_is_stale, parse_lock

if TYPE_CHECKING:
    from attnstore.storage import Storage

__all__ = ["LEASE_SECONDS", "hold_shard", "lease_path"]

#: An object-storage lease not renewed for this long is taken over (its holder is presumed dead).
LEASE_SECONDS: Final = 120.0


def lease_path(app_id: str) -> str:
    return f"{WRITERS}/{app_id}.lease"


def _who() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _busy(storage: Storage, app_id: str, holder: dict[str, Any] | None) -> ShardBusyError:
    who = (
        f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
        if holder
        else "another process"
    )
    return ShardBusyError(
        f"{storage.root}/{lease_path(app_id)}: {app_id} of this store is being written by {who}. "
        "Two writers of one shard would store its documents twice: this one stops. Wait for "
        "that one to finish (or stop it), then rerun to resume."
    )


@contextmanager
def hold_shard(storage: Storage, app_id: str) -> Iterator[None]:
    """Hold the lease of ``app_id`` for the block, or raise :class:`ShardBusyError` at once."""
    from attnstore.storage import LocalStorage

    if isinstance(storage, LocalStorage):
        with _hold_local(storage, app_id):
            yield
    else:
        with _hold_object(storage, app_id):
            yield


@contextmanager
def _hold_local(storage: Any, app_id: str) -> Iterator[None]:
    import fcntl

    path = storage.path / lease_path(app_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(storage, app_id, parse_lock(os.pread(fd, 4096, 0))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_who()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _stale(holder: dict[str, Any] | None) -> bool:
    """An unreadable holder, an expired one, or a dead process of this host (the object-store
    lock's rule, :func:`attnstore.storage.lock_is_stale`)."""
    return holder is None or lock_is_stale(holder)


@contextmanager
def _hold_object(storage: Any, app_id: str) -> Iterator[None]:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    store, key = storage._object_store(), lease_path(app_id)
    token = uuid.uuid4().hex

    def mine() -> bytes:
        return json.dumps(
            {**_who(), "token": token, "expires": time.time() + LEASE_SECONDS}
        ).encode()

    try:
        etag = obstore.put(store, key, mine(), mode="create")["e_tag"]
    except AlreadyExistsError:
        held = obstore.get(store, key)
        holder = parse_lock(bytes(held.bytes()))
        if not _stale(holder):
            raise _busy(storage, app_id, holder) from None
        try:  # the holder is gone: take over, one waiter wins
            etag = obstore.put(store, key, mine(), mode={"e_tag": held.meta["e_tag"]})["e_tag"]
        except (PreconditionError, FileNotFoundError):
            raise _busy(storage, app_id, None) from None
    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(Exception):  # lost: the flush claim check still holds
                etag = obstore.put(store, key, mine(), mode={"e_tag": etag})["e_tag"]

    beat = threading.Thread(target=renew, name="attnstore-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(Exception):
            if (parse_lock(bytes(obstore.get(store, key).bytes())) or {}).get("token") == token:
                obstore.delete(store, key)
