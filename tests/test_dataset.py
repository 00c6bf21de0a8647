"""The PyTorch dataset: selection, collation, workers, determinism, labels."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import attnstore
from attnstore.dataset import AttentionDataset, collate
from attnstore.labels import LABELS
from tests.synthetic import KINDS, write_synthetic_store


def test_selection_and_items(llama_store: Path) -> None:
    store = attnstore.open(str(llama_store))
    ds = AttentionDataset(llama_store, where="layer = 1 AND head IN (0, 3)")
    assert len(ds) == 12 * 2
    item = ds[5]
    np.testing.assert_array_equal(
        item["matrix"].numpy(), store.matrix(item["doc_id"], 1, item["head"])
    )
    assert item["layer"] == 1
    assert (
        item["token_ids"].tolist()
        == store.sql("SELECT token_id FROM tokens WHERE doc_id = ? ORDER BY pos", [item["doc_id"]])
        .column(0)
        .to_pylist()
    )
    assert item["scores"].shape == (8,)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packed_and_raw(llama_store: Path) -> None:
    ds = AttentionDataset(llama_store, where="doc_id = 2", packed=True, raw=True)
    item = ds[0]
    n = item["n_tokens"]
    assert item["matrix"].shape == (n * (n + 1) // 2,)
    assert item["matrix"].dtype == torch.int32
    assert int(item["matrix"].max()) <= attnstore.open(str(llama_store)).codec.scale  # type: ignore[attr-defined]


def test_collate_pads_and_masks(llama_store: Path) -> None:
    ds = AttentionDataset(llama_store, where="layer = 0 AND head = 0")
    items = [ds[i] for i in range(4)]
    batch = collate(items)
    t = max(it["n_tokens"] for it in items)
    assert batch["matrix"].shape == (4, t, t)
    assert batch["mask"].shape == (4, t)
    for i, it in enumerate(items):
        n = it["n_tokens"]
        assert batch["mask"][i].sum() == n
        assert torch.equal(batch["matrix"][i, :n, :n], it["matrix"])
        assert batch["matrix"][i, n:].abs().sum() == 0
    packed = collate([AttentionDataset(llama_store, packed=True)[i] for i in range(3)])
    assert packed["matrix"].dim() == 2


def test_workers_see_every_item_once(llama_store: Path) -> None:
    ds = AttentionDataset(llama_store, where="head = 1")
    clone = pickle.loads(pickle.dumps(ds))  # picklable: the store's snapshot travels as data
    assert clone.store.files("heads") == ds.store.files("heads")
    assert clone.store.token_ids(0).tolist() == ds.store.token_ids(0).tolist()
    keys = lambda b: list(zip(b["doc_id"].tolist(), b["layer"].tolist(), strict=True))
    single = [k for b in DataLoader(ds, batch_size=5, collate_fn=collate) for k in keys(b)]
    multi = [
        k for b in DataLoader(ds, batch_size=5, collate_fn=collate, num_workers=2) for k in keys(b)
    ]
    assert sorted(multi) == sorted(single)
    assert len(set(multi)) == len(ds)


def test_seeded_shuffle_is_deterministic(llama_store: Path) -> None:
    order = lambda seed: [
        (it["doc_id"], it["layer"], it["head"]) for it in AttentionDataset(llama_store, seed=seed)
    ]
    assert order(7) == order(7)
    assert order(7) != order(8)
    assert sorted(order(7)) == sorted(order(None))


def test_labels_from_thresholds(tmp_path: Path) -> None:
    path = write_synthetic_store(tmp_path / "syn.attn")
    ds = AttentionDataset(path, labels=True, where="doc_id = 0")
    assert [LABELS[ds[i]["label"]] for i in range(len(ds))] == list(KINDS)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["label"].tolist() == [LABELS.index(k) for k in KINDS]


def test_bad_where_is_a_clear_error(llama_store: Path) -> None:
    with pytest.raises(attnstore.QueryError):
        AttentionDataset(llama_store, where="no_such_column > 1")
