"""Many writers without typing shards: --shard auto (torchrun, Slurm arrays) and Ray actors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import attnstore
from attnstore.cluster import extract_ray, local_rank_device, shard_from_environment
from attnstore.errors import AttnStoreError, CorpusError
from attnstore.verify import verify_store
from tests.helpers import assert_same_content, extract_command, store_content

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
               "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP")  # fmt: skip
EXTRACT = {"batch_size": 1, "max_length": 32, "progress": False}


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the launcher variables they mean; none leaks in from the machine running them."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine short documents, one empty (skipped, and counted in its shard)."""
    from pydoc_data.topics import topics

    lines = [topics[k][:120].replace("\n", " ") for k in sorted(topics)[:9]]
    lines[4] = ""
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, corpus: Path) -> Path:
    """The same corpus extracted by one plain process: what every distributed run must equal."""
    out = tmp_path_factory.mktemp("single") / "single.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), **EXTRACT)
    return out


# --- shard_from_environment -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "shard"),
    [
        ({}, "0/1"),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, "3/8"),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, "0/4"),
        # --array=1-8: ids start at 1
        (
            {
                "SLURM_ARRAY_TASK_ID": "8",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "8",
                "SLURM_ARRAY_TASK_COUNT": "8",
            },
            "7/8",
        ),
        # --array=10-16:2 → 10, 12, 14, 16
        (
            {
                "SLURM_ARRAY_TASK_ID": "14",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_MAX": "16",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            "2/4",
        ),
        # no COUNT (old Slurm): from MIN/MAX
        (
            {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "7"},
            "0/3",
        ),
        # torchrun with 2 ranks inside task 1 of a 3-task array
        (
            {
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "RANK": "1",
                "WORLD_SIZE": "2",
            },
            "3/6",
        ),
    ],
)
def test_shard_from_environment(env: dict[str, str], shard: str) -> None:
    assert str(shard_from_environment(env)) == shard


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, r"\$RANK is set but \$WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, r"\$WORLD_SIZE is set but \$RANK is not"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, r"0 ≤ \$RANK < \$WORLD_SIZE\. Got RANK=2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, r"integer in \$RANK\. Got 'x'"),
        ({"SLURM_ARRAY_TASK_ID": "3"}, r"neither \$SLURM_ARRAY_TASK_COUNT nor"),
        # --array=1,3,7: not contiguous (count 3, min 1, max 7)
        (
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "7",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            r"task 3 .* not position i of a contiguous",
        ),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, r"contiguous array"),
    ],
)
def test_shard_from_environment_refuses_inconsistent(env: dict[str, str], message: str) -> None:
    with pytest.raises(AttnStoreError, match=message):
        shard_from_environment(env)


@given(
    low=st.integers(0, 50),
    step=st.integers(1, 4),
    tasks=st.integers(1, 6),
    world=st.one_of(st.none(), st.integers(1, 4)),
)
def test_every_launch_is_a_partition(low: int, step: int, tasks: int, world: int | None) -> None:
    """All processes of an array (× torchrun ranks) get distinct shards of one count, covering
    every index: every document lands in exactly one writer."""
    got = []
    for task in range(low, low + tasks * step, step):
        for rank in range(world or 1):
            env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low),
                   "SLURM_ARRAY_TASK_MAX": str(low + (tasks - 1) * step),
                   "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_TASK_COUNT": str(tasks)}  # fmt: skip
            if world is not None:
                env |= {"RANK": str(rank), "WORLD_SIZE": str(world)}
            shard = shard_from_environment(env)
            got.append((shard.index, shard.count))
    n = tasks * (world or 1)
    assert sorted(got) == [(i, n) for i in range(n)]


def test_bad_auto_environment_fails_before_the_model_load(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"RANK": "1"}
    cmd = extract_command(tmp_path / "s.attn", tmp_path / "no-model", tmp_path / "no.txt",
                          "--shard", "auto")  # fmt: skip
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        (
            "Error: --shard auto: $RANK is set but $WORLD_SIZE is not; torchrun sets both. "
            "Launch with torchrun, unset the stray variable, or pass --shard i/n."
        )
    ]


def test_local_rank_without_cuda_keeps_the_default_device() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback; the gpu test covers CUDA")
    assert local_rank_device({"LOCAL_RANK": "1"}) is None
    assert local_rank_device({}) is None


@pytest.mark.gpu
def test_local_rank_picks_the_gpu() -> None:
    import torch

    n = torch.cuda.device_count()
    assert local_rank_device({"LOCAL_RANK": str(n - 1)}) == f"cuda:{n - 1}"
    with pytest.raises(AttnStoreError, match=rf"\$LOCAL_RANK is {n} but this machine has {n}"):
        local_rank_device({"LOCAL_RANK": str(n)})


# --- torchrun ---------------------------------------------------------------------------------


