"""Extraction speed versus the forward pass, and storage size/error/speed versus dense float32 and an
h5py baseline. One run, one machine, every ratio measured side by side; never a timed assertion.

    python scripts/bench_extract.py --limit 16 --max-length 256 --batch-size 4

Measures, on the same documents and batches:
- bare forward pass (sdpa, no attention returned), forward with ``output_attentions=True`` (eager),
  and ``attnstore.extract`` (capture + scores + codec + compression + writes, default codec);
- for each codec preset: bytes of the committed segments versus dense float32 ``.npy`` squares,
  max absolute error against the float32 probabilities, and write time (``StoreWriter.commit``);
- an h5py baseline at equal error (the same uint16 fixed point, dense ``[layer, head, T, T]`` per
  document, chunked per matrix, gzip level 4): bytes and write time.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attnstore
from attnstore.capture import Extractor, load_model
from attnstore.codecs import get_codec
from attnstore.corpus import read_corpus
from attnstore.packing import unpack_tril
from attnstore.store import Segment, Store, StoreWriter
from attnstore.testing import pad_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--corpus", default="pydoc:topics")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu", progress=False)
    ex = Extractor(loaded, get_codec("default"), args.max_length)
    docs = [ex.tokenize(d) for d in read_corpus(args.corpus) if d.text.strip()][: args.limit]
    docs.sort(key=lambda t: len(t.ids))
    batches = [docs[i : i + args.batch_size] for i in range(0, len(docs), args.batch_size)]
    tokens = sum(len(t.ids) for t in docs)

    def inputs(batch: list) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([d.ids for d in batch], loaded.tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False}

    def forward(impl: str, **kw: object) -> float:
        loaded.model.set_attn_implementation(impl)
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                loaded.model(**inputs(b), **kw)
        return time.perf_counter() - start

    forward("sdpa")  # warm-up
    bare = forward("sdpa")
    eager = forward("eager", output_attentions=True)
    loaded.model.set_attn_implementation("attnstore")

    tmp = Path(tempfile.mkdtemp())
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.doc.text}) + "\n" for d in docs))

    def run(codec: str, name: str) -> tuple[float, Path]:
        out = tmp / name
        start = time.perf_counter()
        attnstore.extract(str(out), model=loaded, corpus=str(corpus), max_length=args.max_length,
                          batch_size=args.batch_size, codec=codec, progress=False)  # fmt: skip
        return time.perf_counter() - start, out

    extract_s, default_path = run("default", "default.attn")
    _, f32_path = run("lossless", "f32.attn")  # reference probabilities for the codec table
    ref = Store(f32_path)
    doc_ids = ref.sql("SELECT doc_id FROM docs ORDER BY doc_id").column(0).to_pylist()
    ref_codes = []
    for d in doc_ids:
        loc = ref._location(d)
        n = loc.n_tokens
        ref_codes.append(
            (
                d,
                n,
                np.asarray(
                    ref._array(loc.segment)[:, :, loc.offset : loc.offset + n * (n + 1) // 2]
                ),
            )
        )
    dense_bytes = sum(c.shape[0] * c.shape[1] * n * n * 4 for _, n, c in ref_codes)

    codecs: dict[str, dict[str, float]] = {}
    for preset in ("default", "compact", "lossless"):
        codec = get_codec(preset)
        path = tmp / f"c-{preset}.attn"
        manifest = dict(ref.manifest)
        manifest["codec"] = codec.get_config()
        writer = StoreWriter(path, manifest)  # type: ignore[arg-type]
        encoded = [codec.encode(c) for _, _, c in ref_codes]
        err = max(
            float(np.abs(codec.decode(e).astype(np.float64) - c).max())
            for e, (_, _, c) in zip(encoded, ref_codes, strict=True)
        )
        start = time.perf_counter()
        for first in range(0, len(encoded), args.batch_size):
            part = list(range(first, min(first + args.batch_size, len(encoded))))
            ids = [ref_codes[i][0] for i in part]
            docs_cols = (
                ref.table("docs")
                .filter(np.isin(ref.table("docs")["doc_id"].to_numpy(), ids))
                .to_pydict()
            )
            docs_cols = {k: v for k, v in docs_cols.items() if k not in ("segment", "offset")}
            order = np.argsort(docs_cols["doc_id"])
            docs_cols = {k: [v[i] for i in order] for k, v in docs_cols.items()}
            writer.commit(Segment(docs=docs_cols, tokens={"doc_id": np.zeros(0), "pos": np.zeros(0), "token_id": np.zeros(0), "token": []},
                                  heads={k: np.zeros(0) for k in ("doc_id", "layer", "head", "kv_head", "n_tokens", "n_queries", "n_duplicate", "n_induction")}
                                  | {k: np.zeros(0) for k in ("prev_token", "sink", "self", "duplicate", "induction", "entropy", "max_weight", "mean_distance")},
                                  codes=[encoded[i] for i in sorted(part, key=lambda i: ref_codes[i][0])]))  # fmt: skip
        write_s = time.perf_counter() - start
        size = Store(path).info()["attention_bytes"]
        codecs[preset] = {"bytes": size, "dense_float32_over_bytes": round(dense_bytes / size, 2),
                          "max_abs_error": err, "stated_bound": codec.max_abs_error, "write_s": round(write_s, 2)}  # fmt: skip

    # h5py baseline at the default codec's error: dense uint16 squares, chunked per matrix, gzip 4
    import h5py

    codec = get_codec("default")
    start = time.perf_counter()
    with h5py.File(tmp / "baseline.h5", "w") as f:
        for d, n, c in ref_codes:
            square = unpack_tril(codec.encode(c), n)
            f.create_dataset(
                f"doc{d}", data=square, chunks=(1, 1, n, n), compression="gzip", compression_opts=4
            )
    h5_s = time.perf_counter() - start
    h5_bytes = (tmp / "baseline.h5").stat().st_size
    default_info = attnstore.open(str(default_path)).info()
    shutil.rmtree(tmp)
    result = {
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
        "model": loaded.info["id"], "docs": len(docs), "tokens": tokens,
        "max_length": args.max_length, "batch_size": args.batch_size,
        "bare_forward_s": round(bare, 2), "eager_output_attentions_s": round(eager, 2),
        "extract_s": round(extract_s, 2),
        "extract_over_bare": round(extract_s / bare, 2),
        "extract_over_eager_output_attentions": round(extract_s / eager, 2),
        "extract_default_ratio_vs_dense_float32": default_info["ratio_vs_dense_float32"],
        "codecs": codecs,
        "h5py_gzip_uint16": {"bytes": h5_bytes, "write_s": round(h5_s, 2),
                             "bytes_over_attnstore_default": round(h5_bytes / codecs["default"]["bytes"], 2),
                             "write_time_over_attnstore_default": round(h5_s / codecs["default"]["write_s"], 2)},
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
