"""ObjectStorage (a store under s3://…) against a loopback S3 server: small files, conditional
creates, leases, listings, and the clients it configures (zarr, delta-rs, pyarrow)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnstore.errors import StorageConfigError
from attnstore.storage import LocalStorage, ObjectStorage, is_url, open_storage
from tests.s3 import LoopbackS3


def test_small_files_round_trip(s3: str) -> None:
    storage = open_storage(f"{s3}/runs/demo.attn")
    assert isinstance(storage, ObjectStorage)
    assert not storage.exists("manifest.json")
    storage.write_bytes_atomic("manifest.json", b'{"a": 1}\n')
    storage.write_bytes_atomic("writers/shard-0-of-2.json", b"{}")
    storage.write_bytes_atomic("writers/shard-1-of-2.json", b"{}")
    storage.write_bytes_atomic("segments/w/00000/000000001/zarr.json", b"{}")
    assert storage.exists("manifest.json")
    assert storage.exists("segments")  # a "folder": some object below it
    assert storage.read_bytes("manifest.json") == b'{"a": 1}\n'
    assert storage.size("manifest.json") == 9
    assert storage.list("") == ["manifest.json", "segments", "writers"]
    assert storage.list("writers") == ["shard-0-of-2.json", "shard-1-of-2.json"]
    assert storage.list("nothing-here") == []
    assert storage.walk("segments") == [("segments/w/00000/000000001/zarr.json", 2)]
    storage.write_bytes_atomic("manifest.json", b"{}")  # overwrite
    assert storage.read_bytes("manifest.json") == b"{}"
    storage.delete("manifest.json")
    storage.delete("manifest.json")  # deleting what is gone is no error
    assert not storage.exists("manifest.json")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("manifest.json")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=30).filter(
        lambda n: n not in (".", "..")
    ),
    data=st.binary(max_size=2000),
)
def test_bytes_round_trip_property(s3: str, name: str, data: bytes) -> None:
    storage = open_storage(f"{s3}/prop")
    storage.write_bytes_atomic(f"dir/{name}", data)
    assert storage.read_bytes(f"dir/{name}") == data
    assert name in storage.list("dir")
    assert storage.size(f"dir/{name}") == len(data)


def test_create_bytes_is_create_if_absent(s3: str) -> None:
    storage = ObjectStorage(f"{s3}/x.attn")
    assert storage.create_bytes("manifest.json", b"first")
    assert not storage.create_bytes("manifest.json", b"second")
    assert storage.read_bytes("manifest.json") == b"first"
    # many racers: exactly one wins and its content is what everyone reads
    wins: list[int] = []

    def race(i: int) -> None:
        if ObjectStorage(f"{s3}/x.attn").create_bytes("race.json", str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert storage.read_bytes("race.json") == str(wins[0]).encode()


def test_lock_excludes_threads(s3: str) -> None:
    storage = ObjectStorage(f"{s3}/lock.attn")
    storage.write_bytes_atomic("count", b"0")
    inside: list[int] = []

    def work() -> None:
        for _ in range(4):
            with storage.lock("writers/a.lock"):
                inside.append(1)
                assert len(inside) == 1, "two holders at once"
                n = int(storage.read_bytes("count"))
                time.sleep(0.005)
                storage.write_bytes_atomic("count", str(n + 1).encode())
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(storage.read_bytes("count")) == 12  # no lost update
    assert not storage.exists("writers/a.lock")  # released


def test_lock_waits_for_a_live_holder_elsewhere(s3: str) -> None:
    storage = ObjectStorage(f"{s3}/lock.attn")
    holder = {"host": "another-machine", "pid": 1, "token": "t", "expires": time.time() + 60}
    storage.write_bytes_atomic("writers/a.lock", json.dumps(holder).encode())
    got = threading.Event()

    def take() -> None:
        with storage.lock("writers/a.lock"):
            got.set()

    t = threading.Thread(target=take)
    t.start()
    assert not got.wait(0.5)  # the lease is valid: wait
    storage.delete("writers/a.lock")  # the holder releases
    assert got.wait(10)
    t.join()


def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the lock's wait loop fail if it sleeps at all: "taken over at once" without a clock."""
    import types

    import attnstore.storage as storage_module

    def sleep(seconds: float) -> None:
        raise AssertionError(f"the lock waited ({seconds} s) instead of taking the lease over")

    monkeypatch.setattr(storage_module, "time", types.SimpleNamespace(time=time.time, sleep=sleep))


