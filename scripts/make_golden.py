"""Write tests/golden/v<FORMAT_VERSION>.attn — only on purpose, when the format version changes.

Each golden store is what its format version looked like when it was written; tests check that
today's code still reads every one of them exactly. Older versions are never rewritten.
Run: python scripts/make_golden.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

import attnstore
from attnstore.layout import FORMAT_VERSION
from attnstore.testing import save_tiny_llama

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
# A gold parse (CoNLL-U) so the golden store has words/syntax tables without needing spaCy.
CONLLU = """# newdoc id = d0
# text = The cat sat on the mat.
1\tThe\tthe\tDET\tDT\t_\t2\tdet\t_\t_
2\tcat\tcat\tNOUN\tNN\t_\t3\tnsubj\t_\t_
3\tsat\tsit\tVERB\tVBD\t_\t0\troot\t_\t_
4\ton\ton\tADP\tIN\t_\t6\tcase\t_\t_
5\tthe\tthe\tDET\tDT\t_\t6\tdet\t_\t_
6\tmat\tmat\tNOUN\tNN\t_\t3\tobl\t_\tSpaceAfter=No
7\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# newdoc id = d1
1\tthe\tthe\tDET\tDT\t_\t2\tdet\t_\t_
2\tcat\tcat\tNOUN\tNN\t_\t3\tnsubj\t_\t_
3\tcame\tcome\tVERB\tVBD\t_\t0\troot\t_\t_
4\tagain\tagain\tADV\tRB\t_\t3\tadvmod\t_\t_

"""


def main() -> None:
    name = f"v{FORMAT_VERSION}"
    store_path = GOLDEN / f"{name}.attn"
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_llama(Path(tmp) / "model", num_hidden_layers=2, vocab_size=300)
        corpus = Path(tmp) / "corpus.conllu"
        corpus.write_text(CONLLU)
        shutil.rmtree(store_path, ignore_errors=True)
        GOLDEN.mkdir(parents=True, exist_ok=True)
        # since 2.1: overviews (a 4 × 4 grid, so the 7- and 4-token documents pool blocks of 2)
        attnstore.extract(
            str(store_path), model=str(model), corpus=str(corpus), progress=False, overview=4
        )
    store = attnstore.open(str(store_path))
    expected = {f"matrix_{d}": store.matrices(d) for d in (0, 1)}
    layers, heads = store.manifest["layers"], store.manifest["heads"]
    for d in (0, 1):
        for kind in ("max", "mean"):
            expected[f"overview_{kind}_{d}"] = np.stack(
                [np.stack([store.overview(d, la, h, kind) for h in heads]) for la in layers]
            )
    for table, order in (
        ("heads", "doc_id, layer, head"),
        ("syntax", "doc_id, layer, head, relation, direction"),
    ):
        rows = store.sql(f"SELECT * FROM {table} ORDER BY {order}")
        expected.update(
            {f"{table}_{c}": rows[c].to_numpy(zero_copy_only=False) for c in rows.column_names}
        )
    np.savez_compressed(GOLDEN / f"{name}.expected.npz", **expected)
    print(f"wrote {store_path} and its expected values")


if __name__ == "__main__":
    main()
