"""CPU time and peak memory of a scores-only census against the bare forward pass, against T.

    python scripts/bench_census.py [--lengths 1024,2048,4096,8192,16384,32768] [--default-model]
                                   [--default-sizes 512x8,8192x1] [--attention eager,sdpa]
                                   [--threads N] [--skip-tiny]

(a) A 2-layer random-init Llama with SmolLM2-135M's attention shape (hidden 576, 9 heads, 3 kv
    heads, head_dim 64, intermediate 1536, vocab 49152): one document of T tokens (seeded random
    ordinary ids with a repeated span, so the duplicate/induction key sets are not empty).
(b) ``--default-model``: the default model (SmolLM2-135M-Instruct GGUF, ``attnstore.capture``),
    8 documents × 512 tokens in one batch and 1 × 8192 tokens, cut from ``pydoc_data.topics``.

Every figure is measured in a fresh process (so its peak is its own): ``bare`` is the base model's
forward (no LM head) with transformers' sdpa attention and no attention weights; ``census-<mode>``
is ``Extractor.run`` of a scores-only extractor (what ``attnstore extract --scores-only
--attention <mode>`` runs per batch: forward, capture checks, every score of schemas/scores.md,
the segment's tables; not the model load, the tokenizer or the store writer). The process first
runs the same batch once (``--warmup full``, the default: a corpus run's steady state, after its
first batch has grown the allocator's heap) or an 8-token cut of it (``--warmup short``: the
first batch of a run), then times it ``--repeat`` times. ``cpu_s`` is the median process CPU time
(user + system, all threads) of one call (``user_s``/``sys_s`` beside it; every run in
``cpu_runs``); ``peak_rss`` is the process's VmHWM after the runs and ``rss_before`` its RSS
before them. Ratios are census / bare of the same T (medians). Prints one JSON object.

The bare forward's system time is mostly page faults (the allocator hands back and re-faults
the MLP's ~25 MB intermediates every layer: ~1.3 s of an 8.3 s batch of 8 × 512 on the default
model) and moves by a second between runs of the census too; the medians keep one such run from
deciding a ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time, torch
what, kind, t, b, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
repeat, warmup = int(sys.argv[6]), sys.argv[7]
if threads:
    torch.set_num_threads(threads)
from attnstore.capture import Extractor, LoadedModel, Tokenized, _body, load_model, prepare_model
from attnstore.codecs import get_codec
from attnstore.corpus import Document

def status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

torch.manual_seed(0)
if kind == "tiny":
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, max_position_embeddings=max(t + 1, 8192),
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token": None, "all_special_ids": [],
                          "bos_token_id": None, "__len__": lambda self: 49152,
                          "batch_decode": lambda self, ids: ["t"] * len(ids),
                          "convert_ids_to_tokens": lambda self, ids: ["t"] * len(ids),
                          "__call__": lambda self, text: type("E", (), {"input_ids": [1]})()})()
    ids = torch.randint(100, 49000, (b, t))
    span = min(512, t // 4)
    if span:
        ids[:, t - span:] = ids[:, :span]  # a repeated span: induction and duplicate keys
    docs = [ids[i].tolist() for i in range(b)]
    if what == "bare":
        model.set_attn_implementation("sdpa")
    else:
        loaded = prepare_model(model, tok, model_id="tiny-smollm2-shape")
else:
    loaded = load_model(None, device="cpu", progress=False)
    model = loaded.model
    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics))
    all_ids = loaded.tokenizer(text).input_ids
    docs = [all_ids[i * t:(i + 1) * t] for i in range(b)]
    assert all(len(d) == t for d in docs), "not enough text"
    if what == "bare":
        model.set_attn_implementation("sdpa")

if what == "bare":
    body = _body(model)
    def run(docs):
        with torch.inference_mode():
            body(input_ids=torch.tensor(docs), use_cache=False)
else:
    # "<mode>-online": --skip-analysis sparsity (no row analysis: sdpa scores by online softmax)
    mode, _, online = what.partition("-")
    ex = Extractor(loaded, get_codec("default"), max(t, 8), store_matrices=False, mode=mode,
                   defaults=("patterns",) if online else None)
    ex._token_strings = lambda ids: ["t"] * len(ids)
    def run(docs):
        ex.run([Tokenized(Document(i, ""), d, len(d)) for i, d in enumerate(docs)])

run(docs if warmup == "full" else [d[:8] for d in docs])  # warm-up (lazy init, thread pools)
rss_before = status("VmRSS")
runs = []
for _ in range(repeat):
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run(docs)
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    runs.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, w1 - w0))
mid = sorted(runs, key=lambda x: x[0] + x[1])[(len(runs) - 1) // 2]
print(json.dumps({"what": what, "model": kind, "T": t, "docs": b, "warmup": warmup,
                  "cpu_s": round(mid[0] + mid[1], 3), "user_s": round(mid[0], 3),
                  "sys_s": round(mid[1], 3), "wall_s": round(mid[2], 3),
                  "cpu_runs": [round(u + s, 3) for u, s, _ in runs],
                  "rss_before": rss_before, "peak_rss": status("VmHWM")}))
"""