def test_lock_takes_over_an_expired_lease(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = ObjectStorage(f"{s3}/lock.attn")
    holder = {"host": "another-machine", "pid": 1, "token": "t", "expires": time.time() - 1}
    storage.write_bytes_atomic("writers/a.lock", json.dumps(holder).encode())
    _no_waiting(monkeypatch)
    with storage.lock("writers/a.lock"):
        held = json.loads(storage.read_bytes("writers/a.lock"))
        assert held["host"] == socket.gethostname()
        assert held["pid"] == os.getpid()


def test_lock_of_a_killed_process_is_taken_over_at_once(
    s3: str, s3_server: LoopbackS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = (
        "import os, signal, sys\n"
        "from attnstore.storage import ObjectStorage\n"
        "s = ObjectStorage(sys.argv[1])\n"
        "cm = s.lock('writers/a.lock'); cm.__enter__()\n"
        "print('held', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, f"{s3}/lock.attn"],
        check=False,
        env={**os.environ, **s3_server.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    assert "held" in proc.stdout
    storage = ObjectStorage(f"{s3}/lock.attn")
    assert storage.exists("writers/a.lock")  # left behind by the dead holder
    _no_waiting(monkeypatch)  # not the 10-minute lease: no wait at all
    with storage.lock("writers/a.lock"):
        pass


def test_zarr_read_fetches_only_the_needed_ranges(s3: str, s3_server: LoopbackS3) -> None:
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    storage = ObjectStorage(f"{s3}/z.attn")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 2**16, size=(4, 3, 1 << 18), dtype=np.uint16)
    arr = zarr.create_array(
        store=storage.zarr_store("segments/a", read_only=False),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(1, 1, 1 << 16),
        shards=data.shape,
        compressors=[BloscCodec(cname="zstd", clevel=1), Crc32cCodec()],
        zarr_format=3,
    )
    arr[...] = data
    shard_bytes = dict(storage.walk("segments/a"))["segments/a/c/0/0/0"]
    s3_server.take_requests()
    again = zarr.open_array(
        store=ObjectStorage(f"{s3}/z.attn").zarr_store("segments/a", read_only=True),
        mode="r",
        zarr_format=3,
    )
    got = again[2, 1, 70_000:80_000]
    np.testing.assert_array_equal(got, data[2, 1, 70_000:80_000])
    requests = s3_server.take_requests()
    assert [r.method for r in requests] == ["GET"] * 3, requests
    assert requests[0].path.endswith("/segments/a/zarr.json")
    assert all(r.range for r in requests[1:])  # the shard index, then one chunk
    assert sum(r.bytes_out for r in requests[1:]) < shard_bytes / 10


def test_delta_and_pyarrow_clients(s3: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable, write_deltalake

    storage = ObjectStorage(f"{s3}/d.attn")
    table = pa.table({"doc_id": pa.array([0, 1, 2], pa.int64()), "x": [1.0, 2.0, 3.0]})
    uri = storage.table_uri("tables/docs")
    write_deltalake(uri, table, storage_options=storage.storage_options)
    dt = DeltaTable(uri, storage_options=storage.storage_options)
    assert dt.version() == 0
    files = [storage.arrow_path(u) for u in dt.file_uris()]
    assert all(f.startswith(f"{storage.bucket}/d.attn/tables/docs/") for f in files)
    fs = storage.arrow_filesystem()
    assert pq.read_table(files[0], filesystem=fs).equals(table)


def test_upload_a_local_file(s3: str, tmp_path: Path) -> None:
    storage = ObjectStorage(f"{s3}/u.attn")
    local = tmp_path / "part.parquet"
    local.write_bytes(os.urandom(100_000))
    storage.upload("tables/docs/part.parquet", local)
    assert storage.read_bytes("tables/docs/part.parquet") == local.read_bytes()


def _child_reads(storage: ObjectStorage) -> tuple[bytes, bool, list[str], list[int]]:
    import zarr

    arr = zarr.open_array(store=storage.zarr_store("arr", read_only=True), mode="r", zarr_format=3)
    return storage.read_bytes("k"), storage.exists("arr"), storage.list(""), arr[1, 3:6].tolist()


def test_pickles_to_spawned_workers_and_reads_in_forked_ones(s3: str) -> None:
    import zarr

    storage = ObjectStorage(f"{s3}/p.attn")
    storage.write_bytes_atomic("k", b"v")
    arr = zarr.create_array(
        store=storage.zarr_store("arr", read_only=False), shape=(2, 10), dtype="uint16",
        chunks=(1, 4), shards=(2, 8), zarr_format=3,
    )  # fmt: skip
    arr[...] = np.arange(20).reshape(2, 10)
    expected = (b"v", True, ["arr", "k"], [13, 14, 15])
    assert _child_reads(storage) == expected
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.read_bytes("k") == b"v"
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_child_reads, (storage,)) == expected
    # obstore's runtime does not survive a fork: reads go through pyarrow, writes refuse clearly
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_child_reads, (storage,)) == expected
        with pytest.raises(StorageConfigError, match="spawn"):
            pool.apply(storage.write_bytes_atomic, ("k", b"w"))


def test_options_come_from_the_environment_and_are_overridden(
    s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = ObjectStorage(f"{s3}/o.attn")
    options = storage.storage_options or {}
    assert options["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert options["allow_http"] == "true"  # an http:// endpoint is a loopback or private S3
    off = ObjectStorage(f"{s3}/o.attn", {"aws_allow_http": "false", "AWS_REGION": "eu-west-1"})
    assert (off.storage_options or {})["AWS_REGION"] == "eu-west-1"
    assert "allow_http" not in (off.storage_options or {})
    with pytest.raises(Exception, match=r"(?i)http"):  # the client refuses plain HTTP
        off.read_bytes("anything")


def test_open_storage_dispatches_on_the_scheme(tmp_path: Path, s3: str) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(f"file://{tmp_path}").root == str(tmp_path)
    assert isinstance(open_storage(f"{s3}/a/b.attn"), ObjectStorage)
    assert open_storage(f"{s3}/a/b.attn/").root == f"{s3}/a/b.attn"
    assert all(is_url(u) for u in ("s3://b/x", "GS://b/x", "az://c/x", "gs://b"))
    assert not any(is_url(u) for u in (tmp_path, "file:///x", "s3:/x", "x.attn"))
    with pytest.raises(StorageConfigError, match="Expected a folder or a URL"):
        open_storage("ftp://host/x.attn")
    with pytest.raises(StorageConfigError, match="apply to object storage"):
        open_storage(tmp_path, {"AWS_REGION": "us-east-1"})
    with pytest.raises(StorageConfigError, match="Expected a bucket"):
        open_storage("s3:///x.attn")


def test_an_opened_storage_is_passed_down_as_it_is(tmp_path: Path) -> None:
    local = open_storage(tmp_path / "s.attn")
    assert open_storage(local) is local
    with pytest.raises(StorageConfigError, match="already opened"):
        open_storage(local, {"AWS_REGION": "eu-west-1"})


def test_cli_storage_options_belong_to_one_invocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """--storage-option reaches the stores of its own command and no later one (no global)."""
    from click.testing import CliRunner

    import attnstore.storage
    from attnstore.cli import cli

    seen: list[dict[str, str] | None] = []

    class Recorded:
        def __init__(self, url: str, options: dict[str, str] | None = None) -> None:
            seen.append(options)
            raise StorageConfigError(f"recorded {url}")

    monkeypatch.setattr(attnstore.storage, "ObjectStorage", Recorded)
    runner = CliRunner()
    url = "s3://bucket/x.attn"
    first = runner.invoke(cli, ["info", url, "--storage-option", "AWS_REGION=eu-west-1"])
    second = runner.invoke(cli, ["info", url])
    assert "recorded s3://bucket/x.attn" in first.output
    assert second.exit_code == first.exit_code == 1
    assert seen == [{"AWS_REGION": "eu-west-1"}, None]
