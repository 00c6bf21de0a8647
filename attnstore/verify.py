"""``attnstore verify``: find every way a store can be damaged, with its location.

Format 2 (Delta tables), in order:

1. the manifest parses and names a readable format version (a folder without one is not a store:
   that is an error of the call, not damage);
2. every writer file (``writers/<app>.json``) parses and was written under the current manifest
   (its ``manifest_sha256``); an interrupted flush is a warning (the next writer or ``compact``
   finishes it);
3. every Delta table's log opens, and every file its snapshot references exists with the size the
   log recorded; unless ``quick``, every Parquet file is read back with its page checksums;
4. the tables agree with each other: no doc_id in ``docs`` twice, each stored document has
   ``n_tokens`` token rows and one ``heads`` row per stored (layer, head), skipped ones none;
5. each segment the ``docs`` table points at has its shard file, the manifest's shape and dtype, and
   (unless ``quick``) every stored matrix decodes (each chunk carries a crc32c) to finite
   probabilities in [0, 1] whose rows sum to 1 within the codec's bound;
6. with ``--overview N`` (2.1), each stored document's overviews are where the ``overviews`` table
   says, with the right shape and dtype, and (unless ``quick``) sound pictures equal to the pooling
   of the stored matrices where those are stored (:mod:`attnstore.verify_overviews`).

Files nothing references (left by an interrupted writer, or removed by ``compact`` and waiting for
its retention period) are reported as warnings: readers ignore them.

Format 1 stores are checked as before: commit records, their sha256 checksums, the same table and
matrix checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attnstore.analyses import tables as plugin_tables
from attnstore.errors import AttnStoreError, StoreNotFoundError
from attnstore.layout import (
    COMMITS,
    MANIFEST_NAME,
    OVERVIEWS,
    SEGMENTS,
    TABLES_DIR,
    WRITERS,
    parse_format_version,
)
from attnstore.packing import packed_size, row_index
from attnstore.verify_overviews import OverviewCheck

if TYPE_CHECKING:
    from attnstore.storage import Storage

__all__ = ["Problem", "VerifyReport", "verify_store"]


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    location: str  # a path relative to the store, with a detail after ':' where useful
    message: str


@dataclass
class VerifyReport:
    path: str
    commits: int = 0
    files_checked: int = 0
    matrices_checked: int = 0
    #: (document, layer, head) overviews whose values were checked (``--overview N``)
    overviews_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def error(self, location: str, message: str) -> None:
        self.problems.append(Problem("error", location, message))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "commits": self.commits,
            "files_checked": self.files_checked,
            "matrices_checked": self.matrices_checked,
            "overviews_checked": self.overviews_checked,
            "problems": [p.__dict__ for p in self.problems],
        }


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_store(
    path: str | os.PathLike[str],
    *,
    quick: bool = False,
    storage_options: dict[str, str] | None = None,
) -> VerifyReport:
    """Check a store (a folder or a URL); see the module docstring for what is checked."""
    from attnstore.codecs import get_codec
    from attnstore.storage import is_url, open_storage
    from attnstore.store.manifest import read_store_manifest

    storage = open_storage(path, storage_options)
    root = Path(path) if not is_url(path) else Path(storage.root)  # format 1: local folders only
    report = VerifyReport(storage.root if is_url(path) else str(root))
    if not storage.exists(MANIFEST_NAME):
        read_store_manifest(storage)  # raises the "not an attnstore store" error with the reason
        raise StoreNotFoundError(f"{str(path)!r} is not an attnstore store.")  # pragma: no cover
    try:
        manifest = read_store_manifest(storage)
        codec = get_codec(manifest["codec"])
        major = parse_format_version(manifest["format_version"])[0]
    except (AttnStoreError, KeyError, TypeError) as err:
        report.error(MANIFEST_NAME, f"unreadable manifest: {err}")
        return report
    if major >= 2:
        _verify_v2(report, storage, manifest, codec, quick)
    else:
        _verify_v1(report, root, manifest, codec, quick)
    return report


def _verify_v1(report: VerifyReport, root: Path, manifest: Any, codec: Any, quick: bool) -> None:
    import pyarrow.parquet as pq

    from attnstore.errors import UnsafeStorePathError
    from attnstore.paths import relative_name

    n_layers, n_heads = len(manifest["layers"]), len(manifest["heads"])
    manifest_sha = _sha256(root / MANIFEST_NAME)
    referenced: set[str] = set()
    seen_docs: dict[int, str] = {}
    for record_path in sorted((root / COMMITS).glob("*.json")):
        rel_record = f"{COMMITS}/{record_path.name}"
        referenced.add(rel_record)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            files: dict[str, dict[str, Any]] = record["files"]
            tables: dict[str, str] = record["tables"]
            doc_ids = [int(d) for d in record["doc_ids"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            report.error(rel_record, f"unreadable commit record: {err}")
            continue
        try:  # the one check readers use: a record never names a file outside the store
            for name in [
                *files,
                *tables.values(),
                *([record["segment"]] if record.get("segment") else []),
            ]:
                relative_name(name, source=rel_record, what="file")
        except UnsafeStorePathError as err:
            report.error(rel_record, str(err))
            continue
        report.commits += 1
        if record.get("manifest_sha256") != manifest_sha:
            report.error(
                MANIFEST_NAME,
                f"the manifest changed after {rel_record} was committed (sha256 differs); "
                "settings no longer describe the stored data",
            )
        intact = True
        for rel, meta in files.items():
            referenced.add(rel)
            report.files_checked += 1
            f = root / rel
            if not f.is_file():
                report.error(rel, f"missing (referenced by {rel_record})")
                intact = False
            elif f.stat().st_size != meta["bytes"]:
                report.error(rel, f"size {f.stat().st_size} bytes, recorded {meta['bytes']}")
                intact = False
            elif _sha256(f) != meta["sha256"]:
                report.error(rel, "content differs from the checksum recorded at commit")
                intact = False
        for d in doc_ids:
            if d in seen_docs:
                report.error(rel_record, f"doc_id {d} is also committed by {seen_docs[d]}")
            seen_docs[d] = rel_record
        if not intact or "docs" not in tables:  # annotation commits carry no documents
            continue
        try:
            docs = pq.read_table(root / tables["docs"]).to_pylist()
            tokens = pq.read_table(root / tables["tokens"], columns=["doc_id"])
            heads = pq.read_table(root / tables["heads"], columns=["doc_id"])
        except Exception as err:  # noqa: BLE001 - any unreadable table is a finding
            report.error(rel_record, f"tables unreadable: {err}")
            continue
        _check_tables(report, rel_record, doc_ids, docs, tokens, heads, n_layers * n_heads)
        stored = [d for d in docs if d["skipped"] is None]
        if record.get("segment") and stored:
            _check_segment(
                report, root / SEGMENTS / record["segment"], record["segment"], stored, manifest,
                codec, quick,
            )  # fmt: skip
    _report_orphans(report, root, referenced)


def _verify_v2(
    report: VerifyReport, storage: Storage, manifest: Any, codec: Any, quick: bool
) -> None:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from attnstore.errors import UnsafeStorePathError
    from attnstore.paths import inside, local_files_inside
    from attnstore.store.delta import open_table
    from attnstore.store.deltalog import table_path
    from attnstore.store.reader import Store

    manifest_sha = hashlib.sha256(storage.read_bytes(MANIFEST_NAME)).hexdigest()
    # 2. writer files
    committed = ""
    for name in storage.list(WRITERS):
        if not name.endswith(".json"):
            continue
        rel = f"{WRITERS}/{name}"
        try:
            state = json.loads(storage.read_bytes(rel))
            pending = state["pending"]
            sha = state["manifest_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            report.error(rel, f"unreadable writer file: {err}")
            continue
        if sha != manifest_sha:
            report.error(
                MANIFEST_NAME,
                f"the manifest changed after {rel} committed (sha256 differs); "
                "settings no longer describe the stored data",
            )
        if state.get("version", 0) > (1 if pending else 0):
            committed = rel
        if pending:
            report.problems.append(
                Problem(
                    "warning", rel, f"flush {pending.get('version')} was interrupted; the next "
                    "writer or `attnstore compact` finishes it (readers do not see it)",
                )
            )  # fmt: skip
    # 3. Delta logs and the files they reference
    referenced: set[str] = set()
    intact = True
    try:  # built-in, then plug-in tables (analyses)
        schemas = plugin_tables.schemas(storage)
    except Exception as err:  # noqa: BLE001 - an unreadable registration is a finding
        report.error(plugin_tables.ANALYSES_DIR, f"unreadable plug-in table registration: {err}")
        schemas = plugin_tables.schemas(None)
    for name in schemas:
        base = table_path(name)
        if not storage.exists(f"{base}/_delta_log"):  # no writer committed to it yet
            if name == "docs" and committed:
                report.error(f"{base}/_delta_log", f"missing, though {committed} committed")
            continue
        try:
            dt = open_table(storage, name)
            if dt is None:
                report.error(f"{base}/_delta_log", "not a Delta table (no readable log)")
                intact = False
                continue
            actions = pa.table(dt.get_add_actions(flatten=True))
        except Exception as err:  # noqa: BLE001 - an unreadable log is a finding
            report.error(f"{base}/_delta_log", f"unreadable Delta log: {err}")
            intact = False
            continue
        if name == "docs":
            report.commits = dt.version()
        sizes = dict(storage.walk(base))
        for rel_file, size in zip(
            actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), strict=True
        ):
            try:  # the one check readers use: an add path never leaves the store
                rel = inside(
                    storage, base, rel_file, source=f"{base}/_delta_log", what="add path", uri=True
                )
            except UnsafeStorePathError as err:
                report.error(f"{base}/_delta_log", str(err))
                intact = False
                continue
            referenced.add(rel)
            report.files_checked += 1
            if rel not in sizes:
                report.error(rel, f"missing (referenced by the Delta log of {name!r})")
                intact = False
            elif sizes[rel] != size:
                report.error(rel, f"size {sizes[rel]} bytes, the Delta log recorded {size}")
                intact = False
            elif not quick:
                try:
                    pq.read_table(
                        storage.arrow_path(storage.table_uri(rel)),
                        filesystem=storage.arrow_filesystem(),
                        page_checksum_verification=True,
                    )
                except Exception as err:  # noqa: BLE001 - an unreadable part is a finding
                    report.error(rel, f"unreadable Parquet: {err}")
                    intact = False
    if intact:
        store: Store | None = None
        try:
            store = Store(storage.root, storage_options=getattr(storage, "options", None))
            _check_tables_v2(report, store, len(manifest["layers"]) * len(manifest["heads"]))
            docs = store.sql(
                'SELECT doc_id, n_tokens, segment, "offset" FROM docs '
                "WHERE skipped IS NULL AND segment IS NOT NULL ORDER BY segment, doc_id"
            ).to_pylist()
        except Exception as err:  # noqa: BLE001 - any unreadable table is a finding
            report.error(TABLES_DIR, f"tables unreadable: {err}")
            docs = []
            store = None
        overviews = None
        if store is not None:
            overviews = OverviewCheck(report, storage, store, manifest, codec.max_abs_error, quick)
            try:
                overviews.run(referenced)
            except Exception as err:  # noqa: BLE001 - an unreadable table is a finding
                report.error(f"{TABLES_DIR}/overviews", f"unreadable: {err}")
        by_segment: dict[str, list[dict[str, Any]]] = {}
        for d in docs:
            by_segment.setdefault(d["segment"], []).append(d)
        for segment, stored in by_segment.items():
            try:  # the one check readers use: a segment name never leaves the store
                seg_rel = inside(storage, SEGMENTS, segment, source="tables/docs", what="segment")
                local_files_inside(storage, seg_rel, source="tables/docs", what="segment")
            except UnsafeStorePathError as err:
                report.error(f"{TABLES_DIR}/docs", str(err))
                continue
            files = {rel for rel, _ in storage.walk(f"{SEGMENTS}/{segment}")}
            referenced.update(files)
            if f"{SEGMENTS}/{segment}/c/0/0/0" not in files:
                report.error(f"{SEGMENTS}/{segment}/c/0/0/0", "missing (the segment's shard)")
                continue
            report.files_checked += 1
            array = storage.zarr_store(f"{SEGMENTS}/{segment}", read_only=True)
            _check_segment(report, array, segment, stored, manifest, codec, quick, overviews)
    _report_orphans_v2(report, storage, referenced)


def _check_tables_v2(report: VerifyReport, store: Any, per_doc_heads: int) -> None:
    """Cross-table counts with SQL over the whole store (streams, whatever its size)."""
    twice = store.sql(
        "SELECT doc_id FROM docs GROUP BY doc_id HAVING count(*) > 1 ORDER BY doc_id LIMIT 20"
    ).column(0)
    for doc_id in twice.to_pylist():
        report.error(f"{TABLES_DIR}/docs", f"doc_id {doc_id} is committed twice")
    checks = (
        ("tokens", "token rows", "CASE WHEN d.skipped IS NULL THEN d.n_tokens ELSE 0 END"),
        ("heads", "heads rows", f"CASE WHEN d.skipped IS NULL THEN {per_doc_heads} ELSE 0 END"),
    )
    for table, what, expected in checks:
        rows = store.sql(
            f"WITH c AS (SELECT doc_id, count(*) AS n FROM {table} GROUP BY doc_id), "
            "d AS (SELECT doc_id, any_value(n_tokens) AS n_tokens, any_value(skipped) AS skipped "
            "FROM docs GROUP BY doc_id) "
            f"SELECT coalesce(d.doc_id, c.doc_id) AS doc_id, coalesce(c.n, 0) AS n, "
            f"coalesce({expected}, 0) AS expected FROM d FULL JOIN c USING (doc_id) "
            f"WHERE coalesce(c.n, 0) <> coalesce({expected}, 0) ORDER BY 1 LIMIT 20"
        ).to_pylist()
        for r in rows:
            report.error(
                f"{TABLES_DIR}/{table}",
                f"doc_id {r['doc_id']}: {r['n']} {what}, expected {r['expected']}",
            )


def _report_orphans_v2(report: VerifyReport, storage: Storage, referenced: set[str]) -> None:
    for folder in (SEGMENTS, OVERVIEWS, TABLES_DIR):
        for rel, _ in storage.walk(folder):
            if rel in referenced or "/_delta_log/" in rel:
                continue
            report.problems.append(
                Problem(
                    "warning",
                    rel,
                    "not referenced by the store (left by an interrupted writer, or replaced by "
                    "`compact` and deleted after its retention period); ignored by readers",
                )
            )


def _check_tables(
    report: VerifyReport,
    where: str,
    doc_ids: list[int],
    docs: list[dict[str, Any]],
    tokens: Any,
    heads: Any,
    per_doc_heads: int,
) -> None:
    if sorted(d["doc_id"] for d in docs) != sorted(doc_ids):
        report.error(where, "docs rows differ from the doc_ids of the commit record")
    tok_counts = dict(zip(*np.unique(tokens["doc_id"].to_numpy(), return_counts=True), strict=True))
    head_counts = dict(zip(*np.unique(heads["doc_id"].to_numpy(), return_counts=True), strict=True))
    for d in docs:
        expected_tokens = d["n_tokens"] if d["skipped"] is None else 0
        if tok_counts.get(d["doc_id"], 0) != expected_tokens:
            report.error(
                where,
                f"doc_id {d['doc_id']}: {tok_counts.get(d['doc_id'], 0)} token rows, "
                f"expected {expected_tokens}",
            )
        expected_heads = per_doc_heads if d["skipped"] is None else 0
        if head_counts.get(d["doc_id"], 0) != expected_heads:
            report.error(
                where,
                f"doc_id {d['doc_id']}: {head_counts.get(d['doc_id'], 0)} heads rows, "
                f"expected {expected_heads}",
            )


def _check_segment(
    report: VerifyReport,
    array_store: Any,
    name: str,
    stored: list[dict[str, Any]],
    manifest: Any,
    codec: Any,
    quick: bool,
    overviews: OverviewCheck | None = None,
) -> None:
    """``overviews``: compares each document's overviews with its decoded rows when they pass."""
    import zarr

    import attnstore.store.segments  # noqa: F401 - its Blosc guard decodes every chunk read here

    where = f"{SEGMENTS}/{name}"
    try:
        arr = zarr.open_array(store=array_store, mode="r")
    except Exception as err:  # noqa: BLE001 - any unreadable array is a finding
        report.error(where, f"cannot open the Zarr array: {err}")
        return
    from attnstore.rows import DocRows, RowSelection

    selection = RowSelection.parse(manifest.get("rows"))  # 2.1: --rows stores fewer rows
    expected_shape = (len(manifest["layers"]), len(manifest["heads"]))
    packing = manifest.get("packing") or "tril-rowmajor"
    sinks = bool(manifest.get("settings", {}).get("learned_sinks"))
    logits = manifest.get("values") == "logits"  # packed logits, then T row LSEs (2.1)
    full = packing == "full-rowmajor"  # an encoder's squares (2.1); --rows is refused with them

    def stored_size(n: int) -> int:
        size = packed_size(n, packing) if full else DocRows.of(selection, n).length
        return size + (n if logits else 0)

    end = max(d["offset"] + stored_size(d["n_tokens"]) for d in stored)
    if tuple(arr.shape[:2]) != expected_shape or arr.shape[2] < end:
        report.error(where, f"shape {arr.shape}, expected {expected_shape} × ≥{end}")
        return
    if str(arr.dtype) != codec.dtype:
        report.error(where, f"dtype {arr.dtype}, the manifest's codec stores {codec.dtype}")
        return
    if quick:
        return
    try:
        data = np.asarray(arr[...])
    except Exception as err:  # noqa: BLE001 - a chunk that fails to decode is a finding
        report.error(f"{where}/c/0/0/0", f"cannot decode: {err}")
        return
    for d in stored:
        n = d["n_tokens"]
        probs = codec.decode(data[:, :, d["offset"] : d["offset"] + stored_size(n)])
        if logits:  # probabilities = exp(logit − the row's log-sum-exp)
            size = packed_size(n, packing)
            with np.errstate(under="ignore", invalid="ignore"):
                probs = np.exp(
                    probs[..., :size].astype(np.float64)
                    - probs[..., size:][..., row_index(n, packing)].astype(np.float64)
                )
        report.matrices_checked += probs.shape[0] * probs.shape[1]
        loc = f"{where}:doc_id={d['doc_id']}"
        found = len(report.problems)
        if not np.isfinite(probs).all():
            report.error(loc, "non-finite values")
            continue
        if probs.min() < 0 or probs.max() > 1 + codec.max_abs_error:
            report.error(loc, f"values outside [0, 1]: {probs.min():.3g} … {probs.max():.3g}")
        if full:  # an encoder's square: row q at [q n, (q + 1) n)
            rows = np.arange(n)
            starts = rows * n
            tolerance = n * codec.max_abs_error + 1e-5 + np.zeros(n)
        else:  # stored row k (query rows[k]) of the packed data: [starts[k], starts[k + 1])
            doc_rows = DocRows.of(selection, n)
            rows, starts = doc_rows.rows, doc_rows.starts[:-1]
            tolerance = (rows + 1) * codec.max_abs_error + 1e-5
        if not len(rows):
            continue
        widths = np.full(n, n) if full else rows + 1
        sums = np.add.reduceat(probs.astype(np.float64), starts, axis=-1)
        if sinks:  # a learned sink logit takes part of each row's mass (heads.learned_sink)
            bad = sums - 1.0 > tolerance
        else:
            bad = np.abs(sums - 1.0) > tolerance
        if bad.any():
            layer_i, head_i, q = (int(x[0]) for x in np.nonzero(bad))
            report.error(
                loc,
                f"{int(bad.sum())} rows do not sum to 1 within the codec's bound, first: "
                f"layer {manifest['layers'][layer_i]}, head {manifest['heads'][head_i]}, "
                f"row {rows[q]} sums to {sums[layer_i, head_i, q]:.6f}",
            )
        if overviews is not None and len(report.problems) == found:
            # sound matrices: the overviews must be their pooling
            overviews.compare(d["doc_id"], probs, rows, starts, widths)


def _report_orphans(report: VerifyReport, root: Path, referenced: set[str]) -> None:
    for folder in (SEGMENTS, TABLES_DIR, COMMITS):
        base = root / folder
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            rel = str(f.relative_to(root))
            if f.is_file() and rel not in referenced and rel != f"{SEGMENTS}/zarr.json":
                report.problems.append(
                    Problem(
                        "warning", rel, "not referenced by any commit record (ignored by readers)"
                    )
                )
