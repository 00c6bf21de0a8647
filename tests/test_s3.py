"""Stores at s3:// URLs, on a loopback S3 server (moto, see tests/s3.py): extraction, two writers
at once, a kill and a rerun, compact, verify, the CLI verbs, and reads equal to a local run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import attnstore
from attnstore.cli import cli
from attnstore.compact import compact
from attnstore.verify import verify_store
from tests.helpers import assert_same_content, extract_command, store_content
from tests.s3 import LoopbackS3

ARGS: dict[str, Any] = {"batch_size": 2, "max_length": 64, "progress": False}
CLI_ARGS = ("--batch-size", "2", "--max-length", "64")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    keys = sorted(topics)[:9]
    lines = [topics[k][:300].replace("\n", " ") for k in keys]
    lines.insert(4, "")  # a skipped document
    path = tmp_path_factory.mktemp("s3corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("s3local") / "local.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), **ARGS)
    return out


@pytest.fixture(scope="module")
def local_content(local: Path) -> dict[str, Any]:
    return store_content(local)


def test_extract_compact_verify_equal_to_local(
    s3: str, llama_dir: Path, corpus: Path, local_content: dict[str, Any]
) -> None:
    url = f"{s3}/runs/demo.attn"
    report = attnstore.extract(url, model=str(llama_dir), corpus=str(corpus), **ARGS)
    assert report.docs_written == len(local_content["docs"]) - 1
    assert_same_content(store_content(url), local_content)  # type: ignore[arg-type]
    checked = verify_store(url)
    assert checked.ok, checked.problems
    again = attnstore.extract(url, model=str(llama_dir), corpus=str(corpus), **ARGS)
    assert again.docs_written == 0  # a rerun finds everything committed
    done = compact(url, retention_hours=0)
    assert all(t["files_after"] <= 1 for t in done["tables"].values())
    assert_same_content(store_content(url), local_content)  # type: ignore[arg-type]
    checked = verify_store(url)
    assert checked.ok, checked.problems
    info = attnstore.open(url).info()
    assert info["docs"] == report.docs_written
    assert info["attention_bytes"] > 0


def test_two_concurrent_writers(
    s3: str, llama_dir: Path, corpus: Path, local_content: dict[str, Any]
) -> None:
    url = f"{s3}/two.attn"
    procs = [
        subprocess.Popen(
            extract_command(url, llama_dir, corpus, *CLI_ARGS, "--shard", f"{i}/2"),  # type: ignore[arg-type]
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    checked = verify_store(url)
    assert checked.ok, checked.problems
    assert_same_content(store_content(url), local_content)  # type: ignore[arg-type]


def test_kill_and_rerun(
    s3: str, llama_dir: Path, corpus: Path, local_content: dict[str, Any]
) -> None:
    url = f"{s3}/killed.attn"
    env = {**os.environ, "ATTNSTORE_CRASH_AT": "commit:heads:2", "ATTNSTORE_COMMIT_EVERY": "1"}
    proc = subprocess.run(
        extract_command(url, llama_dir, corpus, *CLI_ARGS),  # type: ignore[arg-type]
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    half = attnstore.open(url)  # one flush is visible, the interrupted one is not
    heads = half.sql("SELECT count(*) FROM heads").column(0)[0].as_py()
    stored = half.sql("SELECT count(*) FROM docs WHERE skipped IS NULL").column(0)[0].as_py()
    assert heads == stored * 3 * 4
    assert verify_store(url).ok
    attnstore.extract(url, model=str(llama_dir), corpus=str(corpus), **ARGS)
    checked = verify_store(url)
    assert checked.ok, checked.problems
    assert_same_content(store_content(url), local_content)  # type: ignore[arg-type]


def test_cli_verbs_on_s3_answer_as_on_local(
    s3: str, llama_dir: Path, corpus: Path, local: Path, tmp_path: Path
) -> None:
    url = f"{s3}/cli.attn"
    runner = CliRunner()
    done = runner.invoke(
        cli, ["extract", "--out", url, "-m", str(llama_dir), "-c", str(corpus), "-q", *CLI_ARGS]
    )
    assert done.exit_code == 0, done.output
    sql = "SELECT layer, head, round(avg(induction), 6) AS ind FROM heads GROUP BY ALL ORDER BY ALL"
    for args in (["query", "{}", sql, "--format", "json"], ["heads", "{}", "--format", "json"]):
        here = runner.invoke(cli, [a.format(local) for a in args])
        there = runner.invoke(cli, [a.format(url) for a in args])
        assert here.exit_code == 0, here.output
        assert there.exit_code == 0, there.output
        assert json.loads(there.output) == json.loads(here.output)
    info = runner.invoke(cli, ["info", url, "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["path"] == url
    for args in (["verify", url], ["compact", url]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    npz = tmp_path / "sel.npz"
    result = runner.invoke(cli, ["export", url, "--where", "layer = 0", "-o", str(npz)])
    assert result.exit_code == 0, result.output
    png = tmp_path / "m.png"
    result = runner.invoke(
        cli, ["plot", "matrix", url, "--doc", "0", "--layer", "0", "--head", "0", "-o", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0


def test_storage_option_instead_of_environment(
    s3: str,
    s3_server: LoopbackS3,
    local: Path,
    llama_dir: Path,
    corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"{s3}/opt.attn"
    manifest = attnstore.open(str(local)).manifest
    from attnstore.store import StoreWriter

    StoreWriter(url, manifest).close()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    runner = CliRunner()
    lost = runner.invoke(cli, ["info", url])  # without the endpoint: real AWS, unreachable here
    assert lost.exit_code == 1
    assert "\n" not in lost.output.strip()
    got = runner.invoke(
        cli, ["info", url, "--json", "--storage-option", f"AWS_ENDPOINT_URL={s3_server.endpoint}"]
    )
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["docs"] == 0
    store = attnstore.open(url, storage_options={"endpoint_url": s3_server.endpoint})
    assert store.doc_ids() == set()
    bad = runner.invoke(cli, ["info", url, "--storage-option", "no-equals-sign"])
    assert bad.exit_code == 2
    assert "KEY=VALUE" in bad.output
    # the Python API: extract, verify and compact into a store the environment does not reach
    options = {"endpoint_url": s3_server.endpoint}
    other = f"{s3}/python.attn"
    report = attnstore.extract(
        other, model=str(llama_dir), corpus=str(corpus), storage_options=options, **ARGS
    )
    assert report.docs_written > 0
    assert verify_store(other, storage_options=options).ok
    assert compact(other, retention_hours=0, storage_options=options)["tables"]
    there = attnstore.open(other, storage_options=options)
    assert len(there.doc_ids()) == report.docs_written + 1  # and the skipped one


def test_materialize_from_an_s3_census(
    s3: str, llama_dir: Path, corpus: Path, local: Path
) -> None:
    from attnstore.materialize import materialize

    census, out = f"{s3}/census.attn", f"{s3}/induction.attn"
    attnstore.extract(census, model=str(llama_dir), corpus=str(corpus), scores_only=True, **ARGS)
    report = materialize(census, "layer = 1 AND head = 2", out, model=str(llama_dir))
    assert report["docs_written"] == report["docs"] > 0
    assert verify_store(out).ok
    here, there = attnstore.open(str(local)), attnstore.open(out)
    for doc_id in sorted(there.doc_ids())[:3]:
        np.testing.assert_allclose(
            there.matrix(doc_id, 1, 2), here.matrix(doc_id, 1, 2), atol=2e-5
        )


def test_matrix_reads_fetch_only_byte_ranges(s3: str, s3_server: LoopbackS3, local: Path) -> None:
    """State what one matrix() costs: the segment part is zarr.json, the shard index and one range."""
    url = f"{s3}/reads.attn"
    _copy_store(local, url)
    store = attnstore.open(url)
    ids = sorted(d for d in store.doc_ids() if store._lookup(d) is not None)
    here = attnstore.open(str(local))
    s3_server.take_requests()
    m = store.matrix(ids[0], 1, 2)
    first = s3_server.take_requests()
    np.testing.assert_array_equal(m, here.matrix(ids[0], 1, 2))
    segment = [r for r in first if "/segments/" in r.path]
    assert [r.method for r in segment] == ["GET"] * 3, segment
    assert segment[0].path.endswith("/zarr.json")
    assert all(r.range for r in segment[1:])
    m = store.matrix(ids[0], 2, 3)  # same document: its location and array are cached
    again = s3_server.take_requests()
    np.testing.assert_array_equal(m, here.matrix(ids[0], 2, 3))
    assert len(again) <= 2, again  # shard index + one range
    assert all(r.range for r in again)


def test_dataset_reads_s3(s3: str, local: Path) -> None:
    import torch.utils.data

    from attnstore.dataset import AttentionDataset

    url = f"{s3}/ds.attn"
    _copy_store(local, url)
    there = AttentionDataset(url, "layer = 1")
    here = AttentionDataset(str(local), "layer = 1")
    assert len(there) == len(here) > 0
    for i in (0, len(here) - 1):
        np.testing.assert_array_equal(there[i]["matrix"].numpy(), here[i]["matrix"].numpy())
    for context in ("spawn", "fork"):  # forked workers read through pyarrow (obstore cannot fork)
        loader = torch.utils.data.DataLoader(
            there, batch_size=None, num_workers=1, multiprocessing_context=context
        )
        first = next(iter(loader))
        np.testing.assert_array_equal(first["matrix"].numpy(), here[0]["matrix"].numpy())


def test_fresh_store_created_by_many_writers_at_once(s3: str, local: Path, tmp_path: Path) -> None:
    """Writers racing to create one store all succeed and share one manifest (created_at too)."""
    base = dict(attnstore.open(str(local)).manifest)
    for where in (f"{s3}/race.attn", str(tmp_path / "race.attn")):
        manifests, errors = _race_to_create(where, base, writers=5)
        assert not errors, errors
        assert len({m["created_at"] for m in manifests}) == 1
        assert attnstore.open(where).manifest == manifests[0]


def _race_to_create(
    where: str, base: dict[str, Any], writers: int
) -> tuple[list[Any], list[Exception]]:
    from attnstore.store import StoreWriter

    manifests: list[Any] = []
    errors: list[Exception] = []
    start = threading.Barrier(writers)

    def open_writer(i: int) -> None:
        start.wait()
        try:
            manifest = {**base, "created_at": f"2026-01-01T00:00:0{i}+00:00"}
            writer = StoreWriter(where, manifest)  # type: ignore[arg-type]
            manifests.append(writer.manifest)
            writer.close()
        except Exception as err:  # noqa: BLE001  (asserted empty by the caller)
            errors.append(err)

    threads = [threading.Thread(target=open_writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return manifests, errors


def _copy_store(local: Path, url: str) -> None:
    """Upload a local store's files as they are (a store is position-independent)."""
    from attnstore.storage import ObjectStorage

    storage = ObjectStorage(url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            storage.upload(f.relative_to(local).as_posix(), f)