def _child(
    what: str, kind: str, t: int, b: int, threads: int, repeat: int, warmup: str
) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            what,
            kind,
            str(t),
            str(b),
            str(threads),
            str(repeat),
            warmup,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        return {"what": what, "model": kind, "T": t, "docs": b, "error": out.stderr[-2000:]}
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _compare(rows: list[dict[str, object]], modes: list[str]) -> dict[str, object]:
    bare = rows[0]
    gib = 1 << 30
    out: dict[str, object] = {"T": bare["T"], "docs": bare["docs"], "runs": rows}
    if "error" in bare:
        return out
    out["bare_cpu_s"] = bare["cpu_s"]
    out["bare_peak_GiB"] = round(int(bare["peak_rss"]) / gib, 3)  # type: ignore[call-overload]
    for mode, row in zip(modes, rows[1:], strict=True):
        if "error" in row:
            continue
        out[f"{mode}_cpu_ratio"] = round(float(row["cpu_s"]) / float(bare["cpu_s"]), 3)  # type: ignore[arg-type]
        out[f"{mode}_peak_above_bare_GiB"] = round(
            (int(row["peak_rss"]) - int(bare["peak_rss"])) / gib,  # type: ignore[call-overload]
            3,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument(
        "--attention",
        default="eager,sdpa,sdpa-online",
        help="census modes to measure (sdpa-online: --skip-analysis sparsity)",
    )
    parser.add_argument("--default-model", action="store_true", help="also (b), the default model")
    parser.add_argument("--skip-tiny", action="store_true", help="only (b)")
    parser.add_argument(
        "--default-sizes", default="512x8,8192x1", help="(b): TOKENSxDOCS, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument(
        "--warmup",
        choices=["full", "short"],
        default="full",
        help="untimed first run: the same batch (full) or an 8-token cut of it (short)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    modes = [m for m in args.attention.split(",") if m]
    report: dict[str, object] = {
        "threads": args.threads or "default",
        "repeat": args.repeat,
        "warmup": args.warmup,
    }
    opts = (args.threads, args.repeat, args.warmup)
    if not args.skip_tiny:
        tiny = []
        for t in (int(x) for x in args.lengths.split(",") if x):
            rows = [_child(w, "tiny", t, 1, *opts) for w in ("bare", *modes)]
            tiny.append(_compare(rows, modes))
            print(json.dumps(tiny[-1]), file=sys.stderr)  # progress
        report["tiny_smollm2_shape_2_layers"] = tiny
    if args.default_model or args.skip_tiny:
        default = []
        for size in args.default_sizes.split(","):
            t, b = (int(x) for x in size.split("x"))
            rows = [_child(w, "default", t, b, *opts) for w in ("bare", *modes)]
            default.append(_compare(rows, modes))
            print(json.dumps(default[-1]), file=sys.stderr)
        report["default_model"] = default
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
