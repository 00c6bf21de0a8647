"""A store on object storage versus a local folder, on a loopback S3 server. Prints JSON.

    python scripts/bench_remote.py [--docs 48] [--tokens 128] [--model tiny|default] [--reads 20]

Starts moto's S3 server on 127.0.0.1 (the fixture of tests/s3.py, which records every request it
answers), loads the model once, then:

- ``extract``: the same corpus (``--docs`` documents of ``pydoc_data.topics``, ``--tokens`` tokens
  at most) into a local folder and into ``s3://bench/…``, wall time each and the ratio;
- ``matrix``: ``--reads`` random ``(doc, layer, head)`` reads from a freshly opened store, each in
  a new ``Store`` (cold: the docs lookup, ``zarr.json``, the shard index, the range) and again in
  the same one (warm): HTTP requests and bytes per ``matrix()`` (all requests, and those of the
  segment alone), and time per read versus the local folder;
- ``heads``: a GROUP BY over the heads table (``SELECT layer, head, avg(induction), max(sink) …``)
  on the S3 store versus local: time (median of 5, store already open) and requests.

The loopback server has no network latency: ratios show the protocol's cost (requests, bytes,
serialisation through one Python HTTP server), not a data centre's round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3: the loopback server

from tests.s3 import LoopbackS3

GROUP_BY = "SELECT layer, head, avg(induction), max(sink) FROM heads GROUP BY layer, head"


def make_corpus(path: Path, n: int) -> None:
    from pydoc_data.topics import topics

    texts = [topics[k].replace("\n", " ") for k in sorted(topics)]
    path.write_text("\n".join(texts[i % len(texts)][:2000] for i in range(n)) + "\n")


def load(model: str, tmp: Path) -> Any:
    from attnstore.capture import load_model

    if model == "default":
        return load_model(None)
    from attnstore.testing import save_tiny_llama, save_tiny_tokenizer

    return load_model(str(save_tiny_llama(tmp / "tiny", save_tiny_tokenizer(tmp / "tok"))))


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--reads", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    server = LoopbackS3()
    os.environ.update(server.env)
    bucket = server.make_bucket("attnstore-bench")
    import attnstore

    out: dict[str, Any] = {"docs": args.docs, "max_tokens": args.tokens, "model": args.model}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        make_corpus(corpus, args.docs)
        loaded = load(args.model, tmp)
        common = {"model": loaded, "corpus": str(corpus), "max_length": args.tokens,
                  "batch_size": args.batch_size, "progress": False}  # fmt: skip
        local = str(tmp / "local.attn")
        url = f"{bucket}/bench/remote.attn"
        t_local, _ = timed(lambda: attnstore.extract(local, **common))
        server.take_requests()
        t_s3, _ = timed(lambda: attnstore.extract(url, **common))
        writes = server.take_requests()
        out["extract"] = {
            "local_s": round(t_local, 2),
            "s3_s": round(t_s3, 2),
            "ratio_s3_over_local": round(t_s3 / t_local, 2),
            "s3_requests": len(writes),
            "s3_bytes_uploaded": sum(r.bytes_in for r in writes),
        }

        # -- matrix(): requests and bytes --------------------------------------------------------
        probe = attnstore.open(local)
        stored = sorted(d for d in probe.doc_ids() if probe._lookup(d) is not None)
        layers, heads = probe.manifest["layers"], probe.manifest["heads"]
        rng = random.Random(0)
        picks = [(rng.choice(stored), rng.choice(layers), rng.choice(heads)) for _ in range(args.reads)]
        cold_req, cold_bytes, cold_seg_req, cold_seg_bytes, cold_t = [], [], [], [], []
        warm_req, warm_bytes, warm_t, local_t = [], [], [], []
        for doc, layer, head in picks:
            store = attnstore.open(url)
            server.take_requests()
            t, m = timed(lambda s=store, d=doc, la=layer, h=head: s.matrix(d, la, h))
            got = server.take_requests()
            seg = [r for r in got if "/segments/" in r.path]
            cold_t.append(t)
            cold_req.append(len(got))
            cold_bytes.append(sum(r.bytes_out for r in got))
            cold_seg_req.append(len(seg))
            cold_seg_bytes.append(sum(r.bytes_out for r in seg))
            other = heads[(heads.index(head) + 1) % len(heads)]
            t, _ = timed(lambda s=store, d=doc, la=layer, h=other: s.matrix(d, la, h))
            got = server.take_requests()
            warm_t.append(t)
            warm_req.append(len(got))
            warm_bytes.append(sum(r.bytes_out for r in got))
            t, _ = timed(lambda d=doc, la=layer, h=other: probe.matrix(d, la, h))
            local_t.append(t)
            assert m.shape == probe.matrix(doc, layer, head).shape
        seg_size = sum(
            size for _, size in attnstore.open(url).storage.walk("segments")
        )
        med = statistics.median
        out["matrix"] = {
            "reads": args.reads,
            "cold_requests_median": med(cold_req),
            "cold_bytes_median": med(cold_bytes),
            "cold_segment_requests_median": med(cold_seg_req),
            "cold_segment_bytes_median": med(cold_seg_bytes),
            "warm_requests_median": med(warm_req),
            "warm_bytes_median": med(warm_bytes),
            "segment_bytes_total": seg_size,
            "cold_ms_median": round(1000 * med(cold_t), 2),
            "warm_ms_median": round(1000 * med(warm_t), 2),
            "local_warm_ms_median": round(1000 * med(local_t), 2),
        }

        # -- heads GROUP BY ------------------------------------------------------------------------
        def group_by(path: str) -> tuple[float, int]:
            store = attnstore.open(path)
            store.sql(GROUP_BY)  # bind once
            server.take_requests()
            times = [timed(lambda: store.sql(GROUP_BY))[0] for _ in range(5)]
            return med(times), len(server.take_requests()) // 5

        t_loc, _ = group_by(local)
        t_rem, requests = group_by(url)
        out["heads_group_by"] = {
            "local_ms": round(1000 * t_loc, 2),
            "s3_ms": round(1000 * t_rem, 2),
            "ratio_s3_over_local": round(t_rem / t_loc, 2),
            "s3_requests_per_query": requests,
            "heads_rows": attnstore.open(local).sql("SELECT count(*) FROM heads").column(0)[0].as_py(),
        }
    server.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
