"""Scores against a direct, loop-by-loop numpy reading of schemas/scores.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnstore.scores import SCORE_COLUMNS, batch_masks, score_layer


def reference_scores(a: np.ndarray, x: list[int]) -> dict[str, float | None]:
    """The spec, literally: one matrix A [T, T], token ids x; None = NULL."""
    t = len(x)
    if t < 2:
        return dict.fromkeys(SCORE_COLUMNS)
    q1 = range(1, t)
    out: dict[str, float | None] = {
        "prev_token": float(np.mean([a[q, q - 1] for q in q1])),
        "sink": float(np.mean([a[q, 0] for q in q1])),
        "self": float(np.mean([a[q, q] for q in q1])),
        "max_weight": float(np.mean([a[q, : q + 1].max() for q in q1])),
        "mean_distance": float(np.mean([sum(a[q, k] * (q - k) for k in range(q + 1)) for q in q1])),
    }
    ent = []
    for q in q1:
        h = -sum(a[q, k] * math.log(a[q, k]) for k in range(q + 1) if a[q, k] > 0)
        ent.append(h / math.log(q + 1))
    out["entropy"] = float(np.mean(ent))
    dup = [
        sum(a[q, k] for k in range(q) if x[k] == x[q])
        for q in range(t)
        if any(x[k] == x[q] for k in range(q))
    ]
    out["duplicate"] = float(np.mean(dup)) if dup else None
    ind = []
    for q in range(t):
        keys = [k for k in range(1, q) if x[k - 1] == x[q]]
        if keys:
            ind.append(sum(a[q, k] for k in keys))
    out["induction"] = float(np.mean(ind)) if ind else None
    return out


def random_attention(
    rng: np.random.Generator, t: int, heads: int, sharp: float = 3.0
) -> np.ndarray:
    logits = rng.normal(size=(heads, t, t)) * sharp
    logits = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def run_batch(mats: list[np.ndarray], toks: list[list[int]]) -> dict[str, np.ndarray]:
    """Right-pad several documents into one batch (padding filled with junk) and score it."""
    t_max = max(len(x) for x in toks)
    heads = mats[0].shape[0]
    probs = torch.full((len(mats), heads, t_max, t_max), 0.123)
    ids = torch.full((len(mats), t_max), 7, dtype=torch.long)
    for i, (m, x) in enumerate(zip(mats, toks, strict=True)):
        n = len(x)
        probs[i, :, :n, :n] = torch.from_numpy(m)
        probs[i, :, :n, n:] = 0.0  # causal: real rows never see padded keys
        ids[i, :n] = torch.tensor(x)
    masks = batch_masks(ids, torch.tensor([len(x) for x in toks]))
    return score_layer(probs, masks)


def assert_matches(
    got: dict[str, np.ndarray], i: int, head: int, ref: dict[str, float | None]
) -> None:
    for name in SCORE_COLUMNS:
        value = got[name][i, head]
        if ref[name] is None:
            assert np.isnan(value), name
        else:
            assert value == pytest.approx(ref[name], abs=2e-6), name


def test_random_batch_with_padding_matches_reference() -> None:
    rng = np.random.default_rng(0)
    lengths = [1, 2, 9, 23, 40]
    toks = [rng.integers(0, 6, size=n).tolist() for n in lengths]  # small vocab: many repeats
    mats = [random_attention(rng, n, 3) for n in lengths]
    got = run_batch(mats, toks)
    for i, (m, x) in enumerate(zip(mats, toks, strict=True)):
        for h in range(3):
            assert_matches(got, i, h, reference_scores(m[h].astype(np.float64), x))


def test_structured_heads_score_as_named() -> None:
    t = 12
    x = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]
    prev = np.zeros((t, t), np.float32)
    prev[0, 0] = 1
    prev[np.arange(1, t), np.arange(t - 1)] = 1
    sink = np.zeros((t, t), np.float32)
    sink[:, 0] = 1
    ind = np.zeros((t, t), np.float32)
    for q in range(t):
        ind[q, q - 5 if q >= 6 else 0] = 1  # token after the earlier copy (period 6)
    uniform = np.tril(np.ones((t, t), np.float32))
    uniform /= uniform.sum(1, keepdims=True)
    got = run_batch([np.stack([prev, sink, ind, uniform])], [x])
    assert got["prev_token"][0, 0] == pytest.approx(1.0)
    assert got["sink"][0, 1] == pytest.approx(1.0)
    assert got["induction"][0, 2] == pytest.approx(1.0)
    assert got["entropy"][0, 3] == pytest.approx(1.0, abs=1e-6)
    assert got["max_weight"][0, 1] == pytest.approx(1.0)
    assert got["mean_distance"][0, 0] == pytest.approx(1.0)
    # the induction head attends to the token after the copy, not to the copy itself
    assert got["duplicate"][0, 2] == pytest.approx(0.0)
    assert got["entropy"][0, 0] == pytest.approx(0.0, abs=1e-7)


def test_null_rules() -> None:
    x_distinct = [1, 2, 3, 4]
    m = random_attention(np.random.default_rng(1), 4, 1)
    got = run_batch([m, m[:, :1, :1]], [x_distinct, [9]])
    assert np.isnan(got["duplicate"][0, 0])
    assert np.isnan(got["induction"][0, 0])
    assert not np.isnan(got["prev_token"][0, 0])
    for name in SCORE_COLUMNS:  # T < 2: everything NULL
        assert np.isnan(got[name][1, 0]), name


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 24),
    vocab=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    sharp=st.sampled_from([0.1, 1.0, 10.0, 50.0]),
)
def test_property_matches_reference_and_ranges(n: int, vocab: int, seed: int, sharp: float) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=n).tolist()
    m = random_attention(rng, n, 2, sharp)
    got = run_batch([m], [x])
    for h in range(2):
        ref = reference_scores(m[h].astype(np.float64), x)
        assert_matches(got, 0, h, ref)
        for name in ("prev_token", "sink", "self", "entropy", "max_weight"):
            assert -1e-6 <= got[name][0, h] <= 1 + 1e-6
        assert 0 <= got["mean_distance"][0, h] <= n - 1 + 1e-5


@pytest.mark.parametrize(
    ("block_bytes", "q_block", "softcap"),
    [(1, 256, None), (1, 3, None), (4 * 12 * 40, 5, 30.0), (1 << 20, 256, None)],
)
def test_online_scores_equal_materialised(
    block_bytes: int, q_block: int, softcap: float | None
) -> None:
    from attnstore.scores import online_layer_scores

    torch.manual_seed(0)
    b, h, t, d = 3, 4, 19, 8
    lengths = torch.tensor([19, 11, 2])
    ids = torch.randint(0, 4, (b, t))
    q, k = torch.randn(b, h, t, d) * 2, torch.randn(b, h, t, d) * 2
    pos = torch.arange(t)
    allowed = (pos[None, :] <= pos[:, None])[None, None] & (pos[None, :] < lengths[:, None])[
        :, None, None, :
    ]
    logits = q @ k.transpose(-1, -2) * 0.3
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    masks = batch_masks(ids, lengths)
    want = score_layer(probs, masks)
    got = online_layer_scores(
        q,
        k,
        allowed,
        masks,
        ids,
        scaling=0.3,
        softcap=softcap,
        block_bytes=block_bytes,
        q_block=q_block,
    )
    for name in SCORE_COLUMNS:
        np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=1e-5, err_msg=name)


def dense_key_sets(x: list[int], n: int) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """The spec's duplicate and induction key sets from a dense [T, T] reading (valid rows only)."""
    dup = {(q, k) for q in range(1, n) for k in range(q) if x[k] == x[q]}
    ind = {(q, k) for q in range(1, n) for k in range(1, q) if x[k - 1] == x[q]}
    return dup, ind


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=4),
    vocab=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    q_split=st.integers(1, 30),
    max_pairs=st.integers(1, 50),
)
def test_property_key_sets_match_dense_reference(
    lengths: list[int], vocab: int, seed: int, q_split: int, max_pairs: int
) -> None:
    from attnstore.scores import key_pairs

    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = torch.from_numpy(rng.integers(0, vocab, size=(len(lengths), t))).long()  # junk padding
    masks = batch_masks(ids, torch.tensor(lengths))
    for kind, column, rows in (
        ("dup", "n_duplicate", masks.dup_rows),
        ("ind", "n_induction", masks.ind_rows),
    ):
        got: set[tuple[int, int, int]] = set()
        n_got = 0
        for q0 in range(0, max(t, 1), q_split):  # blocks of rows, pairs in chunks
            for doc, q, k in key_pairs(masks, kind, q0, min(q0 + q_split, t), max_pairs=max_pairs):
                got |= set(zip(doc.tolist(), q.tolist(), k.tolist(), strict=True))
                n_got += len(doc)
        assert n_got == len(got)  # every pair exactly once
        want = set()
        for i, n in enumerate(lengths):
            x = ids[i].tolist()
            pairs = dense_key_sets(x, n)[0 if kind == "dup" else 1]
            want |= {(i, q, k) for q, k in pairs}
            assert int(getattr(masks, column)[i]) == len({q for q, _ in pairs})
            assert set(rows[i].nonzero()[:, 0].tolist()) == {q for q, _ in pairs}
        assert got == want, kind


