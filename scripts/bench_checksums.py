"""What verifying Parquet page checksums on read costs (synthetic data, real code paths). One run.

    python scripts/bench_checksums.py [--rows 2000000] [--repeat 5]

Writes a scores-only store whose ``heads`` table has ``--rows`` rows through StoreWriter (every
part carries page checksums), then scans the whole table (every column) through the store's lazy
dataset, as ``Store.sql`` and the viewer do, with page checksum verification on (what readers do
now) and off (what they did before), alternating, and reports the median of ``--repeat`` scans
each and their ratio. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_query import heads_store

import attnstore


def scan(store: attnstore.Store, verify: bool) -> float:
    ds = store.dataset("heads")
    fmt = pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(
            page_checksum_verification=verify
        )
    )
    fragments = [
        fmt.make_fragment(f.path, filesystem=store.storage.arrow_filesystem())
        for f in store._files["heads"]
    ]
    ds = pads.FileSystemDataset(fragments, ds.schema, fmt, store.storage.arrow_filesystem())
    start = time.perf_counter()
    ds.to_table()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="attnstore-bench-") as tmp:
        path = Path(tmp) / "heads.attn"
        heads_store(path, args.rows, np.random.default_rng(0))
        store = attnstore.open(str(path))
        size = sum(Path(f.path).stat().st_size for f in store._files["heads"])
        scan(store, True)  # warm the page cache
        on, off = [], []
        for _ in range(args.repeat):
            on.append(scan(store, True))
            off.append(scan(store, False))
        with_checks, without = statistics.median(on), statistics.median(off)
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "parquet_bytes": size,
                    "scan_s_checksums_verified": round(with_checks, 4),
                    "scan_s_not_verified": round(without, 4),
                    "ratio": round(with_checks / without, 3),
                    "verified_mb_per_s": round(size / with_checks / 1e6, 1),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
