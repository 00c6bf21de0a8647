"""One head's matrix for the viewer: max-pooled tiles, stored overviews, exact rows and columns,
read without decoding more of the matrix than the answer needs."""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from attnstore.viewer.core import Source, ViewerCore
from attnstore.viewer.params import ApiError, int_param

__all__ = ["MAX_SIDE", "TILE", "Tiles"]

#: Side of one heatmap tile, in pooled cells.
TILE: Final = 256
#: The client asks for a pooling factor that keeps the whole matrix within this many cells a side.
MAX_SIDE: Final = 1024


class Tiles(ViewerCore):
    """``/api/tile``, ``/api/overview``, ``/api/row``, ``/api/col``."""

    def _matrix(self, src: Source, params: dict[str, str]) -> tuple[np.ndarray, int, int, int]:
        from attnstore.errors import MatrixNotFoundError

        doc = int_param(params, "doc")
        layer, head = self._layer_head(src, params)
        key = ("m", src.index, doc, layer, head)
        try:
            m = self.cache.get(key, lambda: src.store.matrix(doc, layer, head))
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        return m, doc, layer, head

    def _tokens_of(self, src: Source, params: dict[str, str]) -> tuple[int, int, int, int]:
        """``(doc, layer, head, T)`` of a stored matrix, without reading it."""
        from attnstore.errors import MatrixNotFoundError

        doc = int_param(params, "doc")
        layer, head = self._layer_head(src, params)
        try:
            return doc, layer, head, src.store.n_tokens(doc)
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None

    def _overview_grid(self, src: Source, doc: int) -> dict[str, Any] | None:
        if not src.store.manifest.get("overview"):
            return None
        from attnstore.errors import MatrixNotFoundError

        try:
            return src.store.overview_grid(doc)
        except MatrixNotFoundError:
            return None

    def tile(self, params: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """``/api/tile``: float32 little-endian, row-major, the header ``X-Shape: rows,cols``.

        Cell (i, j) of tile (ty, tx) at pooling ``pool`` is the maximum of the matrix over
        queries ``[(ty·256 + i)·pool, … + pool)`` and keys likewise; max keeps one-cell structures
        (a previous-token diagonal, a sink column) visible at any pooling. A tile never decodes the
        whole matrix: when ``pool`` is a multiple of the stored overview's block it is pooled from
        the ``max`` overview (exactly the same values), otherwise from a partial read of its
        ``256 · pool`` query rows.
        """
        from attnstore.errors import MatrixNotFoundError

        src = self.source(params)
        doc, layer, head, t = self._tokens_of(src, params)
        pool = int_param(params, "pool", 1, 1, max(1, t))
        if pool & (pool - 1):
            raise ApiError(400, f"Expected pool to be a power of two. Got {pool}.")
        side = -(-t // pool)
        n_tiles = -(-side // TILE)
        ty = int_param(params, "ty", 0, 0, n_tiles - 1)
        tx = int_param(params, "tx", 0, 0, n_tiles - 1)
        grid = self._overview_grid(src, doc)
        source = "rows"
        if grid is not None and pool % grid["block"] == 0:
            f = pool // grid["block"]
            source = "overview"

            def pooled() -> np.ndarray:
                # the codec's rounding is monotone, so the max of the stored (rounded) values
                # is the rounded max: these cells equal pooling the decoded matrix exactly
                codec = src.store.codec
                ov = codec.decode(codec.encode(src.store.overview(doc, layer, head, "max")))
                m = ov.shape[0]
                padded = np.zeros((side * f, side * f), dtype=np.float32)
                padded[:m, :m] = ov
                out: np.ndarray = padded.reshape(side, f, side, f).max(axis=(1, 3))
                return out

            key: tuple[Any, ...] = ("o", src.index, doc, layer, head, pool)
        else:
            r0, r1 = ty * TILE * pool, min(t, (ty + 1) * TILE * pool)

            def pooled() -> np.ndarray:
                band = src.store.matrix(doc, layer, head, rows=slice(r0, r1))  # [rows, T]
                if pool == 1:
                    return band
                rows = -(-(r1 - r0) // pool)
                padded = np.zeros((rows * pool, side * pool), dtype=np.float32)
                padded[: r1 - r0, :t] = band  # zero edge rows/columns: attention is never negative
                out: np.ndarray = padded.reshape(rows, pool, side, pool).max(axis=(1, 3))
                return out

            key = ("b", src.index, doc, layer, head, pool, ty)
        try:
            image = self.cache.get(key, pooled)
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        y0 = 0 if source == "rows" else ty * TILE
        block = np.ascontiguousarray(
            image[y0 : y0 + TILE, tx * TILE : (tx + 1) * TILE], dtype="<f4"
        )
        headers = {
            "X-Shape": f"{block.shape[0]},{block.shape[1]}",
            "X-Tokens": str(t),
            "X-Pool": str(pool),
            "X-Source": source,
            "Access-Control-Expose-Headers": "X-Shape, X-Tokens, X-Pool, X-Source",
        }
        return block.tobytes(), headers

    def overview(self, params: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """``/api/overview``: the stored ``--overview`` of one head (``kind`` max or mean),
        float32 little-endian ``[M, M]`` with ``X-Shape``, ``X-Block`` (b) and ``X-Tokens``."""
        from attnstore.errors import MatrixNotFoundError

        src = self.source(params)
        doc, layer, head, t = self._tokens_of(src, params)
        kind = params.get("kind", "max")
        if kind not in ("max", "mean"):
            raise ApiError(400, f"Expected kind max or mean. Got {kind[:20]!r}.")
        grid = self._overview_grid(src, doc)
        if grid is None:
            raise ApiError(404, f"doc {doc} has no overview: extract with --overview N.")
        try:
            image = self.cache.get(
                ("ov", src.index, doc, layer, head, kind),
                lambda: src.store.overview(doc, layer, head, kind),
            )
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        headers = {
            "X-Shape": f"{image.shape[0]},{image.shape[1]}",
            "X-Block": str(grid["block"]),
            "X-Tokens": str(t),
            "Access-Control-Expose-Headers": "X-Shape, X-Block, X-Tokens",
        }
        return np.ascontiguousarray(image, dtype="<f4").tobytes(), headers

    def row(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/row``: exact attention of query ``q`` to keys ``0 … q`` (a partial read of that
        row only)."""
        from attnstore.errors import MatrixNotFoundError

        src = self.source(params)
        doc, layer, head, t = self._tokens_of(src, params)
        q = int_param(params, "q", None, 0, t - 1)
        try:
            m = src.store.matrix(doc, layer, head, rows=slice(q, q + 1))
        except MatrixNotFoundError as err:
            raise ApiError(404, str(err)) from None
        values = m[0, : q + 1].astype(np.float64).tolist()
        return {"doc": doc, "layer": layer, "head": head, "q": q, "values": values}

    def col(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/col``: exact attention to key ``k`` from queries ``k … T − 1``."""
        src = self.source(params)
        m, doc, layer, head = self._matrix(src, params)
        k = int_param(params, "k", None, 0, m.shape[0] - 1)
        values = m[k:, k].astype(np.float64).tolist()
        return {"doc": doc, "layer": layer, "head": head, "k": k, "values": values}
