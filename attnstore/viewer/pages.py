"""The viewer's pages as JSON: the stores (``/api/meta``), the head grid and summary, one head, one
document, and documents paired across stores by text."""

from __future__ import annotations

from typing import Any, Final

from attnstore.viewer.core import Source, ViewerCore
from attnstore.viewer.params import ApiError, int_param
from attnstore.viewer.tiles import MAX_SIDE, TILE
from attnstore.viewer.values import ident, jsonable, records

__all__ = ["AGGREGATES", "Pages"]

AGGREGATES: Final = ("mean", "median", "p90", "max", "min")
_AGG_SQL: Final = {
    "median": "quantile_cont({c}, 0.5)",
    "p90": "quantile_cont({c}, 0.9)",
    "max": "max({c})",
    "min": "min({c})",
}


class Pages(ViewerCore):
    """``/api/meta``, ``/api/heads``, ``/api/grid``, ``/api/head``, ``/api/doc``, ``/api/pair``."""

    # -- pages -------------------------------------------------------------------------------
    def meta(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/meta``: what each store holds."""
        out = []
        for src in self.sources:
            m = src.store.manifest
            _, rows, _ = self.query(src, "SELECT max(n_tokens) FROM docs WHERE skipped IS NULL")
            out.append(
                {
                    "store": src.index,
                    "name": src.name,
                    "model": m["model"]["id"],
                    "codec": m["codec"]["id"],
                    # "bidirectional": an encoder's whole squares (the viewer draws every tile)
                    "attention": "bidirectional" if src.store.bidirectional else "causal",
                    "layers": m["layers"],
                    "heads": m["heads"],
                    "docs": src.n_docs,
                    "max_tokens": rows[0][0],
                    "scores": src.scores,
                    "syntax": src.has_syntax,
                    "semantic": src.has_semantic,
                    "overview": m.get("overview"),
                    "rows": m.get("rows"),
                }
            )
        return {
            "stores": out,
            "aggregates": list(AGGREGATES),
            "tile": TILE,
            "max_side": MAX_SIDE,
            "row_cap": self.row_cap,
            "time_limit_s": self.time_limit,
        }

    def heads(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/heads``: every ``head_summary`` row."""
        src = self.source(params)
        columns, rows, _ = self.query(src, "SELECT * FROM head_summary ORDER BY layer, head")
        return {
            "columns": columns,
            "rows": records(columns, rows),
        }

    def grid(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/grid``: one value per stored (layer, head), in layer-major order.

        ``score`` is a score column, ``label`` (the head's label) or, when the store has parses,
        ``syntactic`` (the best gain over the fixed-offset baseline among relations with n ≥ 30),
        or, when it has span probes, ``semantic`` (the best gain over the probe baseline among
        probe kinds with n ≥ 30).
        ``agg`` is ``mean`` (count-weighted, as ``head_summary``), ``median``, ``p90``, ``max`` or ``min``
        over documents.
        """
        from attnstore import catalog
        from attnstore.query import SYNTACTIC_MIN_N

        src = self.source(params)
        score = params.get("score", "prev_token" if "prev_token" in src.scores else src.scores[0])
        agg = params.get("agg", "mean")
        if agg not in AGGREGATES:
            raise ApiError(400, f"Expected agg to be one of {', '.join(AGGREGATES)}. Got {agg!r}.")
        if score == "label":
            sql = "SELECT layer, head, label AS value, label FROM head_summary"
        elif score == "syntactic":
            if not src.has_syntax:
                raise ApiError(
                    400,
                    f"Store {src.name!r} has no syntactic results ({catalog.SYNTAX.what}): "
                    f"{catalog.SYNTAX.remedy}; or pick a score.",
                )
            sql = catalog.grid_sql("syntax", SYNTACTIC_MIN_N)
        elif score == "semantic":
            if not src.has_semantic:
                raise ApiError(
                    400,
                    f"Store {src.name!r} has no span-probe results ({catalog.PROBE.what}): "
                    f"{catalog.PROBE.remedy}; or pick a score.",
                )
            sql = catalog.grid_sql("probe", SYNTACTIC_MIN_N)
        else:
            score = self._score(src, params, "score", score)
            if agg == "mean":
                sql = f"SELECT layer, head, {ident(score)} AS value, label FROM head_summary"
            else:
                expr = _AGG_SQL[agg].format(c="h." + ident(score))
                sql = (
                    f"SELECT h.layer, h.head, {expr} AS value, any_value(s.label) AS label "
                    "FROM heads h LEFT JOIN head_summary s USING (layer, head) "
                    "GROUP BY h.layer, h.head"
                )
        _, rows, _ = self.query(src, sql)
        found = {(int(r[0]), int(r[1])): (jsonable(r[2]), r[3]) for r in rows}
        cells = [
            {
                "layer": layer,
                "head": head,
                "value": found.get((layer, head), (None, None))[0],
                "label": found.get((layer, head), (None, None))[1],
            }
            for layer in src.store.manifest["layers"]
            for head in src.store.manifest["heads"]
        ]
        return {"store": src.index, "score": score, "agg": agg, "cells": cells}

    def head(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/head``: one head's scores with ranks, label, top and per-decile documents."""
        from attnstore import catalog

        src = self.source(params)
        layer, head = self._layer_head(src, params)
        k = int_param(params, "k", 10, 1, 100)
        ranked = ", ".join(
            f"{ident(c)}, rank() OVER (ORDER BY {ident(c)} DESC NULLS LAST) AS {ident('rank_' + c)}"
            for c in src.scores
        )
        columns, rows, _ = self.query(
            src,
            f"SELECT * FROM (SELECT layer, head, label, n_docs, {ranked} FROM head_summary) "
            "WHERE layer = ? AND head = ?",
            [layer, head],
        )
        n_heads = len(src.store.manifest["layers"]) * len(src.store.manifest["heads"])
        if not rows:
            raise ApiError(404, f"Layer {layer} head {head} has no scores in store {src.name!r}.")
        row = dict(zip(columns, rows[0], strict=True))
        scores = [
            {"score": c, "value": jsonable(row[c]), "rank": row["rank_" + c], "of": n_heads}
            for c in src.scores
        ]
        default = next(
            (c for c in ("prev_token", "sink", "induction") if c in src.scores), src.scores[0]
        )
        by = self._score(src, params, "by", default)
        col = ident(by)
        doc_cols = "h.doc_id, h.{c} AS value, d.n_tokens, left(d.text, 120) AS text"
        _, top, _ = self.query(
            src,
            f"SELECT {doc_cols.format(c=col)} FROM heads h JOIN docs d USING (doc_id) "
            f"WHERE h.layer = ? AND h.head = ? AND h.{col} IS NOT NULL "
            f"ORDER BY h.{col} DESC, h.doc_id LIMIT ?",
            [layer, head, k],
        )
        _, dec, _ = self.query(
            src,
            f"SELECT decile, doc_id, value, n_tokens, text FROM (SELECT *, row_number() OVER "
            "(PARTITION BY decile ORDER BY hash(doc_id), doc_id) AS i FROM (SELECT "
            f"{doc_cols.format(c=col)}, ntile(10) OVER (ORDER BY h.{col}) AS decile "
            f"FROM heads h JOIN docs d USING (doc_id) WHERE h.layer = ? AND h.head = ? "
            f"AND h.{col} IS NOT NULL)) WHERE i <= 3 ORDER BY decile DESC, value DESC",
            [layer, head],
        )
        doc_fields = ("doc_id", "value", "n_tokens", "text")
        syntax: list[dict[str, Any]] = []
        if src.has_syntax:
            scol, srows, _ = self.query(src, catalog.HEAD_ROWS_SQL["syntax"], [layer, head])
            syntax = records(scol, srows)
        semantic: list[dict[str, Any]] = []
        if src.has_semantic:
            pcol, prows, _ = self.query(src, catalog.HEAD_ROWS_SQL["probe"], [layer, head])
            semantic = records(pcol, prows)
        return {
            "store": src.index,
            "layer": layer,
            "head": head,
            "label": row["label"],
            "n_docs": row["n_docs"],
            "scores": scores,
            "by": by,
            "top": records(doc_fields, top),
            "deciles": records(("decile", *doc_fields), dec),
            "syntax": syntax,
            "semantic": semantic,
        }

    def _doc_tokens(self, src: Source, doc: int) -> tuple[int, list[str]]:
        _, rows, _ = self.query(src, "SELECT n_tokens, skipped FROM docs WHERE doc_id = ?", [doc])
        if not rows:
            raise ApiError(404, f"No document {doc} in store {src.name!r} ({src.n_docs} stored).")
        if rows[0][1] is not None:
            raise ApiError(404, f"Document {doc} was skipped at extraction ({rows[0][1]}).")
        _, toks, _ = self.query(
            src, "SELECT token FROM tokens WHERE doc_id = ? ORDER BY pos", [doc]
        )
        return int(rows[0][0]), [str(t[0]) for t in toks]

    def doc(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/doc``: one document's text and tokens."""
        src = self.source(params)
        doc = int_param(params, "doc")
        n, tokens = self._doc_tokens(src, doc)
        _, rows, _ = self.query(src, "SELECT text, truncated FROM docs WHERE doc_id = ?", [doc])
        return {
            "store": src.index,
            "doc_id": doc,
            "n_tokens": n,
            "text": rows[0][0],
            "truncated": rows[0][1],
            "tokens": tokens,
        }

    def pair(self, params: dict[str, str]) -> dict[str, Any]:
        """``/api/pair``: the document of ``store`` that holds the text of document ``doc`` of store
        ``from`` (compare across stores pairs documents by text, not by number).

        ``doc_id`` is ``doc`` itself when that document of ``store`` has the same text, else the
        first document with the same text, else ``null``; ``how`` is ``"doc_id"``, ``"text"`` or
        ``null``, and ``same_number`` says whether ``store`` has a document ``doc`` at all.
        """
        src = self.source(params)
        ref = self.source({"store": params.get("from", "0")})
        doc = int_param(params, "doc")
        _, rows, _ = self.query(ref, "SELECT text FROM docs WHERE doc_id = ?", [doc])
        if not rows:
            raise ApiError(404, f"Store {ref.name!r} has no document {doc}.")
        text = rows[0][0]
        _, own, _ = self.query(
            src, "SELECT text FROM docs WHERE doc_id = ? AND skipped IS NULL", [doc]
        )
        if own and own[0][0] == text:
            return {"store": src.index, "from": ref.index, "doc": doc, "doc_id": doc,
                    "how": "doc_id", "same_number": True}  # fmt: skip
        _, match, _ = self.query(
            src,
            "SELECT min(doc_id) FROM docs WHERE text = ? AND skipped IS NULL HAVING count(*) > 0",
            [text],
        )
        found = int(match[0][0]) if match and match[0][0] is not None else None
        return {"store": src.index, "from": ref.index, "doc": doc, "doc_id": found,
                "how": None if found is None else "text", "same_number": bool(own)}  # fmt: skip
