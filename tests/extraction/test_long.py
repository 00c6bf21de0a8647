"""Long documents (issue 18): --rows, --overview, partial reads and streaming store-all."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnstore
from attnstore.errors import AttnStoreError, MatrixNotFoundError
from attnstore.overview import OverviewPool, grid, pool_matrix
from attnstore.rows import DocRows, RowSelection, RowsNotStoredError, RowSpecError
from attnstore.verify import verify_store
from tests.helpers import GOLDEN, assert_same_content, extract_command, store_content

N_LAYERS, N_HEADS = 3, 4


# -- row selections ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "n", "rows"),
    [
        ("-64:", 100, list(range(36, 100))),
        ("-64:", 10, list(range(10))),
        ("0:3,-2:", 10, [0, 1, 2, 8, 9]),
        ("0:3, -2:", 4, [0, 1, 2, 3]),
        ("::4", 10, [0, 4, 8]),
        ("5", 10, [5]),
        ("-1", 10, [9]),
        ("20", 10, []),
        ("2:5,3:8", 10, [2, 3, 4, 5, 6, 7]),
    ],
)
def test_row_selection_syntax(spec: str, n: int, rows: list[int]) -> None:
    sel = RowSelection.parse(spec)
    assert sel is not None
    assert sel.rows(n).tolist() == rows
    doc = DocRows.of(sel, n)
    assert doc.length == sum(r + 1 for r in rows)
    assert RowSelection.parse(str(sel)) == sel  # the manifest's string reads back the same


@pytest.mark.parametrize("spec", [None, "", ":", "::"])
def test_row_selection_of_every_row(spec: str | None) -> None:
    assert RowSelection.parse(spec) is None
    assert DocRows.of(None, 7).length == 7 * 8 // 2


@pytest.mark.parametrize("spec", ["a:b", "1:2:3:4", "0:10:-1", "::0", "1-5", ",", "0:3,,", "1.5"])
def test_bad_row_specs_are_refused(spec: str) -> None:
    with pytest.raises(RowSpecError) as err:
        RowSelection.parse(spec)
    assert isinstance(err.value, AttnStoreError)
    assert "--rows" in str(err.value)


def test_bad_rows_fail_before_the_model_load(tmp_path: Path) -> None:
    with pytest.raises(RowSpecError):
        attnstore.extract(
            str(tmp_path / "s.attn"), model="no/such/model", rows="x:", progress=False
        )


# -- overviews against an in-test pooling ---------------------------------------------------------
def naive_pool(matrix: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    t = matrix.shape[0]
    b = -(-t // size)
    m = -(-t // b)
    mx = np.zeros((m, m))
    mean = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            block = matrix[i * b : (i + 1) * b, j * b : (j + 1) * b]
            mx[i, j] = block.max()
            mean[i, j] = block.sum() / block.shape[0]
    return mx, mean


def causal(rng: np.random.Generator, t: int, heads: int = 2) -> np.ndarray:
    logits = rng.normal(size=(heads, t, t)) * 3
    logits[:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] = -np.inf
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 70),
    size=st.integers(1, 40),
    chunk=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_overview_pooling_equals_in_test_pooling(t: int, size: int, chunk: int, seed: int) -> None:
    probs = causal(np.random.default_rng(seed), t)
    pool = OverviewPool(t, size, 2, torch.device("cpu"))
    for q0 in range(0, t, chunk):  # rows arrive in blocks, as from the capture
        pool.add(q0, torch.from_numpy(probs[:, q0 : q0 + chunk]))
    got = pool.finish()
    b, m = grid(t, size)
    assert got.shape == (2, 2, m, m)
    assert m <= size
    assert b * (m - 1) < t <= b * m
    ref_max, ref_mean = pool_matrix(probs, size)
    for h in range(2):
        mx, mean = naive_pool(probs[h].astype(np.float64), size)
        np.testing.assert_allclose(got[h, 0], mx, atol=1e-7)
        np.testing.assert_allclose(got[h, 1], mean, atol=1e-6)
        np.testing.assert_allclose(ref_max[h], mx, atol=1e-7)
        np.testing.assert_allclose(ref_mean[h], mean, atol=1e-6)
        np.testing.assert_allclose(got[h, 1].sum(1), 1.0, atol=1e-5)  # each row sums to 1


# -- stores written by a tiny model ------------------------------------------------------------
@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    keys = sorted(topics)[:5]
    path = tmp_path_factory.mktemp("long") / "corpus.txt"
    path.write_text("\n".join(topics[k][:500].replace("\n", " ") for k in keys) + "\n")
    return path


def _extract(out: Path, llama_dir: Path, corpus: Path, **kwargs: object) -> attnstore.Store:
    attnstore.extract(
        str(out), model=str(llama_dir), corpus=str(corpus), max_length=120, batch_size=2,
        codec="lossless", progress=False, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return attnstore.open(str(out))


@pytest.fixture(scope="module")
def stores(
    llama_dir: Path, long_corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, attnstore.Store]:
    root = tmp_path_factory.mktemp("long-stores")
    out = {"ref": _extract(root / "ref.attn", llama_dir, long_corpus)}
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNSTORE_STREAM_BYTES", "0")  # every document streams to its own segment
    try:
        out["stream"] = _extract(root / "stream.attn", llama_dir, long_corpus, overview=16)
        out["rows"] = _extract(root / "rows.attn", llama_dir, long_corpus, rows="0:4,-7:")
    finally:
        mp.undo()
    out["census"] = _extract(
        root / "census.attn", llama_dir, long_corpus, overview=16, scores_only=True
    )
    return out


def test_streamed_store_all_equals_the_in_memory_store(stores: dict[str, attnstore.Store]) -> None:
    ref, streamed = stores["ref"], stores["stream"]
    segments = streamed.sql('SELECT segment, "offset" FROM docs').to_pylist()
    assert len({r["segment"] for r in segments}) == len(segments)  # one segment per document
    assert all(r["offset"] == 0 for r in segments)
    assert sorted(streamed.doc_ids()) == sorted(ref.doc_ids())
    for d in sorted(ref.doc_ids()):
        np.testing.assert_array_equal(streamed.matrices(d), ref.matrices(d))  # lossless: exact
    assert streamed.manifest["format_version"] == "2.1"
    assert verify_store(Path(str(streamed.path))).ok


@pytest.mark.parametrize("name", ["stream", "census"])
def test_overviews_pool_the_stored_matrices(stores: dict[str, attnstore.Store], name: str) -> None:
    ref, store = stores["ref"], stores[name]
    assert store.manifest["overview"] == 16
    for d in sorted(ref.doc_ids()):
        full = ref.matrices(d)
        mx, mean = pool_matrix(full, 16)
        info = store.overview_grid(d)
        assert (info["size"], info["block"], info["n_blocks"]) == (16, *grid(full.shape[-1], 16))
        for layer in range(N_LAYERS):
            for head in range(N_HEADS):
                np.testing.assert_allclose(
                    store.overview(d, layer, head), mx[layer, head], atol=1e-6
                )
                got = store.overview(d, layer, head, kind="mean")
                np.testing.assert_allclose(got, mean[layer, head], atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        store.overview(0, 0, 0, kind="median")


def test_overview_errors(stores: dict[str, attnstore.Store]) -> None:
    with pytest.raises(MatrixNotFoundError, match="--overview"):
        stores["ref"].overview(0, 0, 0)
    with pytest.raises(MatrixNotFoundError, match="No doc_id 999"):
        stores["stream"].overview(999, 0, 0)


def test_row_selected_store(stores: dict[str, attnstore.Store]) -> None:
    ref, rows = stores["ref"], stores["rows"]
    assert rows.manifest["rows"] == "0:4,-7:"
    for d in sorted(ref.doc_ids()):
        full = ref.matrix(d, 2, 1)
        n = full.shape[0]
        assert rows.stored_rows(d).tolist() == sorted(set(range(4)) | set(range(n - 7, n)))
        np.testing.assert_array_equal(rows.matrix(d, 2, 1, rows=slice(0, 4)), full[:4])
        np.testing.assert_array_equal(rows.matrix(d, 2, 1, rows=slice(-7, None)), full[-7:])
        np.testing.assert_array_equal(
            rows.matrices(d, rows=slice(n - 3, n)), ref.matrices(d)[..., -3:, :]
        )
        with pytest.raises(RowsNotStoredError, match="not stored") as err:
            rows.matrix(d, 2, 1, rows=slice(3, 6))
        assert isinstance(err.value, MatrixNotFoundError)
        with pytest.raises(RowsNotStoredError, match="rows=slice"):
            rows.matrix(d, 2, 1)
    assert verify_store(Path(str(rows.path))).ok


def test_rows_are_part_of_the_layout(
    stores: dict[str, attnstore.Store], llama_dir: Path, long_corpus: Path
) -> None:
    from attnstore.errors import IncompatibleStoreError

    with pytest.raises(IncompatibleStoreError, match="rows"):
        _extract(Path(str(stores["ref"].path)), llama_dir, long_corpus, rows="-3:")


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_partial_reads_equal_slices_of_full_reads(
    stores: dict[str, attnstore.Store], data: st.DataObject
) -> None:
    for name in ("ref", "stream"):
        store = stores[name]
        d = data.draw(st.sampled_from(sorted(store.doc_ids())))
        layer, head = (
            data.draw(st.integers(0, N_LAYERS - 1)),
            data.draw(st.integers(0, N_HEADS - 1)),
        )
        full = store.matrix(d, layer, head)
        n = full.shape[0]
        a = data.draw(st.integers(-n, n))
        b = data.draw(st.one_of(st.none(), st.integers(-n, n)))
        got = store.matrix(d, layer, head, rows=slice(a, b))
        np.testing.assert_array_equal(got, full[a:b])
        assert got.dtype == np.float32
        assert got.shape[1] == n


def test_partial_reads_of_the_golden_2_0_store() -> None:
    golden = GOLDEN / "v2.0.attn"
    store = attnstore.open(str(golden))
    for d in sorted(store.doc_ids()):
        full = store.matrices(d)
        np.testing.assert_array_equal(store.matrices(d, rows=slice(1, 3)), full[..., 1:3, :])
        np.testing.assert_array_equal(store.matrix(d, 1, 0, rows=slice(2, None)), full[1, 0, 2:])


# -- a kill in the middle of a long, streaming document ----------------------------------------
def test_kill_in_the_middle_of_a_streamed_document(
    tmp_path: Path, llama_dir: Path, long_corpus: Path, stores: dict[str, attnstore.Store]
) -> None:
    out = tmp_path / "s.attn"
    command = extract_command(
        out, llama_dir, long_corpus, "--batch-size", "2", "--max-length", "120",
        "--codec", "lossless", "--overview", "16",
    )  # fmt: skip
    env = {**os.environ, "ATTNSTORE_STREAM_BYTES": "0", "ATTNSTORE_COMMIT_EVERY": "1",
           "ATTNSTORE_CRASH_AT": "stream:5"}  # fmt: skip
    # 3 layers per document, one shard each: the 5th shard is layer 1 of the 2nd streamed document
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    before = attnstore.open(str(out))
    assert len(before.doc_ids()) < len(stores["stream"].doc_ids())  # that document is not visible
    assert verify_store(out).ok
    del env["ATTNSTORE_CRASH_AT"]
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert verify_store(out).ok
    assert_same_content(store_content(out), store_content(Path(str(stores["stream"].path))))
    again = attnstore.open(str(out))
    for d in sorted(again.doc_ids()):
        np.testing.assert_array_equal(again.overview(d, 1, 2), stores["stream"].overview(d, 1, 2))


# -- the viewer's API on a long document: overviews and partial reads ---------------------------
def test_viewer_api_draws_long_documents_from_overviews(viewer_store: Path) -> None:
    from attnstore.serve import TILE, Viewer
    from tests.viewer_store import LONG, N_SHORT, OVERVIEW, PREV, SINK

    viewer = Viewer([viewer_store])
    store = attnstore.open(str(viewer_store))
    b = LONG // OVERVIEW
    for layer, head in (SINK, PREV):
        body, headers = viewer.overview(
            {"doc": str(N_SHORT), "layer": str(layer), "head": str(head)}
        )
        assert headers["X-Shape"] == f"{OVERVIEW},{OVERVIEW}"
        assert headers["X-Block"] == str(b)
        got = np.frombuffer(body, dtype="<f4").reshape(OVERVIEW, OVERVIEW)
        np.testing.assert_array_equal(got, store.overview(N_SHORT, layer, head))
        # a tile at a pooling that is a multiple of the block comes from the overview, and equals
        # max-pooling the decoded matrix exactly; a finer one from a partial read of its rows
        m = store.matrix(N_SHORT, layer, head)
        for pool, source in ((2 * b, "overview"), (b // 2, "rows")):
            side = LONG // pool
            body, headers = viewer.tile(
                {"doc": str(N_SHORT), "layer": str(layer), "head": str(head), "pool": str(pool),
                 "ty": "0", "tx": "0"}
            )  # fmt: skip
            assert headers["X-Source"] == source
            tile = np.frombuffer(body, dtype="<f4").reshape(min(TILE, side), min(TILE, side))
            want = m.reshape(side, pool, side, pool).max(axis=(1, 3))[:TILE, :TILE]
            np.testing.assert_array_equal(tile, want)
        row = viewer.row({"doc": str(N_SHORT), "layer": str(layer), "head": str(head), "q": "4000"})
        np.testing.assert_array_equal(np.float32(row["values"]), m[4000, :4001])
    viewer.close()


def test_dataset_reads_row_blocks(stores: dict[str, attnstore.Store]) -> None:
    from torch.utils.data import DataLoader

    from attnstore.dataset import AttentionDataset, collate

    ref = stores["ref"]
    ds = AttentionDataset(str(stores["rows"].path), rows=slice(-7, None))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["matrix"].shape[1] == 7
    for i in range(4):
        d, la, h, n = (int(batch[k][i]) for k in ("doc_id", "layer", "head", "n_tokens"))
        want = ref.matrix(d, la, h)[-7:]
        np.testing.assert_array_equal(batch["matrix"][i, :, :n].numpy(), want)
    with pytest.raises(AttnStoreError, match="packed"):
        AttentionDataset(str(stores["rows"].path), rows=slice(0, 1), packed=True)


def test_cli_rows_and_overview(tmp_path: Path, llama_dir: Path, long_corpus: Path) -> None:
    from click.testing import CliRunner

    from attnstore.cli import cli

    out = tmp_path / "cli.attn"
    common = ["extract", "--out", str(out), "-m", str(llama_dir), "-c", str(long_corpus),
              "--limit", "2", "--max-length", "40", "-q"]  # fmt: skip
    bad = CliRunner().invoke(cli, [*common, "--rows", "1:x"])
    assert bad.exit_code != 0
    assert "--rows" in bad.output
    assert not out.exists()  # refused before anything was written
    ok = CliRunner().invoke(cli, [*common, "--rows=-3:", "--rows", "0:2", "--overview", "8"])
    assert ok.exit_code == 0, ok.output
    store = attnstore.open(str(out))
    assert store.manifest["rows"] == "-3:,0:2"
    assert store.manifest["overview"] == 8
    assert store.stored_rows(0).tolist() == [0, 1, 37, 38, 39]
    assert store.overview(0, 0, 0).shape == (8, 8)
