"""Many GPUs and machines writing one store: torchrun, Slurm arrays and Ray Data.

Every writer is an ordinary :class:`~attnstore.store.StoreWriter` that owns the documents of its
shard (``doc_id % count == index``) and commits them through the store's own transactions, so a
store filled by 8 GPUs reads exactly like one filled by one process, and a rerun of any writer
skips what it has already committed.

- **torchrun / Slurm**: ``attnstore extract --shard auto`` (see :func:`shard_from_environment`).
- **Ray Data**: :func:`extract_ray` runs a pool of actors (``map_batches`` with
  ``ActorPoolStrategy``), each holding a loaded model and a writer; needs ``attnstore[ray]``.

Nothing here imports torch or ray at module import time.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from attnstore.errors import AttnStoreError, CorpusError
from attnstore.extraction import ExtractConfig, ExtractionRun, ExtractReport
from attnstore.storage import Location, Storage, location_text, open_storage

__all__ = [
    "RAY_DECIDES",
    "AutoShard",
    "extract_ray",
    "local_rank_device",
    "ray_config",
    "shard_from_environment",
]

#: Documents per ``map_batches`` call in :func:`extract_ray`; each actor commits after every call.
RAY_BATCH_ROWS: Final = 64

#: The :class:`~attnstore.extraction.ExtractConfig` fields :func:`extract_ray` sets itself, and why.
RAY_DECIDES: Final = {
    "corpus": "it is the data argument",
    "shard": "Ray spreads the documents over the actors",
    "device": "Ray gives each actor its device (num_gpus)",
}


@dataclass(frozen=True)
class AutoShard:
    """The shard ``--shard auto`` resolved to, and where it came from."""

    index: int
    count: int
    source: str

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise AttnStoreError(
            f"--shard auto: expected an integer in ${name}. Got {value!r}. "
            "Fix the launcher's environment, or pass --shard i/n."
        ) from None


def _torchrun(environ: Mapping[str, str]) -> tuple[int, int] | None:
    have = [k for k in ("RANK", "WORLD_SIZE") if k in environ]
    if not have:
        return None
    if len(have) == 1:
        missing = ({"RANK", "WORLD_SIZE"} - set(have)).pop()
        raise AttnStoreError(
            f"--shard auto: ${have[0]} is set but ${missing} is not; torchrun sets both. "
            "Launch with torchrun, unset the stray variable, or pass --shard i/n."
        )
    rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
    if not 0 <= rank < world:
        raise AttnStoreError(
            f"--shard auto: expected 0 ≤ $RANK < $WORLD_SIZE. Got RANK={rank}, "
            f"WORLD_SIZE={world}. Launch with torchrun, or pass --shard i/n."
        )
    return rank, world


def _slurm_array(environ: Mapping[str, str]) -> tuple[int, int] | None:
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    task = _int_var(environ, "SLURM_ARRAY_TASK_ID")
    low = _int_var(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    step = _int_var(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    if "SLURM_ARRAY_TASK_COUNT" in environ:
        count = _int_var(environ, "SLURM_ARRAY_TASK_COUNT")
    elif "SLURM_ARRAY_TASK_MAX" in environ and step > 0:
        count = (_int_var(environ, "SLURM_ARRAY_TASK_MAX") - low) // step + 1
    else:
        raise AttnStoreError(
            "--shard auto: $SLURM_ARRAY_TASK_ID is set but neither $SLURM_ARRAY_TASK_COUNT nor "
            "$SLURM_ARRAY_TASK_MAX is. Pass --shard i/n."
        )
    fix = (
        "--shard auto needs a contiguous array such as --array=0-7 or --array=1-8 (or 0-14:2); "
        "for other arrays pass --shard i/n yourself."
    )
    contiguous = step >= 1 and count >= 1
    if contiguous and "SLURM_ARRAY_TASK_MAX" in environ:
        high = _int_var(environ, "SLURM_ARRAY_TASK_MAX")
        contiguous = high - low == (count - 1) * step
    offset = task - low
    if not contiguous or offset % step or not 0 <= offset // step < count:
        raise AttnStoreError(
            f"--shard auto: Slurm array task {task} (min {low}, step {step}, count {count}) is "
            f"not position i of a contiguous array. {fix}"
        )
    return offset // step, count


def shard_from_environment(environ: Mapping[str, str]) -> AutoShard:
    """``--shard auto``: this process's shard from its launcher's environment variables.

    - torchrun (``RANK``, ``WORLD_SIZE``): shard ``RANK/WORLD_SIZE``.
    - a Slurm array (``SLURM_ARRAY_TASK_ID``, ``_COUNT``, ``_MIN``, ``_STEP``): the task's
      position in the array, so ``--array=1-8`` gives shards 0/8 … 7/8.
    - both (torchrun inside each task of a Slurm array): shard
      ``task_position * WORLD_SIZE + RANK`` of ``task_count * WORLD_SIZE``.
    - neither: ``0/1``, the whole corpus in this one process.

    Inconsistent variables (``RANK`` without ``WORLD_SIZE``, ``RANK ≥ WORLD_SIZE``, a
    non-contiguous array) raise :class:`~attnstore.errors.AttnStoreError` rather than guess.

    Examples
    --------
    >>> str(shard_from_environment({"RANK": "1", "WORLD_SIZE": "8"}))
    '1/8'
    >>> str(shard_from_environment({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
    ...                             "SLURM_ARRAY_TASK_COUNT": "8"}))
    '2/8'
    """
    torch_part = _torchrun(environ)
    slurm_part = _slurm_array(environ)
    if torch_part and slurm_part:
        (rank, world), (task, tasks) = torch_part, slurm_part
        return AutoShard(task * world + rank, tasks * world, "Slurm array task × torchrun rank")
    if torch_part:
        return AutoShard(*torch_part, "torchrun RANK/WORLD_SIZE")
    if slurm_part:
        return AutoShard(*slurm_part, "Slurm array SLURM_ARRAY_TASK_ID/COUNT")
    return AutoShard(0, 1, "no torchrun or Slurm array variables: one process, every document")


def local_rank_device(environ: Mapping[str, str]) -> str | None:
    """``cuda:LOCAL_RANK`` under torchrun when CUDA is present; ``None`` (the default) otherwise."""
    if "LOCAL_RANK" not in environ:
        return None
    local = _int_var(environ, "LOCAL_RANK")
    import torch

    if not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    if not 0 <= local < n:
        raise AttnStoreError(
            f"--shard auto: $LOCAL_RANK is {local} but this machine has {n} CUDA device(s). "
            "Start at most one process per GPU (torchrun --nproc-per-node), or pass --device."
        )
    return f"cuda:{local}"


class _ExtractActor:
    """One Ray actor: an :class:`~attnstore.extraction.ExtractionRun` (model, extractor, writer);
    one commit per call."""

    def __init__(
        self,
        storage: Storage,
        model: str | None,
        config: ExtractConfig,
        created_at: str,
        use_gpu: bool,
    ) -> None:
        from attnstore.capture import load_model

        # Ray gives a GPU actor its GPU as the only visible device.
        loaded = load_model(
            model, device="cuda" if use_gpu else "cpu", dtype=config.dtype, progress=False
        )
        # Every actor is its own Delta application; all batches of one call are one transaction.
        self.run = ExtractionRun(  # the driver's opened storage, with its options
            storage, loaded, config, app_id=f"ray-{uuid.uuid4().hex[:16]}",
            commit_every=1 << 30, created_at=created_at,
        )  # fmt: skip
        self.out = storage.root
        self.text_field = config.text_field

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from attnstore.corpus import Document

        docs = [
            Document(int(i), "" if t is None else str(t))
            for i, t in zip(batch["doc_id"], batch[self.text_field], strict=True)
        ]
        # Re-read what is committed: Ray may retry a batch on another actor after a failure.
        self.done = self.run.committed()
        status = {d.doc_id: "already committed" for d in docs if d.doc_id in self.done}
        writer = self.run.writer
        flushes = writer.flushes
        tokens: dict[int, int] = {}
        truncated: dict[int, bool] = {}
        report = ExtractReport(path=self.out)
        for group, skipped in self.run.batches(iter(docs), self.done, report):
            self.run.commit(group, skipped)
            for doc, why in skipped:
                status[doc.doc_id] = f"skipped: {why}"
            for tok in group:
                status[tok.doc.doc_id] = "written"
                tokens[tok.doc.doc_id] = len(tok.ids)
                truncated[tok.doc.doc_id] = tok.truncated
        writer.flush()  # one commit per call: nothing stays pending between calls
        commits = writer.flushes - flushes
        ids = [d.doc_id for d in docs]
        return {
            "commits": np.array([commits] + [0] * (len(ids) - 1), dtype=np.int64),
            "doc_id": np.array(ids, dtype=np.int64),
            "status": np.array([status[i] for i in ids], dtype=object),
            "tokens": np.array([tokens.get(i, 0) for i in ids], dtype=np.int64),
            "truncated": np.array([truncated.get(i, False) for i in ids], dtype=bool),
        }


def ray_config(corpus: str, settings: Mapping[str, Any]) -> ExtractConfig:
    """The one :class:`~attnstore.extraction.ExtractConfig` every actor of :func:`extract_ray`
    runs with: ``settings`` are its fields, as :func:`attnstore.extract` takes them, and each one
    reaches the actors; those in :data:`RAY_DECIDES` are refused, an unknown one too.

    >>> ray_config("c.txt", {"rows": "-64:", "overview": 16}).overview
    16
    """
    for name, why in RAY_DECIDES.items():
        if name in settings:
            raise AttnStoreError(f"extract_ray sets {name} itself: {why}. Do not pass {name}=.")
    known = {f.name for f in dataclasses.fields(ExtractConfig)} - set(RAY_DECIDES)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise AttnStoreError(
            f"extract_ray takes no setting {', '.join(unknown)}. Settings: {', '.join(sorted(known))}."
        )
    return ExtractConfig.of(corpus=corpus, **settings)


def extract_ray(
    out: Location,
    data: Any,
    *,
    model: str | None = None,
    num_actors: int = 1,
    num_gpus: float | None = None,
    batch_rows: int = RAY_BATCH_ROWS,
    **settings: Any,
) -> ExtractReport:
    """Extract attention with a pool of Ray actors into one store at ``out``.

    ``data`` is a Ray dataset with an integer ``doc_id`` column and a ``text_field`` column, or a
    corpus spec as for :func:`attnstore.extract` (``doc_id`` is then the position in it, read on
    the driver into Ray's object store). ``num_actors`` actors each load ``model`` once (on one
    GPU each when ``num_gpus`` is 1; the default is 1 when the cluster has GPUs, else 0), take
    ``batch_rows`` documents per call, run them ``batch_size`` per forward pass, commit them
    through their own :class:`~attnstore.store.StoreWriter` and return one small row per document
    (never a matrix). ``out`` must be a path every actor can reach (or an opened
    :class:`~attnstore.storage.Storage`, which the actors receive with its options; the driver
    opens ``out`` once and hands that storage to every actor). Calling it again resumes:
    committed documents are skipped. Ray must be initialised (``ray.init()``) by the caller.

    ``settings`` are those of :func:`attnstore.extract` (the fields of
    :class:`~attnstore.extraction.ExtractConfig`: ``text_field``, ``batch_size``, ``max_length``,
    ``codec``, ``layers``, ``heads``, ``rows``, ``overview``, ``values``, ``scores_only``,
    ``attention``, ``parse``, ``analyses``, ``skip_analyses``, ``limit``, …), built into one
    config (:func:`ray_config`) that every actor runs with, so the store is the one ``extract``
    writes with the same settings; ``corpus``, ``shard`` and ``device`` are Ray's to decide.

    Examples
    --------
    >>> import ray
    >>> ray.init()  # doctest: +SKIP
    >>> ds = ray.data.read_parquet("corpus/").map_batches(add_doc_ids)  # doctest: +SKIP
    >>> report = extract_ray("big.attn", ds, model="HuggingFaceTB/SmolLM2-135M",
    ...                      num_actors=8, num_gpus=1)  # doctest: +SKIP
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise AttnStoreError("extract_ray needs Ray: pip install 'attnstore[ray]'.") from None
    import itertools
    import time

    from attnstore.codecs import get_codec

    started = time.perf_counter()
    for name, value in (("num_actors", num_actors), ("batch_rows", batch_rows)):
        if value < 1:
            raise AttnStoreError(f"{name} must be ≥ 1. Got {value}.")
    # the settings are checked here, once, not in every actor
    config = ray_config(data if isinstance(data, str) else "ray dataset", settings)
    get_codec(config.codec)
    from attnstore.analyses.registry import resolve
    from attnstore.analyses.runner import AnalysisRunner

    AnalysisRunner(resolve(config.analyses))  # an unknown or clashing analysis
    text_field = config.text_field
    if not ray.is_initialized():
        raise AttnStoreError("Ray is not initialised: call ray.init() (or ray.init(address=...)).")
    if isinstance(data, str):
        from attnstore.corpus import read_corpus

        if data.startswith("probe:"):
            raise CorpusError(
                "extract_ray takes text corpora; run the induction probe with extract."
            )
        rows = [
            {"doc_id": d.doc_id, text_field: d.text}
            for d in itertools.islice(read_corpus(data, text_field=text_field), config.limit)
        ]
        if not rows:
            raise CorpusError(f"Corpus {data!r} holds no documents; nothing was written.")
        data = ray.data.from_items(rows)
    elif config.limit is not None:  # a corpus spec is cut as it is read
        data = data.limit(config.limit)
    names = data.schema().names
    for column in ("doc_id", text_field):
        if column not in names:
            raise CorpusError(
                f"The Ray dataset has no column {column!r}. Columns: {names}. extract_ray needs "
                f"'doc_id' (a stable integer per document) and the text in {text_field!r}."
            )
    storage = open_storage(out)  # opened once, here; the actors receive it (it pickles)
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    created_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    rows_out = data.select_columns(["doc_id", text_field]).map_batches(
        _ExtractActor,
        fn_constructor_kwargs={
            "storage": storage, "model": model, "config": config, "created_at": created_at,
            "use_gpu": num_gpus > 0,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_rows,
        batch_format="numpy",
        num_gpus=num_gpus,
    )  # fmt: skip
    report = ExtractReport(path=location_text(out))
    for batch in rows_out.iter_batches(batch_size=1024, batch_format="numpy"):
        report.commits += int(batch["commits"].sum())
        for status, n_tok, cut in zip(
            batch["status"], batch["tokens"], batch["truncated"], strict=True
        ):
            if status == "written":
                report.docs_written += 1
                report.tokens += int(n_tok)
                report.docs_truncated += bool(cut)
            elif status == "already committed":
                report.docs_already_committed += 1
            else:
                why = str(status).removeprefix("skipped: ")
                report.docs_skipped[why] = report.docs_skipped.get(why, 0) + 1
    if report.commits:  # every actor is done: merge many small parts, as extract does
        from attnstore.compact import maybe_compact

        maybe_compact(out)
    report.seconds = round(time.perf_counter() - started, 3)
    return report
