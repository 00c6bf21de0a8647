"""README figures: the default model's sink heads once value norms are counted (value_norm).

Runs SmolLM2-135M-Instruct (the embedded default) eagerly over the first 8 ``pydoc:topics``
documents (128 tokens), feeds every layer's attention to :class:`attnstore.analyses.value_norm.
ValueNorm` bound to the model, and prints the plain ``sink`` score (mean over q ≥ 1 of A[q, 0])
beside the value-weighted one for the strongest sink heads. Run: python scripts/value_norm_sinks.py
"""

from __future__ import annotations

import warnings
from pydoc_data.topics import topics

import numpy as np
import torch

from attnstore.abc.analysis import Batch
from attnstore.analyses.value_norm import ValueNorm
from attnstore.capture import load_model
from attnstore.testing import pad_batch


def main() -> None:
    warnings.simplefilter("ignore")
    loaded = load_model(None, device="cpu", progress=False)
    model, tok = loaded.model, loaded.tokenizer
    model.set_attn_implementation("eager")
    texts = [topics[k] for k in sorted(topics)[:8]]
    ids = [tok(t).input_ids[:128] for t in texts]
    x, mask = pad_batch(ids, tok.pad_token_id)
    b, t = x.shape
    n_l, n_h = loaded.info["n_layers"], loaded.info["n_heads"]
    analysis = ValueNorm()
    analysis.bind(model)
    analysis.begin(Batch(list(range(b)), x, mask.sum(1), n_l, n_h, torch.device("cpu"), texts,
                         tuple(range(n_l)), tuple(range(n_h))))  # fmt: skip
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, output_attentions=True, use_cache=False)
    pos = torch.arange(t)[None]
    valid = (pos < mask.sum(1)[:, None]) & (pos >= 1)
    plain = np.zeros((n_l, n_h))
    for layer, a in enumerate(out.attentions):
        a = a.float() * mask[:, None, :, None]
        analysis.rows(layer, 0, a)
        plain[layer] = ((a[..., 0] * valid[:, None]).sum(-1) / valid.sum(-1)[:, None]).mean(0)
    table = analysis.end().to_pandas().groupby(["layer", "head"])[["sink", "mean_norm"]].mean()
    rows = sorted(((lay, h, plain[lay, h], *table.loc[(lay, h)]) for lay in range(n_l)
                   for h in range(n_h)), key=lambda r: -r[2])  # fmt: skip
    for r in rows[:10]:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1f} |")
    ps, ws = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    print(
        f"sink ≥ 0.5: {(ps >= 0.5).sum()} of {len(rows)} heads; still ≥ 0.5 value-weighted: "
        f"{((ps >= 0.5) & (ws >= 0.5)).sum()}; mean sink {ps.mean():.3f} → {ws.mean():.3f}"
    )


if __name__ == "__main__":
    main()
