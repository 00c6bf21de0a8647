"""CPU seconds of the sparsity analysis against a softmax over the same rows, per context length.

    python scripts/bench_sparsity.py [--heads 9] [--block 256] [--lengths 1024,4096]

Prints one JSON object per length: the time of ``Sparsity.rows`` over every block of one layer
and the time of ``torch.softmax`` over the same ``[1, H, Q, K]`` blocks (a floor: the rows the
analysis reads), one thread, random causal attention.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attnstore.abc.analysis import Batch
from attnstore.analyses.sparsity import Sparsity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--lengths", default="1024,4096")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for t in (int(x) for x in args.lengths.split(",")):
        h, blk = args.heads, args.block
        batch = Batch(
            doc_ids=[0], token_ids=torch.zeros(1, t, dtype=torch.int64),
            lengths=torch.tensor([t]), n_layers=1, n_heads=h, device=torch.device("cpu"),
            texts=[""], layers=(0,), heads=tuple(range(h)),
        )  # fmt: skip
        analysis = Sparsity()
        analysis.begin(batch)
        analysis_s = softmax_s = 0.0
        for q0 in range(0, t, blk):
            q = min(blk, t - q0)
            scores = torch.randn(1, h, q, q0 + q)
            above = torch.arange(q0, q0 + q)[:, None] < torch.arange(q0 + q)[None, :]
            start = time.process_time()
            probs = torch.softmax(scores.masked_fill(above, float("-inf")), -1)
            softmax_s += time.process_time() - start
            start = time.process_time()
            analysis.rows(0, q0, probs)
            analysis_s += time.process_time() - start
        analysis.end()
        print(json.dumps({
            "tokens": t, "heads": h, "block": blk, "sparsity_cpu_s": round(analysis_s, 3),
            "softmax_cpu_s": round(softmax_s, 3), "ratio": round(analysis_s / softmax_s, 2),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
