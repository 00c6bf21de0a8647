"""``attnstore verify``: find every way a store can be damaged, with its location.

Checks, in order:

1. the manifest parses and names a readable format version;
2. every commit record parses, was written under the current manifest (its ``manifest_sha256``);
3. every file a record references exists with the recorded size and sha256 (flipped bytes,
   truncated or deleted files are all caught here);
4. the tables agree with each other and with the record: the ``docs`` rows are exactly the record's
   ``doc_ids``, each stored document has ``n_tokens`` token rows and one ``heads`` row per stored
   (layer, head), and no doc_id is committed twice;
5. the segment array has the manifest's shape and dtype, and (unless ``quick``) every stored matrix
   decodes to finite probabilities in [0, 1] whose rows sum to 1 within the codec's bound
   (the packed layout holds no upper triangle, so a decoded matrix is zero above the diagonal by
   construction).

Files no commit record references (left by an interrupted writer, or a writer still running) are
reported as warnings: readers ignore them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnstore.errors import AttnStoreError
from attnstore.layout import COMMITS, MANIFEST_NAME, SEGMENTS, TABLES_DIR, read_manifest
from attnstore.packing import packed_length

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
            "problems": [p.__dict__ for p in self.problems],
        }


def _sha256(path: Path) -> str:
    from attnstore.store import _sha256 as digest

    return digest(path)


def verify_store(path: str | os.PathLike[str], *, quick: bool = False) -> VerifyReport:
    """Check a store; see the module docstring for what is checked."""
    import pyarrow.parquet as pq

    from attnstore.codecs import get_codec

    root = Path(path)
    report = VerifyReport(str(root))
    try:
        manifest = read_manifest(root)
        codec = get_codec(manifest["codec"])
        n_layers, n_heads = len(manifest["layers"]), len(manifest["heads"])
    except (AttnStoreError, KeyError, TypeError) as err:
        report.error(MANIFEST_NAME, f"unreadable manifest: {err}")
        return report
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
            _check_segment(report, root, record["segment"], stored, manifest, codec, quick)
    _report_orphans(report, root, referenced)
    return report


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
    root: Path,
    name: str,
    stored: list[dict[str, Any]],
    manifest: Any,
    codec: Any,
    quick: bool,
) -> None:
    import zarr

    where = f"{SEGMENTS}/{name}"
    try:
        arr = zarr.open_array(root / SEGMENTS / name, mode="r")
    except Exception as err:  # noqa: BLE001 - any unreadable array is a finding
        report.error(where, f"cannot open the Zarr array: {err}")
        return
    expected_shape = (len(manifest["layers"]), len(manifest["heads"]))
    end = max(d["offset"] + packed_length(d["n_tokens"]) for d in stored)
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
        report.error(where, f"cannot decode: {err}")
        return
    for d in stored:
        n = d["n_tokens"]
        probs = codec.decode(data[:, :, d["offset"] : d["offset"] + packed_length(n)])
        report.matrices_checked += probs.shape[0] * probs.shape[1]
        loc = f"{where}:doc_id={d['doc_id']}"
        if not np.isfinite(probs).all():
            report.error(loc, "non-finite values")
            continue
        if probs.min() < 0 or probs.max() > 1 + codec.max_abs_error:
            report.error(loc, f"values outside [0, 1]: {probs.min():.3g} … {probs.max():.3g}")
        # row q of the packed triangle: [q (q + 1) / 2, (q + 1) (q + 2) / 2)
        starts = np.arange(n) * (np.arange(n) + 1) // 2
        sums = np.add.reduceat(probs.astype(np.float64), starts, axis=-1)
        tolerance = (np.arange(n) + 1) * codec.max_abs_error + 1e-5
        bad = np.abs(sums - 1.0) > tolerance
        if bad.any():
            layer_i, head_i, q = (int(x[0]) for x in np.nonzero(bad))
            report.error(
                loc,
                f"{int(bad.sum())} rows do not sum to 1 within the codec's bound, first: "
                f"layer {manifest['layers'][layer_i]}, head {manifest['heads'][head_i]}, "
                f"row {q} sums to {sums[layer_i, head_i, q]:.6f}",
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
