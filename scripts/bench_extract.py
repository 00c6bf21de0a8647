"""Extraction time versus a bare forward pass on the same documents, and store size versus dense float32.

One run, one machine, ratios measured side by side (no timed assertions anywhere). Example:

    python scripts/bench_extract.py --limit 16 --max-length 256 --batch-size 4

Prints JSON: bare forward (sdpa, no attention), forward with output_attentions=True (eager), attnstore
extraction (capture + scores + codec + write), their ratios, and bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import attnstore
from attnstore.capture import Extractor, load_model
from attnstore.codecs import get_codec
from attnstore.corpus import read_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--corpus", default="pydoc:topics")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--codec", default="default")
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu", progress=False)
    ex = Extractor(loaded, get_codec(args.codec), args.max_length)
    docs = [ex.tokenize(d) for d in read_corpus(args.corpus) if d.text.strip()][: args.limit]
    docs.sort(key=lambda t: len(t.ids))
    batches = [docs[i : i + args.batch_size] for i in range(0, len(docs), args.batch_size)]
    tokens = sum(len(t.ids) for t in docs)

    def inputs(batch: list) -> dict[str, torch.Tensor]:
        t = max(len(d.ids) for d in batch)
        ids = torch.full((len(batch), t), loaded.tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for i, d in enumerate(batch):
            ids[i, : len(d.ids)] = torch.tensor(d.ids)
            mask[i, : len(d.ids)] = 1
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
    out = tmp / "bench.attn"
    start = time.perf_counter()
    attnstore.extract(
        str(out),
        model=loaded,
        corpus=str(corpus),
        max_length=args.max_length,
        batch_size=args.batch_size,
        codec=args.codec,
        progress=False,
    )
    extract_s = time.perf_counter() - start
    info = attnstore.open(str(out)).info()
    shutil.rmtree(tmp)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model": loaded.info["id"],
        "docs": len(docs),
        "tokens": tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "codec": args.codec,
        "bare_forward_s": round(bare, 2),
        "eager_output_attentions_s": round(eager, 2),
        "extract_s": round(extract_s, 2),
        "extract_over_bare": round(extract_s / bare, 2),
        "extract_over_eager_output_attentions": round(extract_s / eager, 2),
        "attention_bytes": info["attention_bytes"],
        "dense_float32_bytes": info["dense_float32_bytes"],
        "ratio_vs_dense_float32": info["ratio_vs_dense_float32"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