@pytest.mark.slow  # several processes, each importing torch
def test_torchrun_two_ranks_equal_one_process(
    tmp_path: Path, llama_dir: Path, corpus: Path, single: Path
) -> None:
    out = tmp_path / "torchrun.attn"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "attnstore", "extract", "--shard", "auto", "--out", str(out), "-m", str(llama_dir),
        "-c", str(corpus), "--batch-size", "1", "--max-length", "32", "-q", "--json",
    ]  # fmt: skip
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--shard auto: 0/2 (torchrun" in done.stderr
    assert "--shard auto: 1/2 (torchrun" in done.stderr
    ids = attnstore.open(str(out)).sql("SELECT doc_id FROM docs ORDER BY doc_id").column(0)
    assert ids.to_pylist() == list(range(9))
    assert_same_content(store_content(out), store_content(single))
    report = verify_store(out)
    assert report.ok, report.problems


@pytest.mark.slow  # several processes, each importing torch
def test_rerun_of_one_rank_finishes_only_its_own_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, corpus: Path, single: Path
) -> None:
    from attnstore.capture import load_model

    loaded = load_model(str(llama_dir), device="cpu", progress=False)
    out = str(tmp_path / "rerun.attn")

    def rank(r: int, **kw: Any) -> attnstore.ExtractReport:
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        args = EXTRACT | kw
        return attnstore.extract(out, model=loaded, corpus=str(corpus), shard="auto", **args)

    def committed() -> list[int]:
        table = attnstore.open(out).sql("SELECT doc_id FROM docs ORDER BY doc_id")
        return [int(x) for x in table.column(0).to_pylist()]

    first = rank(1, limit=4)  # rank 1 "dies" after doc 3: documents 1 and 3 are in
    assert (first.docs_written, committed()) == (2, [1, 3])
    again = rank(1)  # its rerun does the rest of rank 1's documents, and nothing of rank 0's
    assert (again.docs_written, again.docs_already_committed) == (2, 2)
    assert committed() == [1, 3, 5, 7]
    zero = rank(0)  # rank 0: 0, 2, 6, 8 and the empty document 4
    assert (zero.docs_written, zero.docs_skipped, zero.docs_already_committed) == (
        4,
        {"empty": 1},
        0,
    )
    assert committed() == list(range(9))
    assert_same_content(store_content(Path(out)), store_content(single))


# --- Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # several processes, each importing torch
def test_ray_actors_equal_one_process(
    tmp_path: Path, local_ray: Any, llama_dir: Path, corpus: Path, single: Path
) -> None:
    out = tmp_path / "ray.attn"
    report = extract_ray(
        out, str(corpus), model=str(llama_dir), num_actors=2, batch_rows=3, batch_size=1,
        max_length=32,
    )  # fmt: skip
    assert (report.docs_written, report.docs_skipped) == (8, {"empty": 1})
    assert report.commits >= 3  # at least one per batch_rows of documents
    assert_same_content(store_content(out), store_content(single))
    report = verify_store(out)
    assert report.ok, report.problems
    again = extract_ray(out, str(corpus), model=str(llama_dir), num_actors=1, max_length=32)
    assert (again.docs_written, again.docs_already_committed) == (0, 9)


@pytest.mark.slow  # several processes, each importing torch
def test_ray_actors_store_the_rows_and_overviews_of_one_process(
    tmp_path: Path, local_ray: Any, llama_dir: Path, corpus: Path
) -> None:
    """--rows, --overview and --skip-analysis reach the actors: the same store as extract's."""
    import numpy as np

    settings: dict[str, Any] = {"rows": "0:2,-5:", "overview": 4, "skip_analyses": ("sparsity",),
                                "batch_size": 2, "max_length": 32, "limit": 7}  # fmt: skip
    local, ray_out = tmp_path / "local.attn", tmp_path / "ray.attn"
    attnstore.extract(str(local), model=str(llama_dir), corpus=str(corpus), progress=False,
                      **settings)  # fmt: skip
    report = extract_ray(ray_out, str(corpus), model=str(llama_dir), num_actors=2, batch_rows=3,
                         **settings)  # fmt: skip
    assert (report.docs_written, report.docs_skipped) == (6, {"empty": 1})
    a, b = attnstore.open(str(local)), attnstore.open(str(ray_out))
    for key in ("rows", "overview", "layers", "heads", "codec", "max_length"):
        assert a.manifest[key] == b.manifest[key], key
    assert (b.manifest["rows"], b.manifest["overview"]) == ("0:2,-5:", 4)
    for sql in ("SELECT * EXCLUDE (segment, \"offset\") FROM docs ORDER BY doc_id",
                "SELECT * FROM heads ORDER BY doc_id, layer, head",
                "SELECT doc_id, size, block, n_blocks FROM overviews ORDER BY doc_id",
                "SELECT count(*) FROM sparsity"):  # fmt: skip
        assert a.sql(sql).to_pylist() == b.sql(sql).to_pylist(), sql
    assert a.doc_ids() == b.doc_ids() == set(range(7))
    for d in sorted(a.doc_ids() - {4}):  # 4 is the empty document
        assert a.stored_rows(d).tolist() == b.stored_rows(d).tolist()
        for rows in (slice(0, 2), slice(-5, None)):
            np.testing.assert_array_equal(a.matrices(d, rows=rows), b.matrices(d, rows=rows))
        for kind in ("max", "mean"):
            np.testing.assert_array_equal(a.overview(d, 1, 2, kind), b.overview(d, 1, 2, kind))
    assert verify_store(ray_out).ok


def test_ray_dataset_needs_doc_ids(tmp_path: Path, local_ray: Any, llama_dir: Path) -> None:
    ds = local_ray.data.from_items([{"text": "a"}, {"text": "b"}])
    with pytest.raises(CorpusError, match=r"no column 'doc_id'\. Columns: \['text'\]"):
        extract_ray(tmp_path / "x.attn", ds, model=str(llama_dir))
    assert not (tmp_path / "x.attn").exists()
