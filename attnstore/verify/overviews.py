"""``attnstore verify`` for overviews (``--overview N``, format 2.1; ``schemas/README.md``).

With ``overview: N`` in the manifest:

1. every stored document has one ``overviews`` row, no other document has one, and each row's
   ``size``, ``block`` and ``n_blocks`` are those of :func:`attnstore.overview.grid` for its length;
2. each ``overviews/<name>`` array a row names stays inside the store, has its shard file, shape
   ``(len(layers), len(heads), 2, ≥ offset + M²)`` and dtype float32;
3. unless ``quick``: every picture is finite, the ``max`` cells lie in [0, 1] and never exceed their
   cell's mass, and each row of the ``mean`` picture sums to 1 (at most 1 in stores whose learned
   sink logits take part of each row's mass) within the float32 rounding of the pooling plus the
   bound the capture checked the rows against;
4. unless ``quick``, where the matrices are stored too: each picture equals the pooling
   (:func:`attnstore.overview.pool_packed`) of the decoded stored rows within the codec's bound, for
   the rows of cells whose query rows are all stored (``--rows``). Stores of ``--values logits``
   skip this comparison: their decoded probabilities carry a relative, not an absolute, error.

Without ``overview`` in the manifest the ``overviews`` table must be empty. Files under
``overviews/`` that no row names are reported as warnings by :mod:`attnstore.verify.format2`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from attnstore.layout import OVERVIEWS, TABLES_DIR
from attnstore.overview import grid, pool_packed

if TYPE_CHECKING:
    from attnstore.storage import Storage
    from attnstore.verify.report import VerifyReport

__all__ = ["OverviewCheck"]

#: float32 rounding of one pooled value ≤ 1 (the pooling sums in float32 on the capture's device)
_F32 = 2.0**-22
_TABLE = f"{TABLES_DIR}/overviews"


class OverviewCheck:
    """The overview checks of one store; :meth:`run` first, then :meth:`compare` per document."""

    def __init__(
        self,
        report: VerifyReport,
        storage: Storage,
        store: Any,
        manifest: Any,
        bound: float,
        quick: bool,
    ) -> None:
        self.report = report
        self.storage = storage
        self.store = store
        self.manifest = manifest
        #: the codec's bound (capture checks every row sum against it, verify every decoded value)
        self.bound = bound
        self.quick = quick
        self.size = int(manifest.get("overview") or 0)
        self.shape = (len(manifest["layers"]), len(manifest["heads"]))
        self.sinks = bool(manifest.get("settings", {}).get("learned_sinks"))
        #: doc_id → (array, offset, n_tokens) of the pictures that passed steps 1–3
        self.sound: dict[int, tuple[str, int, int]] = {}
        self._arrays: dict[str, Any] = {}

    def run(self, referenced: set[str]) -> None:
        """Steps 1–3; adds the files of every overview array a row names to ``referenced``."""
        rows = self.store.sql(
            'SELECT o.doc_id, o.size, o.block, o.n_blocks, o.array, o."offset", d.n_tokens, '
            "d.skipped FROM overviews o LEFT JOIN (SELECT doc_id, any_value(n_tokens) AS n_tokens, "
            "any_value(skipped) AS skipped FROM docs GROUP BY doc_id) d USING (doc_id) "
            'ORDER BY o.array, o."offset"'
        ).to_pylist()
        if not self.size:
            if rows:
                self.report.error(
                    _TABLE, f"{len(rows)} rows, but the manifest records no --overview"
                )
            return
        missing = self.store.sql(
            "SELECT doc_id FROM docs WHERE skipped IS NULL AND doc_id NOT IN "
            "(SELECT doc_id FROM overviews) ORDER BY doc_id LIMIT 20"
        ).column(0)
        for doc_id in missing.to_pylist():
            self.report.error(
                _TABLE, f"doc_id {doc_id}: no overview, though the manifest records "
                f"--overview {self.size}",
            )  # fmt: skip
        seen: set[int] = set()
        by_array: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if self._row_problem(r, seen):
                continue
            by_array.setdefault(r["array"], []).append(r)
        for name, docs in by_array.items():
            self._check_array(name, docs, referenced)

    def _row_problem(self, r: dict[str, Any], seen: set[int]) -> bool:
        where, doc_id = _TABLE, r["doc_id"]
        if doc_id in seen:
            self.report.error(where, f"doc_id {doc_id} has more than one overview row")
            return True
        seen.add(doc_id)
        if r["n_tokens"] is None or r["skipped"] is not None:
            self.report.error(where, f"doc_id {doc_id}: an overview row for a document not stored")
            return True
        b, m = grid(r["n_tokens"], self.size)
        got = (r["size"], r["block"], r["n_blocks"])
        if got != (self.size, b, m) or r["offset"] < 0:
            self.report.error(
                where, f"doc_id {doc_id}: size, block, n_blocks {got} at offset {r['offset']}, "
                f"expected {(self.size, b, m)} for T={r['n_tokens']} at an offset ≥ 0",
            )  # fmt: skip
            return True
        return False

    def _open(self, name: str, referenced: set[str]) -> Any:
        """The array ``overviews/<name>``, or None after reporting why it cannot be read."""
        import zarr

        from attnstore.errors import UnsafeStorePathError
        from attnstore.paths import inside, local_files_inside

        try:  # the one check readers use: an array name never leaves the store
            rel = inside(self.storage, OVERVIEWS, name, source=_TABLE, what="overview array")
            local_files_inside(self.storage, rel, source=_TABLE, what="overview array")
        except UnsafeStorePathError as err:
            self.report.error(_TABLE, str(err))
            return None
        files = {f for f, _ in self.storage.walk(rel)}
        referenced.update(files)
        if f"{rel}/c/0/0/0/0" not in files:  # a missing shard reads as zeros: not a store's data
            self.report.error(f"{rel}/c/0/0/0/0", "missing (the overview array's shard)")
            return None
        self.report.files_checked += 1
        try:
            arr = zarr.open_array(store=self.storage.zarr_store(rel, read_only=True), mode="r")
        except Exception as err:  # noqa: BLE001 - any unreadable array is a finding
            self.report.error(rel, f"cannot open the Zarr array: {err}")
            return None
        self._arrays[name] = arr
        return arr

    def _check_array(self, name: str, docs: list[dict[str, Any]], referenced: set[str]) -> None:
        import attnstore.store.segments  # noqa: F401 - its Blosc guard decodes every chunk read here

        arr = self._open(name, referenced)
        if arr is None:
            return
        where = f"{OVERVIEWS}/{name}"
        end = max(d["offset"] + d["n_blocks"] ** 2 for d in docs)
        if tuple(arr.shape[:3]) != (*self.shape, 2) or len(arr.shape) != 4 or arr.shape[3] < end:
            self.report.error(where, f"shape {arr.shape}, expected {(*self.shape, 2)} × ≥{end}")
            return
        if str(arr.dtype) != "float32":
            self.report.error(where, f"dtype {arr.dtype}, overviews are float32")
            return
        if self.quick:
            for d in docs:
                self.sound[d["doc_id"]] = (name, d["offset"], d["n_tokens"])
            return
        try:
            data = np.asarray(arr[...])
        except Exception as err:  # noqa: BLE001 - a chunk that fails to decode is a finding
            self.report.error(f"{where}/c/0/0/0/0", f"cannot decode: {err}")
            return
        for d in docs:
            m = d["n_blocks"]
            pictures = data[..., d["offset"] : d["offset"] + m * m].reshape(*self.shape, 2, m, m)
            if self._values_sound(f"{where}:doc_id={d['doc_id']}", pictures, d["n_tokens"]):
                self.sound[d["doc_id"]] = (name, d["offset"], d["n_tokens"])
            self.report.overviews_checked += pictures.shape[0] * pictures.shape[1]

    def _values_sound(self, loc: str, pictures: np.ndarray, n: int) -> bool:
        """Step 3 for one document's ``[layer, head, 2, M, M]`` pictures."""
        if not np.isfinite(pictures).all():
            self.report.error(loc, "overview: non-finite values")
            return False
        mx, mean = pictures[:, :, 0].astype(np.float64), pictures[:, :, 1].astype(np.float64)
        b, m = grid(n, self.size)
        counts = np.minimum(b, n - np.arange(m) * b)  # query rows per row of cells
        widest = np.minimum(n, (np.arange(m) + 1) * b) if self.causal else np.full(m, n)
        tolerance = 1e-5 + widest * (self.bound + _F32)  # per row of cells
        sound = True
        if mx.min() < 0 or mx.max() > 1 + 1e-6:
            self.report.error(loc, f"overview max outside [0, 1]: {mx.min():.3g} … {mx.max():.3g}")
            sound = False
        over = mx - mean * counts[:, None] > tolerance[:, None]
        if over.any():
            layer_i, head_i, i, j = (int(x[0]) for x in np.nonzero(over))
            self.report.error(
                loc, f"overview max above its cell's mass in {int(over.sum())} cells, first: "
                f"{self._head(layer_i, head_i)}, cell ({i}, {j})",
            )  # fmt: skip
            sound = False
        sums = mean.sum(-1)
        bad = (sums - 1.0 > tolerance) | (mean.min(-1) < 0)
        if not self.sinks:  # a learned sink takes part of each row's mass (heads.learned_sink)
            bad |= 1.0 - sums > tolerance
        if bad.any():
            layer_i, head_i, i = (int(x[0]) for x in np.nonzero(bad))
            self.report.error(
                loc, f"{int(bad.sum())} rows of the mean overview do not sum to 1, first: "
                f"{self._head(layer_i, head_i)}, row {i} sums to {sums[layer_i, head_i, i]:.6f}",
            )  # fmt: skip
            sound = False
        return sound

    @property
    def causal(self) -> bool:
        return bool(self.manifest.get("attention") != "bidirectional")

    def _head(self, layer_i: int, head_i: int) -> str:
        return f"layer {self.manifest['layers'][layer_i]}, head {self.manifest['heads'][head_i]}"

    def compare(
        self,
        doc_id: int,
        probs: np.ndarray,
        rows: np.ndarray,
        starts: np.ndarray,
        widths: np.ndarray,
    ) -> None:
        """Step 4 for one document: its decoded stored rows ``probs [layer, head, S]`` (row
        ``rows[k]`` at ``starts[k] … starts[k] + widths[k]``) against its stored pictures."""
        hit = self.sound.get(int(doc_id))
        if hit is None or self.manifest.get("values") == "logits":
            return
        name, offset, n = hit
        b, m = grid(n, self.size)
        try:
            stored = np.asarray(self._arrays[name][..., offset : offset + m * m])
        except Exception as err:  # noqa: BLE001 - a chunk that fails to decode is a finding
            self.report.error(f"{OVERVIEWS}/{name}/c/0/0/0/0", f"cannot decode: {err}")
            return
        stored = stored.reshape(*self.shape, 2, m, m).astype(np.float64)
        # max: one decoded value; mean: b keys of each query row, averaged over the rows
        allowed = {"max": self.bound + 1e-6, "mean": b * (self.bound + _F32) + 1e-6}
        worst = dict.fromkeys(allowed, 0.0)
        first: dict[str, str] = {}
        for li in range(self.shape[0]):  # a layer at a time: memory of one layer's pooling
            mx, mean, complete = pool_packed(probs[li], rows, starts, widths, self.size, n)
            cells = np.flatnonzero(complete)
            for k, (kind, pooled) in enumerate((("max", mx), ("mean", mean))):
                diff = np.abs(stored[li, :, k] - pooled)[:, cells]  # [head, complete rows, M]
                worst[kind] = max(worst[kind], float(diff.max(initial=0.0)))
                if kind not in first and (diff > allowed[kind]).any():
                    head_i, i, j = (int(x[0]) for x in np.nonzero(diff > allowed[kind]))
                    first[kind] = f"{self._head(li, head_i)}, cell ({cells[i]}, {j})"
        for kind, where in first.items():
            self.report.error(
                f"{OVERVIEWS}/{name}:doc_id={doc_id}",
                f"overview {kind} differs from the pooled stored matrices by up to "
                f"{worst[kind]:.3g} (allowed {allowed[kind]:.3g}), first: {where}",
            )
