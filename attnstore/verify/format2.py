"""``attnstore verify`` of a format-2 store: writer files, Delta logs and the files they reference,
the tables' agreement, segments and overviews, and files nothing references."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from attnstore.analyses import tables as plugin_tables
from attnstore.layout import MANIFEST_NAME, OVERVIEWS, SEGMENTS, TABLES_DIR, WRITERS
from attnstore.verify.overviews import OverviewCheck
from attnstore.verify.report import Problem, VerifyReport
from attnstore.verify.segments import check_segment

if TYPE_CHECKING:
    from attnstore.storage import Storage

__all__ = ["verify_v2"]


def verify_v2(
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
            store = Store(storage)  # the opened storage, with its options
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
            check_segment(report, array, segment, stored, manifest, codec, quick, overviews)
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
