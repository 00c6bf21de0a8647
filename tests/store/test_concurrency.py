"""Many writers, readers during writes."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from deltalake import DeltaTable

import attnstore
from attnstore.verify import verify_store
from tests.helpers import assert_same_content, extract_command, store_content


def test_two_sharded_writers_and_a_reader(tmp_path: Path, llama_dir: Path) -> None:
    from pydoc_data.topics import topics

    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "\n".join(topics[k][:250].replace("\n", " ") for k in sorted(topics)[:16]) + "\n"
    )
    out = tmp_path / "shared.attn"
    base = extract_command(out, llama_dir, corpus, "--batch-size", "1", "--max-length", "48")
    env = {**os.environ, "ATTNSTORE_COMMIT_EVERY": "2"}  # several flushes per writer
    writers = [
        subprocess.Popen([*base, "--shard", f"{i}/2"], stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]

    seen: list[int] = []
    failures: list[BaseException] = []

    def read_while_writing() -> None:
        while any(w.poll() is None for w in writers):
            if not (out / "attnstore.json").exists():
                continue
            try:
                store = attnstore.open(str(out))
                n = store.sql("SELECT count(*) FROM heads").column(0)[0].as_py()
                docs = store.sql("SELECT count(*) FROM docs").column(0)[0].as_py()
                assert n == docs * 3 * 4  # never a half-committed batch
                if docs:
                    last = store.sql("SELECT max(doc_id) FROM docs").column(0)[0].as_py()
                    assert store.matrix(last, 2, 3).shape[0] > 0
                seen.append(docs)
            except BaseException as err:  # noqa: BLE001 - reported below
                failures.append(err)
                return

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    for w in writers:
        _, err = w.communicate(timeout=180)
        assert w.returncode == 0, err
    reader.join()
    assert not failures, failures
    assert seen == sorted(seen)  # the reader only ever saw the store grow

    report = verify_store(out)
    assert report.ok, report.problems
    docs = DeltaTable(str(out / "tables" / "docs"))
    # two writers, each with its own application transaction: 8 documents in 4 flushes each
    assert [docs.transaction_version(f"shard-{i}-of-2") for i in range(2)] == [4, 4]
    single = tmp_path / "single.attn"
    attnstore.extract(
        str(single),
        model=str(llama_dir),
        corpus=str(corpus),
        batch_size=1,
        max_length=48,
        progress=False,
    )
    assert_same_content(store_content(out), store_content(single))
