"""Two writers of one shard never store a document twice (issue 20): the lease and the claim check."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import attnstore
from attnstore.errors import ShardBusyError, StoreWriteError
from attnstore.lease import hold_shard
from attnstore.storage import open_storage
from attnstore.verify import verify_store
from tests.helpers import extract_command


def _corpus(tmp_path: Path, n: int = 16) -> Path:
    from pydoc_data.topics import topics

    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "\n".join(topics[k][:250].replace("\n", " ") for k in sorted(topics)[:n]) + "\n"
    )
    return corpus


def _counts(out: Path) -> tuple[int, int]:
    row = attnstore.open(str(out)).sql(
        "SELECT count(*) AS n, count(DISTINCT doc_id) AS d FROM docs"
    )
    r = row.to_pylist()[0]
    return r["n"], r["d"]


def test_two_concurrent_same_shard_extracts_store_each_document_once(
    tmp_path: Path, llama_dir: Path
) -> None:
    corpus = _corpus(tmp_path)
    out = tmp_path / "s.attn"
    cmd = extract_command(out, llama_dir, corpus, "--batch-size", "1", "--max-length", "48",
                          "--shard", "0/1")  # fmt: skip
    env = {**os.environ, "ATTNSTORE_COMMIT_EVERY": "1"}
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    for rc, err in results:
        # either it wrote (or found everything written), or it met the other's lease: one line
        assert rc == 0 or (rc == 1 and "is being written by" in err), err
        if rc == 1:
            assert len(err.strip().splitlines()) == 1, err
    # a rerun finishes whatever a refused writer left, and nothing is stored twice
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert _counts(out) == (16, 16)
    report = verify_store(out)
    assert report.ok, report.problems


def test_a_held_shard_stops_a_second_extract_with_one_line(tmp_path: Path, llama_dir: Path) -> None:
    corpus = _corpus(tmp_path, 6)
    out = tmp_path / "s.attn"
    cmd = extract_command(out, llama_dir, corpus, "--batch-size", "2", "--max-length", "32")
    subprocess.run([*cmd, "--limit", "2"], check=True, capture_output=True)
    with hold_shard(open_storage(out), "shard-0-of-1"):
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert f"is being written by process {os.getpid()}" in done.stderr
    assert "writers/shard-0-of-1.lease" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert _counts(out) == (2, 2)
    subprocess.run(cmd, check=True, capture_output=True)  # the lease is gone: it resumes
    assert _counts(out) == (6, 6)


def test_lease_is_exclusive_in_process(tmp_path: Path) -> None:
    from tests.synthetic import write_synthetic_store

    storage = open_storage(write_synthetic_store(tmp_path / "s.attn"))
    with (
        hold_shard(storage, "shard-1-of-2"),
        pytest.raises(ShardBusyError, match="shard-1-of-2"),
        hold_shard(storage, "shard-1-of-2"),
    ):
        pass
    with hold_shard(storage, "shard-1-of-2"):  # released on exit
        pass


def _second_batch(path: Path, app_id: str) -> attnstore.StoreWriter:
    from attnstore.store import StoreWriter

    return StoreWriter(path, attnstore.open(str(path)).manifest, app_id=app_id)


def _synthetic_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """The batch write_synthetic_store commits (doc_ids 0 and 1), captured."""
    from tests import synthetic

    committed: list[object] = []

    class Capture(synthetic.StoreWriter):  # type: ignore[misc]
        def commit(self, segment: object) -> None:
            committed.append(segment)

    monkeypatch.setattr(synthetic, "StoreWriter", Capture)
    synthetic.write_synthetic_store(tmp_path / "capture.attn", n_docs=2)
    monkeypatch.undo()
    return committed[0]


def test_claim_check_drops_documents_already_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that holds no lease (another app id: a Ray actor, another shard layout)."""
    from tests.synthetic import write_synthetic_store

    batch = _synthetic_batch(tmp_path, monkeypatch)
    out = write_synthetic_store(tmp_path / "s.attn", n_docs=2)
    writer = _second_batch(out, "another-writer")
    writer.commit(batch)  # the very same documents again
    assert _counts(out) == (2, 2)
    assert verify_store(out).ok


def test_claim_check_refuses_a_flush_that_raced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attnstore.store.writer as store_module
    from tests.synthetic import write_synthetic_store

    batch = _synthetic_batch(tmp_path, monkeypatch)
    out = write_synthetic_store(tmp_path / "s.attn", n_docs=2)
    real = store_module._committed
    calls: list[int] = []

    def late(*args: object) -> set[int]:  # the other writer commits after the first check
        calls.append(1)
        return set() if len(calls) == 1 else real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_committed", late)
    writer = _second_batch(out, "another-writer")
    with pytest.raises(StoreWriteError, match=r"committed by another writer .* refused"):
        writer.commit(batch)
    assert _counts(out) == (2, 2)


def test_lease_on_object_storage(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import obstore

    import attnstore.lease as lease_module

    storage = open_storage(f"{s3}/leased.attn")
    key = "writers/shard-0-of-2.lease"
    with hold_shard(storage, "shard-0-of-2"):
        holder = json.loads(bytes(obstore.get(storage._object_store(), key).bytes()))  # type: ignore[attr-defined]
        assert holder["pid"] == os.getpid()
        with (
            pytest.raises(ShardBusyError, match=rf"{key}: shard-0-of-2 of this store"),
            hold_shard(storage, "shard-0-of-2"),
        ):
            pass
    assert not storage.exists(key)  # released
    # a holder that stopped renewing (expired) is taken over
    stale = {"host": "elsewhere", "pid": 1, "token": "x", "expires": 0, "since": "then"}
    obstore.put(storage._object_store(), key, json.dumps(stale).encode())  # type: ignore[attr-defined]
    monkeypatch.setattr(lease_module, "LEASE_SECONDS", 0.2)  # renewals every 0.05 s
    with hold_shard(storage, "shard-0-of-2"):
        import time

        time.sleep(0.3)  # renewed meanwhile: not stale
        holder = json.loads(bytes(obstore.get(storage._object_store(), key).bytes()))  # type: ignore[attr-defined]
        assert holder["pid"] == os.getpid()
        assert holder["expires"] > time.time()
