"""Long documents and short ones, fast (issue 18). Each case prints one JSON object; run on quiet
cores (figures from shared cores are not comparable). Commands (docs/benchmarks.md):

    python scripts/bench_long.py memory  --tokens 8192 --overview 256   # peak RSS: store-all vs bare forward
    python scripts/bench_long.py stream  --tokens 8192                  # tiny model: streamed vs in-memory store-all
    python scripts/bench_long.py rows32k --tokens 32768                 # 2-layer SmolLM2-shaped, --rows=-64:
    python scripts/bench_long.py reads   --tokens 8192                  # 64 rows vs whole head; viewer first picture
    python scripts/bench_long.py short   --docs 16 --max-length 512     # vs eager + h5py loop; reads; fresh process
    python scripts/bench_long.py dataset --docs 16 --max-length 512     # AttentionDataset, 2 workers vs matrix() loop

``--model`` takes any model ``load_model`` takes (default: the embedded SmolLM2-135M). Small sizes
(``--tokens 512``, ``--docs 4 --max-length 64``) check that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokens(loaded: Any, n: int, seed: int = 0) -> list[int]:
    vocab = min(len(loaded.tokenizer), int(loaded.model.config.vocab_size))
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def _store_one(loaded: Any, ids: list[int], out: Path, **settings: Any) -> dict[str, Any]:
    """Store-all of one document through the run every driver builds (extractor, streaming
    writer); ``settings``: :class:`~attnstore.extraction.ExtractConfig` fields."""
    from attnstore.corpus import Document
    from attnstore.extraction import ExtractConfig, ExtractionRun
    from attnstore.storage import open_storage

    config = ExtractConfig(corpus="bench", max_length=len(ids), **settings)
    run = ExtractionRun(open_storage(out), loaded, config)
    start = time.perf_counter()
    run.commit([run.extractor.tokenize(Document(0, "", token_ids=tuple(ids)))])
    run.writer.close()
    return {"seconds": round(time.perf_counter() - start, 2)}


def _part(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measured part in its own process (its peak RSS is its own); its JSON line."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[1:])} failed:\n{proc.stderr[-4000:]}")
    parsed: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return parsed


# -- memory: store-all of one long document vs the bare forward ----------------------------------
def case_memory(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"case": "memory", "tokens": args.tokens, "overview": args.overview}
    for part in ("bare", "store"):
        cmd = [sys.executable, __file__, "_memory_part", part, "--tokens", str(args.tokens),
               "--overview", str(args.overview)] + (["--model", args.model] if args.model else [])  # fmt: skip
        out[part] = _part(cmd)
    out["store_minus_bare_gib"] = round(
        (out["store"]["peak_rss_mib"] - out["bare"]["peak_rss_mib"]) / 1024, 2
    )
    return out


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from attnstore.capture import load_model

    loaded = load_model(args.model, device="cpu", progress=False)
    ids = _tokens(loaded, args.tokens)
    before = _rss_mib()
    if args.part == "bare":
        loaded.model.set_attn_implementation("sdpa")
        start = time.perf_counter()
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([ids]), use_cache=False)
        res = {"seconds": round(time.perf_counter() - start, 2)}
    else:
        tmp = Path(tempfile.mkdtemp())
        res = _store_one(loaded, ids, tmp / "s.attn", overview=args.overview)
        from attnstore.store import Store

        res["store_bytes"] = Store(tmp / "s.attn").info()["store_bytes"]
        shutil.rmtree(tmp)
    return {**res, "rss_after_load_mib": round(before), "peak_rss_mib": round(_rss_mib())}


# -- stream: the same store-all, streamed to its segment or held in memory (a tiny model) -----------
def case_stream(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"case": "stream", "tokens": args.tokens}
    for name, threshold in (("streamed", "0"), ("in_memory", str(1 << 50))):
        cmd = [sys.executable, __file__, "_stream_part", "--tokens", str(args.tokens)]
        env = {**os.environ, "ATTNSTORE_STREAM_BYTES": threshold}
        out[name] = _part(cmd, env)
    return out


def stream_part(args: argparse.Namespace) -> dict[str, Any]:
    from attnstore.capture import load_model
    from attnstore.testing import save_tiny_llama

    tmp = Path(tempfile.mkdtemp())
    folder = save_tiny_llama(
        tmp / "model", max_position_embeddings=args.tokens
    )  # 3 layers × 4 heads
    loaded = load_model(str(folder), device="cpu", progress=False)
    before = _rss_mib()
    res = _store_one(loaded, _tokens(loaded, args.tokens), tmp / "s.attn")
    from attnstore.store import Store

    (segment,) = Store(tmp / "s.attn").sql("SELECT segment FROM docs").column(0).to_pylist()
    attrs = json.loads((tmp / "s.attn" / "segments" / segment / "zarr.json").read_text())
    res["streamed"] = bool(attrs["attributes"].get("attnstore", {}).get("streamed"))
    n = args.tokens
    shutil.rmtree(tmp)
    return {**res, "codes_mib": round(12 * n * (n + 1) // 2 * 2 / 2**20),
            "rss_after_load_mib": round(before), "peak_rss_mib": round(_rss_mib())}  # fmt: skip


# -- rows32k: a 2-layer model with SmolLM2-135M's attention shape, --rows=-64: --------------------
def case_rows32k(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import attnstore
    from attnstore.capture import load_model
    from attnstore.testing import save_tiny_llama

    tmp = Path(tempfile.mkdtemp())
    folder = save_tiny_llama(
        tmp / "model", num_hidden_layers=2, hidden_size=576, intermediate_size=1536,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=max(args.tokens, 128), rope_theta=100000.0,
    )  # fmt: skip
    loaded = load_model(str(folder), device="cpu", dtype="float32", progress=False)
    ids = _tokens(loaded, args.tokens)
    captured: dict[int, Any] = {}

    def grab(module: Any, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        h = kw.get("hidden_states", a[0] if a else None)
        captured[int(module.layer_idx)] = (h.detach(), kw["position_embeddings"])

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
             for layer in loaded.model.model.layers]  # fmt: skip
    out = tmp / "rows.attn"
    res = _store_one(loaded, ids, out, rows="-64:")
    for hk in hooks:
        hk.remove()
    res["peak_rss_mib"] = round(_rss_mib())
    store = attnstore.open(str(out))
    worst = 0.0
    torch.set_grad_enabled(False)  # the captured tensors are inference tensors
    for layer, (h, (cos, sin)) in captured.items():  # reference: last 64 rows in float64
        attn = loaded.model.model.layers[layer].self_attn
        q = attn.q_proj(h).view(1, -1, 9, 64).transpose(1, 2)
        k = attn.k_proj(h).view(1, -1, 3, 64).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q[:, :, -64:].double(), k.repeat_interleave(3, dim=1).double()
        logits = q @ k.transpose(-1, -2) * attn.scaling
        t = k.shape[2]
        allowed = torch.arange(t)[None, :] <= torch.arange(t - 64, t)[:, None]
        ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)[0].numpy()
        for head in range(9):
            got = store.matrix(0, layer, head, rows=slice(-64, None))
            worst = max(worst, float(np.abs(got - ref[head]).max()))
    res.update(
        case="rows32k", tokens=args.tokens, max_abs_error=worst,
        codec_bound=store.codec.max_abs_error, exact=worst <= store.codec.max_abs_error + 1e-6,
        store_bytes=store.info()["store_bytes"],
    )  # fmt: skip
    shutil.rmtree(tmp)
    return res


# -- reads: 64 rows vs the whole head; the viewer's first picture vs a whole read ----------------
def _synthetic_long_store(path: Path, t: int, overview: int) -> None:
    """One T-token document, 1 layer × 2 heads (sink + previous token + noise), streamed."""
    import torch

    from attnstore.codecs import get_codec
    from attnstore.layout import FORMAT_NAME, FORMAT_VERSION, PACKING
    from attnstore.overview import OverviewPool
    from attnstore.store import Segment, StoreWriter

    codec = get_codec("default")
    manifest: Any = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "bench_long",
        "created_at": "2026-01-01T00:00:00+00:00",
        "model": {"id": "synthetic", "revision": None, "architecture": "none", "n_layers": 1,
                  "n_heads": 2, "n_kv_heads": 2, "dtype": "float32"},
        "tokenizer": {"id": "synthetic", "vocab_size": 100, "bos_token_id": None, "adds_bos": False},
        "codec": codec.get_config(), "packing": PACKING, "max_length": t, "layers": [0],
        "heads": [0, 1], "settings": {}, "overview": overview,
    }  # fmt: skip
    writer = StoreWriter(path, manifest)
    stream = writer.stream(t)
    pool = OverviewPool(t, overview, 2, torch.device("cpu"))
    rng = np.random.default_rng(0)
    for q0 in range(0, t, 512):
        q = np.arange(q0, min(t, q0 + 512))
        logits = rng.gumbel(size=(2, len(q), t)).astype(np.float32)
        logits[0, :, 0] += 6.0  # a sink
        logits[1, np.arange(len(q)), np.maximum(q - 1, 0)] += 6.0  # previous token
        logits[:, np.arange(t)[None, :] > q[:, None]] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        pool.add(q0, torch.from_numpy(probs))
        stream.write(
            0, codec.encode(np.concatenate([probs[:, i, : r + 1] for i, r in enumerate(q)], 1))
        )
    stream.end_layer(0)
    handle = stream.close()
    z = np.zeros(0)
    heads = dict.fromkeys(("doc_id", "layer", "head", "kv_head", "n_tokens", "n_queries", "n_duplicate", "n_induction"), z)  # fmt: skip
    writer.commit(Segment(
        docs={"doc_id": [0], "n_tokens": [t], "n_tokens_input": [t], "truncated": [False],
              "skipped": [None], "n_chars": [0], "text": [""]},
        tokens={"doc_id": np.zeros(t, np.int64), "pos": np.arange(t), "token_id": np.zeros(t, np.int64),
                "token": ["x"] * t},
        heads=heads, codes=[handle], overviews=[pool.finish()[None]],
    ))  # fmt: skip
    writer.close()


def _best(fn: Any, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def case_reads(args: argparse.Namespace) -> dict[str, Any]:
    import attnstore
    from attnstore.serve import Viewer

    tmp = Path(tempfile.mkdtemp())
    path = tmp / "long.attn"
    start = time.perf_counter()
    _synthetic_long_store(path, args.tokens, args.overview)
    write_s = time.perf_counter() - start
    store = attnstore.open(str(path))
    whole = _best(lambda: store.matrix(0, 0, 0), 3)
    rows64 = _best(lambda: store.matrix(0, 0, 0, rows=slice(-64, None)))
    params = {"doc": "0", "layer": "0", "head": "1"}
    viewer = Viewer([path])  # a head it has never shown: nothing cached
    start = time.perf_counter()
    viewer.overview(params)
    first_picture = time.perf_counter() - start
    b = store.overview_grid(0)["block"]
    pool = 1 << max(
        0, (b - 1).bit_length()
    )  # the first power of two ≥ b (a multiple of b if b is one)
    viewer = Viewer([path])
    start = time.perf_counter()
    _, headers = viewer.tile({**params, "pool": str(pool), "ty": "0", "tx": "0"})
    first_tile = time.perf_counter() - start
    viewer.close()
    out = {
        "case": "reads", "tokens": args.tokens, "overview": args.overview, "write_s": round(write_s, 2),
        "whole_head_s": round(whole, 4), "rows64_s": round(rows64, 4),
        "rows64_over_whole": round(rows64 / whole, 3),
        "viewer_first_overview_s": round(first_picture, 4),
        "viewer_first_overview_over_whole": round(first_picture / whole, 3),
        "viewer_first_tile_pool": pool, "viewer_first_tile_source": headers["X-Source"],
        "viewer_first_tile_s": round(first_tile, 4),
        "viewer_first_tile_over_whole": round(first_tile / whole, 3),
        "attention_bytes": store.info()["attention_bytes"],
    }  # fmt: skip
    shutil.rmtree(tmp)
    return out


# -- short documents: extraction vs the naive loop, reads vs h5py, a fresh process ---------------
def _short_setup(args: argparse.Namespace) -> tuple[Any, list[Any], Path]:
    from attnstore.capture import Extractor, load_model
    from attnstore.codecs import get_codec
    from attnstore.corpus import read_corpus

    loaded = load_model(args.model, device="cpu", progress=False)
    ex = Extractor(loaded, get_codec("default"), args.max_length)
    docs = [ex.tokenize(d) for d in read_corpus("pydoc:topics") if d.text.strip()]
    docs = [d for d in docs if len(d.ids) >= args.max_length][: args.docs]  # 16 × 512 tokens
    tmp = Path(tempfile.mkdtemp())
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.doc.text}) + "\n" for d in docs))
    return loaded, docs, tmp


def _naive_loop(loaded: Any, docs: list[Any], path: Path, batch_size: int) -> None:
    """What a researcher writes: eager output_attentions=True, one HDF5 dataset per document
    (float16, gzip, one chunk per matrix)."""
    import h5py
    import torch

    from attnstore.testing import pad_batch

    model = loaded.model
    model.set_attn_implementation("eager")
    with h5py.File(path, "w") as f, torch.inference_mode():
        for first in range(0, len(docs), batch_size):
            batch = docs[first : first + batch_size]
            ids, mask = pad_batch([d.ids for d in batch], loaded.tokenizer.pad_token_id)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True)
            att = torch.stack(out.attentions, 1)  # [doc, layer, head, T, T]
            for i, d in enumerate(batch):
                n = len(d.ids)
                m = att[i, :, :, :n, :n].to(torch.float16).numpy()
                f.create_dataset(f"doc{first + i}", data=m, chunks=(1, 1, n, n), compression="gzip")
    model.set_attn_implementation("attnstore")


def case_short(args: argparse.Namespace) -> dict[str, Any]:
    import h5py

    import attnstore

    loaded, docs, tmp = _short_setup(args)
    corpus = tmp / "corpus.jsonl"
    ours, naive = [], []
    for rep in range(args.repeat):  # alternated, both in this process with the model loaded once
        out = tmp / f"s{rep}.attn"
        start = time.perf_counter()
        attnstore.extract(str(out), model=loaded, corpus=str(corpus), max_length=args.max_length,
                          batch_size=args.batch_size, progress=False)  # fmt: skip
        ours.append(time.perf_counter() - start)
        h5 = tmp / f"n{rep}.h5"
        start = time.perf_counter()
        _naive_loop(loaded, docs, h5, args.batch_size)
        naive.append(time.perf_counter() - start)
    store = attnstore.open(str(tmp / "s0.attn"))
    ids = sorted(store.doc_ids())
    n_l, n_h = len(store.manifest["layers"]), len(store.manifest["heads"])
    rng = np.random.default_rng(0)
    picks = [
        (int(rng.choice(ids)), int(rng.integers(n_l)), int(rng.integers(n_h))) for _ in range(200)
    ]
    for d, la, h in picks[:20]:  # warm both
        store.matrix(d, la, h)
    start = time.perf_counter()
    for d, la, h in picks:
        store.matrix(d, la, h)
    ours_read = (time.perf_counter() - start) / len(picks)
    with h5py.File(tmp / "n0.h5", "r") as f:
        for d, la, h in picks[:20]:
            f[f"doc{d}"][la, h].astype(np.float32)
        start = time.perf_counter()
        for d, la, h in picks:
            f[f"doc{d}"][la, h].astype(np.float32)
        h5_read = (time.perf_counter() - start) / len(picks)
    fresh_ours = _fresh(
        f"import attnstore; s = attnstore.open({str(tmp / 's0.attn')!r}); s.matrix({ids[0]}, 0, 0)"
    )
    fresh_h5 = _fresh(
        f"import h5py, numpy; f = h5py.File({str(tmp / 'n0.h5')!r}, 'r'); f['doc0'][0, 0].astype(numpy.float32)"
    )
    out = {
        "case": "short", "docs": len(docs), "max_length": args.max_length, "repeat": args.repeat,
        "extract_s": [round(x, 2) for x in ours], "naive_loop_s": [round(x, 2) for x in naive],
        "extract_over_naive": round(min(ours) / min(naive), 3),
        "store_bytes": store.info()["attention_bytes"],
        "h5_bytes": (tmp / "n0.h5").stat().st_size,
        "warm_read_ms": round(ours_read * 1e3, 3), "h5_warm_read_ms": round(h5_read * 1e3, 3),
        "warm_read_over_h5": round(ours_read / h5_read, 2),
        "fresh_first_read_s": fresh_ours, "h5_fresh_first_read_s": fresh_h5,
        "fresh_over_h5": round(fresh_ours["wall_s"] / fresh_h5["wall_s"], 2),
    }  # fmt: skip
    shutil.rmtree(tmp)
    return out


def _fresh(code: str, repeat: int = 3) -> dict[str, Any]:
    """A fresh interpreter that opens and reads once: best wall time, and the heavy modules it
    imported (torch, transformers, deltalake, duckdb, pandas)."""
    probe = (
        f"{code}\nimport sys; print(sorted(m for m in ('torch', 'transformers', 'deltalake', "
        "'duckdb', 'pandas') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    best, mods = float("inf"), ""
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              check=True, env=env)  # fmt: skip
        best = min(best, time.perf_counter() - start)
        mods = proc.stdout.strip().splitlines()[-1]
    return {"wall_s": round(best, 3), "imported": mods}


def case_dataset(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    import attnstore
    from attnstore.dataset import AttentionDataset, collate

    loaded, _, tmp = _short_setup(args)
    out = tmp / "s.attn"
    attnstore.extract(str(out), model=loaded, corpus=str(tmp / "corpus.jsonl"),
                      max_length=args.max_length, batch_size=args.batch_size, progress=False)  # fmt: skip
    ds = AttentionDataset(str(out), seed=0)
    n = min(len(ds), args.items)
    loader = DataLoader(
        ds, batch_size=8, num_workers=2, collate_fn=collate,
        sampler=list(range(n)), persistent_workers=False,
    )  # fmt: skip
    start = time.perf_counter()
    nbytes = 0
    for batch in loader:
        nbytes += int(batch["matrix"].numel()) * 4
    loader_s = time.perf_counter() - start
    store = attnstore.open(str(out))
    start = time.perf_counter()
    plain_bytes = 0
    for i in range(n):
        d, la, h, _ = (int(x) for x in ds._ids[i])
        plain_bytes += store.matrix(d, la, h).nbytes
    plain_s = time.perf_counter() - start
    shutil.rmtree(tmp)
    return {
        "case": "dataset", "items": n, "workers": 2,
        "loader_items_per_s": round(n / loader_s, 1), "loader_mb_per_s": round(nbytes / loader_s / 1e6, 1),
        "matrix_loop_items_per_s": round(n / plain_s, 1),
        "matrix_loop_mb_per_s": round(plain_bytes / plain_s / 1e6, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "case",
        choices=[
            "memory",
            "stream",
            "rows32k",
            "reads",
            "short",
            "dataset",
            "_memory_part",
            "_stream_part",
        ],
    )
    parser.add_argument("part", nargs="?", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--overview", type=int, default=256)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = {"rows32k": 32768}.get(args.case, 8192)
    if args.case in ("_memory_part", "_stream_part"):
        part = memory_part if args.case == "_memory_part" else stream_part
        print(json.dumps(part(args)))
        return
    cases = {"memory": case_memory, "stream": case_stream, "rows32k": case_rows32k, "reads": case_reads,
             "short": case_short, "dataset": case_dataset}  # fmt: skip
    result = cases[args.case](args)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
