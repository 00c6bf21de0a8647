"""Kill ``attnstore extract`` (SIGKILL, in a subprocess) at every point of the flush protocol and at
random times; what survives is consistent (readers never see half a flush) and rerunning the same
command must end with a store equal to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import attnstore
from attnstore.store import FAULT_POINTS
from attnstore.verify import verify_store
from tests.helpers import assert_same_content, extract_command, store_content


@pytest.fixture(scope="module")
def crash_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    keys = sorted(topics)[:10]
    lines = [topics[k][:300].replace("\n", " ") for k in keys]
    lines.insert(3, "")  # a skipped document rides along in some commit
    path = tmp_path_factory.mktemp("crash") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def clean(
    crash_corpus: Path, llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    out = tmp_path_factory.mktemp("clean") / "clean.attn"
    extract_here(out, llama_dir, crash_corpus)
    return store_content(out)


def extract_here(out: Path, llama_dir: Path, corpus: Path) -> None:
    """The uninterrupted in-process run, with the same settings as :func:`command`."""
    attnstore.extract(
        str(out), model=str(llama_dir), corpus=str(corpus), batch_size=2, max_length=64,
        progress=False,
    )  # fmt: skip


def command(out: Path, llama_dir: Path, corpus: Path) -> list[str]:
    return extract_command(out, llama_dir, corpus, "--batch-size", "2", "--max-length", "64")


def visible_flushes(out: Path) -> int:
    """Flushes the docs table shows (what resume reads), from the Delta log itself."""
    from deltalake import DeltaTable

    if not (out / "tables" / "docs" / "_delta_log").is_dir():
        return 0
    return DeltaTable(str(out / "tables" / "docs")).transaction_version("shard-0-of-1") or 0


def finish_and_compare(out: Path, llama_dir: Path, corpus: Path, clean: dict[str, object]) -> None:
    if out.exists() and (out / "attnstore.json").exists():
        before = attnstore.open(str(out))
        assert verify_store(out).ok  # what survived the crash is consistent
        stored = before.sql("SELECT count(*) FROM docs WHERE skipped IS NULL").column(0)[0]
        tokens = before.sql("SELECT count(*) FROM tokens").column(0)[0]
        n_tokens = before.sql("SELECT coalesce(sum(n_tokens), 0) FROM docs").column(0)[0]
        heads = before.sql("SELECT count(*) FROM heads").column(0)[0]
        assert heads.as_py() == stored.as_py() * 3 * 4  # no half flush is visible
        assert tokens.as_py() == n_tokens.as_py()
        del before
    extract_here(out, llama_dir, corpus)
    report = verify_store(out)
    assert report.ok, report.problems
    assert_same_content(store_content(out), clean)  # type: ignore[arg-type]


@pytest.mark.slow  # a fresh extract process (torch import) per case, then a rerun
@pytest.mark.parametrize("point", FAULT_POINTS)
@pytest.mark.parametrize("nth", [1, 3])
def test_kill_at_commit_points(
    point: str,
    nth: int,
    tmp_path: Path,
    llama_dir: Path,
    crash_corpus: Path,
    clean: dict[str, object],
) -> None:
    out = tmp_path / "s.attn"
    env = {**os.environ, "ATTNSTORE_CRASH_AT": f"{point}:{nth}", "ATTNSTORE_COMMIT_EVERY": "1"}
    proc = subprocess.run(
        command(out, llama_dir, crash_corpus),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert visible_flushes(out) == nth - 1 + (point in ("commit:docs", "committed"))
    finish_and_compare(out, llama_dir, crash_corpus, clean)


@pytest.mark.slow  # a fresh extract process (torch import) per case, then a rerun
@pytest.mark.parametrize("seed", range(4))
def test_kill_at_random_times(
    seed: int, tmp_path: Path, llama_dir: Path, crash_corpus: Path, clean: dict[str, object]
) -> None:
    out = tmp_path / "s.attn"
    proc = subprocess.Popen(
        command(out, llama_dir, crash_corpus),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ATTNSTORE_COMMIT_EVERY": "2"},
    )
    # interpreter start + imports take ~3 s here; the extraction itself well under a second
    time.sleep(random.Random(seed).uniform(2.5, 5.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish_and_compare(out, llama_dir, crash_corpus, clean)
