"""``attnstore verify`` of a format-1 store (a local folder): commit records, their sha256
checksums, the tables of each record and its segment."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from attnstore.layout import COMMITS, MANIFEST_NAME, SEGMENTS, TABLES_DIR
from attnstore.verify.report import Problem, VerifyReport
from attnstore.verify.segments import check_segment

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["verify_v1"]


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_v1(report: VerifyReport, root: Path, manifest: Any, codec: Any, quick: bool) -> None:
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
            check_segment(
                report, root / SEGMENTS / record["segment"], record["segment"], stored, manifest,
                codec, quick,
            )  # fmt: skip
    _report_orphans(report, root, referenced)


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