def test_online_causal_without_mask_equals_masked() -> None:
    """allowed=None (plain causal, right padding) gives the same scores as the explicit mask."""
    from attnstore.scores import online_layer_scores

    torch.manual_seed(1)
    b, h, t, d = 2, 3, 33, 8
    lengths = torch.tensor([33, 20])
    ids = torch.randint(0, 5, (b, t))
    q, k = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    pos = torch.arange(t)
    allowed = (pos[None, :] <= pos[:, None])[None, None] & (pos[None, :] < lengths[:, None])[
        :, None, None, :
    ]
    masks = batch_masks(ids, lengths)
    want = online_layer_scores(q, k, allowed, masks, scaling=0.5, block_bytes=4 * b * h * 50)
    got = online_layer_scores(q, k, None, masks, scaling=0.5, block_bytes=4 * b * h * 50)
    for name in SCORE_COLUMNS:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


def test_long_document_scores_equal_short_document_scores() -> None:
    """A long document scored in many small blocks (online and from probability rows) equals its
    dense reading, and its prefixes (short documents: the same rows, by causality) batched beside
    it equal the same short documents scored alone in one dense block."""
    from attnstore.scores import LayerScores, online_layer_scores

    torch.manual_seed(2)
    h, t, d = 2, 1024, 16
    prefixes = [1, 2, 97, 600]
    x = torch.randint(0, 40, (t,))
    x[700:760] = x[100:160]  # a copied span: induction keys far back
    q, k = torch.randn(1, h, t, d) * 1.5, torch.randn(1, h, t, d) * 1.5
    lengths = [t, *prefixes]
    b = len(lengths)
    ids = x.repeat(b, 1)
    qb, kb = q.repeat(b, 1, 1, 1), k.repeat(b, 1, 1, 1)
    masks = batch_masks(ids, torch.tensor(lengths))
    got = online_layer_scores(qb, kb, None, masks, scaling=0.25, block_bytes=4 * b * h * 5000)

    def dense(n: int) -> dict[str, np.ndarray]:
        logits = q[:, :, :n] @ k[:, :, :n].transpose(-1, -2) * 0.25
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        return score_layer(probs, batch_masks(x[None, :n], torch.tensor([n])))

    # rows fed in uneven blocks to the probability-row accumulator
    logits = qb @ kb.transpose(-1, -2) * 0.25
    pos = torch.arange(t)
    allowed = (pos[None, :] <= pos[:, None])[None, None] & (
        pos[None, :] < torch.tensor(lengths)[:, None]
    )[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    acc = LayerScores(masks, h)
    q0 = 0
    for c in [1, 5, 64, 300, 1000]:
        acc.add(probs[:, :, q0 : q0 + c], q0)
        q0 = min(q0 + c, t)
    blocked = acc.result()
    for i, n in enumerate(lengths):
        want = dense(n)
        for name in SCORE_COLUMNS:
            for res in (got, blocked):
                np.testing.assert_allclose(
                    res[name][i], want[name][0], rtol=1e-5, atol=2e-5, err_msg=f"{name} T={n}"
                )
