"""Does a store's cost grow with its number of batches? One run, one machine, prints JSON.

    python scripts/bench_scale.py [--sizes 500,5000] [--tokens 20] [--out DIR]

For each size N: ``attnstore.extract`` of N short documents (``--tokens`` tokens each, from
``pydoc_data.topics``) with the tiny random Llama of ``attnstore.testing`` at ``batch_size=1``, so
N batches; then ``attnstore compact`` (retention 0: nothing else reads these stores). Reported:

- ``write_overhead_ms_per_batch``: the same N batches written again by ``StoreWriter`` alone
  (``commit`` + ``close`` at ``extract``'s cadence: segments, Parquet parts, Delta commits,
  intent files), wall time / N; ``writer_thread_ms_per_batch``: the time the writer thread spent
  in them during the extraction (it competes with the forward pass for the 2 cores);
- ``files``: files on disk after extraction and after compaction: all, table files (Parquet and
  Delta log) and segment files;
- for the compacted store, in a fresh process each (cold caches of this library, warm OS cache):
  the time of ``attnstore.open``, ``count(*)`` over heads, a GROUP BY over heads,
  ``head_summary``, the first and the next ``matrix()``, ``token_ids()``, and the reader's peak RSS
  (``VmHWM``) over all of them, each the median of 5 processes; the same before compaction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READER = r"""
import json, sys, time
t0 = time.perf_counter()
import attnstore, attnstore.query, attnstore.store, deltalake, duckdb, zarr  # once per process
t_import = time.perf_counter() - t0
path = sys.argv[1]
out = {"import_s": round(t_import, 3)}
def timed(name, fn):
    t = time.perf_counter(); value = fn(); out[name] = round(time.perf_counter() - t, 4); return value
store = timed("open", lambda: attnstore.open(path))
n = timed("count_heads", lambda: store.sql("SELECT count(*) FROM heads").column(0)[0].as_py())
timed("group_by_heads", lambda: store.sql(
    "SELECT layer, head, avg(induction), max(sink) FROM heads GROUP BY layer, head"))
timed("head_summary", lambda: store.sql("SELECT * FROM head_summary"))
last = n // 12 - 1  # 12 heads per document: the last document of the corpus
timed("first_matrix", lambda: store.matrix(last // 2, 1, 2))
timed("next_matrix", lambda: store.matrix(last, 2, 3))
timed("token_ids", lambda: store.token_ids(last // 3))
out["heads_rows"] = n
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
hwm = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
out["peak_rss_mb"] = round(int(hwm.split()[1]) / 1024, 1)
print(json.dumps(out))
"""


def corpus(path: Path, n: int) -> None:
    from pydoc_data.topics import topics

    text = " ".join(v.replace("\n", " ") for _, v in sorted(topics.items()))
    words = text.split()
    lines = [" ".join(words[(i * 7) % (len(words) - 40) :][:30]) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def count_files(root: Path) -> dict[str, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    rel = [str(p.relative_to(root)) for p in files]
    return {
        "all": len(rel),
        "tables": sum(r.startswith("tables/") for r in rel),
        "segments": sum(r.startswith("segments/") for r in rel),
    }


def read(path: Path, runs: int = 5) -> dict[str, Any]:
    """Per figure, the median of ``runs`` fresh reader processes."""
    results = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", READER, str(path)], capture_output=True, text=True, check=True
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def build(root: Path, n: int, tokens: int, model: Any) -> dict[str, Any]:
    import attnstore
    from attnstore import store as store_mod
    from attnstore.compact import compact

    text = root / f"corpus-{n}.txt"
    corpus(text, n)
    out = root / f"s{n}.attn"
    spent = {"commit": 0.0, "close": 0.0}
    real_commit, real_close = store_mod.StoreWriter.commit, store_mod.StoreWriter.close

    segments: list[Any] = []

    def commit(self: Any, segment: Any) -> None:
        segments.append(segment)  # replayed below without the model
        t = time.perf_counter()
        try:
            real_commit(self, segment)
        finally:
            spent["commit"] += time.perf_counter() - t

    def close(self: Any) -> None:
        t = time.perf_counter()
        try:
            real_close(self)
        finally:
            spent["close"] += time.perf_counter() - t

    store_mod.StoreWriter.commit, store_mod.StoreWriter.close = commit, close  # type: ignore[method-assign]
    try:
        t = time.perf_counter()
        report = attnstore.extract(
            str(out), model=model, corpus=str(text), batch_size=1, max_length=tokens,
            progress=False,
        )  # fmt: skip
        extract_s = time.perf_counter() - t
    finally:
        store_mod.StoreWriter.commit, store_mod.StoreWriter.close = real_commit, real_close  # type: ignore[method-assign]
    # The writer alone: the same batches into a fresh store, no forward pass competing for CPU.
    every, seconds = store_mod.commit_cadence()
    replay = root / f"replay-{n}.attn"
    writer = store_mod.StoreWriter(
        replay, attnstore.open(str(out)).manifest, commit_every=every, commit_seconds=seconds
    )
    t = time.perf_counter()
    for segment in segments:
        writer.commit(segment)
    writer.close()
    replay_s = time.perf_counter() - t
    before = count_files(out)
    uncompacted = read(out)
    t = time.perf_counter()
    compact(out, retention_hours=0)
    compact_s = time.perf_counter() - t
    return {
        "batches": n,
        "docs": report.docs_written,
        "flushes": report.commits,
        "extract_s": round(extract_s, 2),
        "write_overhead_ms_per_batch": round(1000 * replay_s / n, 3),
        "writer_thread_ms_per_batch": round(1000 * (spent["commit"] + spent["close"]) / n, 3),
        "compact_s": round(compact_s, 2),
        "files_before_compact": before,
        "files_after_compact": count_files(out),
        "read_before_compact": uncompacted,
        "read": read(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="500,5000")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--out", default=None, help="keep the stores here (default: temporary)")
    args = parser.parse_args()
    from attnstore.capture import load_model
    from attnstore.store import commit_cadence
    from attnstore.testing import save_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = load_model(str(save_tiny_llama(Path(tmp) / "model")), progress=False)
        results = [build(root, int(n), args.tokens, model) for n in args.sizes.split(",")]
    small, large = results[0]["read"], results[-1]["read"]
    keys = ("open", "count_heads", "group_by_heads", "head_summary", "first_matrix",
            "next_matrix", "token_ids")  # fmt: skip
    ratio = {k: round(large[k] / small[k], 2) if small[k] else None for k in keys}
    print(
        json.dumps(
            {
                "machine": f"{os.cpu_count()} cores",
                "sizes": results,
                "large_over_small": ratio,
                "commit_every_and_seconds": commit_cadence(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
