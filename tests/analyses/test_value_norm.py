"""The value_norm analysis (Kobayashi et al. 2020) against an in-test computation from the
model's own v_proj output, o_proj weight and eager attention."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch

from attnstore import scores, testing
from attnstore.abc.analysis import Analysis, Batch
from attnstore.analyses.value_norm import ValueNorm


@functools.cache
def _tokenizer() -> Any:
    return testing.tiny_tokenizer()


def _batch(ids: list[list[int]], heads: tuple[int, ...], n_layers: int = 2) -> Batch:
    t = max(map(len, ids))
    padded = torch.zeros((len(ids), t), dtype=torch.long)
    for i, x in enumerate(ids):
        padded[i, : len(x)] = torch.tensor(x)
    return Batch(
        doc_ids=list(range(len(ids))), token_ids=padded,
        lengths=torch.tensor([len(x) for x in ids]), n_layers=n_layers, n_heads=4,
        device=torch.device("cpu"), texts=[""] * len(ids), layers=(0, 1), heads=heads,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["Llama", "GPT-OSS"])
@torch.no_grad()
def test_value_norm_equals_an_in_test_computation(name: str) -> None:
    """Llama: GQA (4 query heads read 2 kv heads); GPT-OSS: rows summing below 1 (sinks)."""
    model = testing.tiny_model(name, attn_implementation="eager")
    tok = _tokenizer()
    docs = [tok(t).input_ids for t in testing.MATRIX_TEXTS[:2]]
    analysis = ValueNorm()
    assert isinstance(analysis, Analysis)
    analysis.bind(model)
    heads = (0, 1, 3)  # a head selection: H follows batch.heads
    batch = _batch(docs, heads)
    analysis.begin(batch)
    # in-test reference: our own hooks on v_proj, the o_proj weight, eager attention, per doc
    expected: dict[tuple[int, int, int], dict[str, float]] = {}
    for i, ids in enumerate(docs):
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            layer.self_attn.v_proj.register_forward_hook(
                lambda _m, _a, out, li=li, c=captured: c.__setitem__(li, out[0].detach())
            )
            for li, layer in enumerate(model.model.layers)
        ]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
        for h in hooks:
            h.remove()
        t = len(ids)
        masks = scores.batch_masks(torch.tensor([ids]), torch.tensor([t]))
        for li, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            d = attn.head_dim
            v = captured[li].reshape(t, -1, d)  # [T, kv_head, d]
            group = 4 // v.shape[1]
            alpha = out.attentions[li][0]  # [head, T, T]
            rows = []
            for h in heads:
                w_o = attn.o_proj.weight[:, h * d : (h + 1) * d]  # [hidden, d]
                f = torch.stack([torch.linalg.norm(w_o @ v[k, h // group]) for k in range(t)])
                a = alpha[h] * f[None, :]
                rows.append(a / a.sum(-1, keepdim=True))
                norm_mean = float(f.mean())
                expected[(i, li, h)] = {"mean_norm": norm_mean}
            want = scores.score_layer(torch.stack(rows)[None].float(), masks)
            for j, h in enumerate(heads):
                expected[(i, li, h)].update({c: float(v[0, j]) for c, v in want.items()})
    # the analysis: one padded forward fills its norms; rows come in two blocks per layer
    mask = (torch.arange(batch.token_ids.shape[1])[None] < batch.lengths[:, None]).long()
    with torch.no_grad():
        padded = model(input_ids=batch.token_ids, attention_mask=mask, output_attentions=True)
    for li in (0, 1):
        probs = padded.attentions[li][:, list(heads)].float()
        probs = probs * mask[:, None, :, None]  # padded rows are 0 (the protocol)
        analysis.rows(li, 0, probs[:, :, :5])
        analysis.rows(li, 5, probs[:, :, 5:])
    table = analysis.end()
    assert table.schema == ValueNorm.schema
    assert table.num_rows == 2 * 2 * len(heads)
    for row in table.to_pylist():
        want = expected[(row["doc_id"], row["layer"], row["head"])]
        for column, value in want.items():
            if np.isnan(value):
                assert row[column] is None, column
            else:
                assert row[column] == pytest.approx(value, abs=1e-5), column
    # the norms matter: weighting moves the sink score of some head
    plain = {}
    for i, ids in enumerate(docs):
        with torch.no_grad():
            att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        for li in (0, 1):
            for h in heads:
                plain[(i, li, h)] = float(att[li][0, h, 1:, 0].mean())
    moved = max(abs(r["sink"] - plain[(r["doc_id"], r["layer"], r["head"])])
                for r in table.to_pylist())  # fmt: skip
    assert moved > 0.01
    analysis.unbind()


def test_value_norm_refuses_models_without_separate_projections() -> None:
    model = testing.tiny_model("GPT-2")
    with pytest.raises(ValueError, match="value_norm"):
        ValueNorm().bind(model)


@torch.no_grad()
def test_value_norm_of_an_encoder_uses_bert_projections_and_bidirectional_scores() -> None:
    from transformers import BertConfig, BertModel

    from attnstore import bidirectional_scores

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, initializer_range=0.2, attn_implementation="eager")  # fmt: skip
    model = BertModel(cfg).eval()
    ids = _tokenizer()(testing.MATRIX_TEXTS[0]).input_ids
    analysis = ValueNorm()
    analysis.bind(model)
    assert analysis.bidirectional
    batch = _batch([ids], (0, 1, 2, 3))
    analysis.begin(batch)
    values: dict[int, torch.Tensor] = {}
    hooks = [
        layer.attention.self.value.register_forward_hook(
            lambda _m, _a, out, li=li: values.__setitem__(li, out[0])
        )
        for li, layer in enumerate(model.encoder.layer)
    ]
    out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    for h in hooks:
        h.remove()
    t = len(ids)
    masks = scores.batch_masks(torch.tensor([ids]), torch.tensor([t]))
    expected: dict[int, dict[str, np.ndarray]] = {}
    for li, layer in enumerate(model.encoder.layer):
        alpha = out.attentions[li]  # [1, head, T, T]
        analysis.rows(li, 0, alpha.float())
        w_o = layer.attention.output.dense.weight  # [hidden, 4 · 8]
        v = values[li].reshape(t, 4, 8)
        f = torch.stack([torch.linalg.norm(v[:, h] @ w_o[:, h * 8 : (h + 1) * 8].T, dim=-1)
                         for h in range(4)])  # [head, T]  # fmt: skip
        a = alpha[0] * f[:, None, :]
        want = bidirectional_scores.score_layer((a / a.sum(-1, keepdim=True))[None], masks,
                                                torch.tensor([ids]))  # fmt: skip
        expected[li] = want
    rows = analysis.end().to_pylist()
    assert len(rows) == 2 * 4
    for row in rows:
        for c in ("next_token", "sink", "entropy", "mean_distance", "prev_token"):
            want_c = float(expected[row["layer"]][c][0, row["head"]])
            assert row[c] == pytest.approx(want_c, abs=1e-5), c
    analysis.unbind()
