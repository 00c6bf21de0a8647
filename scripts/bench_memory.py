"""Peak memory and throughput of the capture paths on a model of SmolLM2-135M's shape (random
weights: memory and speed do not depend on their values). Each path runs in its own process.

    python scripts/bench_memory.py [--batch 1] [--tokens 2048] [--device cpu]

Paths: ``sdpa`` (bare forward, no attention), ``output_attentions`` (eager, every layer returned),
``attnstore`` (capture + scores + default codec, matrices kept in memory as extraction does),
``attnstore-scores-only`` (sdpa forward, online-softmax scores, nothing materialised).
On CPU the figure is the process's peak RSS above the loaded model; on CUDA it is
``torch.cuda.max_memory_allocated``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from attnstore.capture import Extractor, Tokenized, load_model, _register
from attnstore.codecs import get_codec
from attnstore.corpus import Document
path, b, t, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval().to(device)
ids = torch.randint(0, 49000, (b, t), device=device)
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def run():
    with torch.inference_mode():
        if path == "sdpa":
            model.set_attn_implementation("sdpa"); model(input_ids=ids, use_cache=False)
        elif path == "output_attentions":
            model.set_attn_implementation("eager"); model(input_ids=ids, use_cache=False, output_attentions=True)
        else:
            _register(); model.set_attn_implementation("attnstore")
            from attnstore.capture import LoadedModel
            tok = type("T", (), {"pad_token_id": 0, "all_special_ids": []})()
            info = {"id": "x", "revision": None, "architecture": "llama", "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "dtype": "float32"}
            lm = LoadedModel(model, tok, info, {}, 8192, torch.device(device), True)
            ex = Extractor(lm, get_codec("default"), t, store_matrices=path == "attnstore",
                           mode="sdpa" if path.endswith("scores-only") else "auto")
            ex._token_strings = lambda ids: ["t"] * len(ids)
            batch = [Tokenized(Document(i, ""), ids[i].tolist(), t) for i in range(b)]
            ex.run(batch)
if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:
    base = rss()
start = time.perf_counter(); run()
if device == "cuda": torch.cuda.synchronize()
sec = time.perf_counter() - start
peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss()) - base
print(json.dumps({"path": path, "seconds": round(sec, 2), "tok_per_s": round(b * t / sec), "peak_bytes_above_model": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    results = []
    for path in ("sdpa", "output_attentions", "attnstore", "attnstore-scores-only"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, path, str(args.batch), str(args.tokens), args.device],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    oa = next(r for r in results if r["path"] == "output_attentions")["peak_bytes_above_model"]
    for r in results:
        r["peak_GB"] = round(r["peak_bytes_above_model"] / 1e9, 2)
        r["output_attentions_over_this"] = round(oa / max(r["peak_bytes_above_model"], 1), 1)
    print(
        json.dumps(
            {"batch": args.batch, "tokens": args.tokens, "device": args.device, "paths": results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
