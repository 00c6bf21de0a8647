"""``attnstore verify`` of one segment: its shape and dtype, and (unless ``quick``) every stored
matrix decoded to finite probabilities whose rows sum to 1 within the codec's bound."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from attnstore.layout import SEGMENTS
from attnstore.packing import packed_size, row_index

if TYPE_CHECKING:
    from attnstore.verify.overviews import OverviewCheck
    from attnstore.verify.report import VerifyReport

__all__ = ["check_segment"]


def check_segment(
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
