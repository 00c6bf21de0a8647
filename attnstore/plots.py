"""Figures from a store, as PNG files (matplotlib, Agg backend; the ``plot`` extra).

- :func:`plot_matrix`: one head's attention for one document, causal triangle visible;
- :func:`plot_grid`: a layer × head grid of a corpus-level score over a selection;
- :func:`plot_tokens`: one document's tokens shaded by the attention one query position gives them.

Colour scales are square-root (``PowerNorm(0.5)``): attention is mostly tiny values with a few large
ones, and a linear scale shows only the largest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from attnstore.errors import AttnStoreError
from attnstore.store import Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_grid", "plot_matrix", "plot_tokens"]

DPI: Final = 150
#: Documents up to this many tokens get token labels on the heatmap axes.
MAX_LABELLED: Final = 48
#: Tokens after the query position shown (greyed: a causal query cannot see them).
AFTER_QUERY: Final = 8


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(token: str) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= 12 else text[:11] + "…"


def _save(fig: Figure, out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _tokens(store: Store, doc_id: int) -> list[str]:
    rows = store.sql("SELECT token FROM tokens WHERE doc_id = ? ORDER BY pos", [doc_id])
    return [str(t) for t in rows.column(0).to_pylist()]


def plot_matrix(
    store: Store | str, doc_id: int, layer: int, head: int, out: str | os.PathLike[str]
) -> Path:
    """Heatmap of ``A[q, k]`` for one head; the masked upper triangle is hatched grey."""
    from matplotlib.colors import PowerNorm

    plt = _pyplot()
    st = store if isinstance(store, Store) else Store(store)
    a = st.matrix(doc_id, layer, head)
    t = a.shape[0]
    masked = np.ma.masked_where(np.triu(np.ones_like(a, dtype=bool), 1), a)
    size = 7.0 if t > MAX_LABELLED else max(4.5, 0.22 * t + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    ax.set_facecolor("#e6e6e6")
    image = ax.imshow(
        masked, cmap="magma", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest"
    )
    if t <= MAX_LABELLED:
        labels = [_label(x) for x in _tokens(st, doc_id)]
        ax.set_xticks(range(t), labels, rotation=90, fontsize=7, family="monospace")
        ax.set_yticks(range(t), labels, fontsize=7, family="monospace")
    ax.set_xlabel("key position k")
    ax.set_ylabel("query position q")
    scores = st.sql(
        "SELECT prev_token, sink, induction FROM heads WHERE doc_id = ? AND layer = ? AND head = ?",
        [doc_id, layer, head],
    ).to_pylist()
    detail = ", ".join(
        f"{k} {v:.2f}" for k, v in (scores[0] if scores else {}).items() if v is not None
    )
    ax.set_title(f"doc {doc_id} · layer {layer} · head {head}\n{detail}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("attention weight (√ scale)")
    return _save(fig, out)


def plot_grid(
    store: Store | str, score: str, out: str | os.PathLike[str], where: str | None = None
) -> Path:
    """Layer × head grid of a score's count-weighted mean over the heads rows matching ``where``."""
    from attnstore.scores import SCORE_COLUMNS, WEIGHT_COLUMN

    if score not in SCORE_COLUMNS:
        raise AttnStoreError(f"Expected a score in {list(SCORE_COLUMNS)}. Got {score!r}.")
    weight = WEIGHT_COLUMN[score]
    plt = _pyplot()
    st = store if isinstance(store, Store) else Store(store)
    sql = f"SELECT layer, head, sum({score} * {weight}) / nullif(sum({weight}), 0) AS v FROM heads"
    if where:
        sql += f" WHERE {where}"
    rows = st.sql(sql + " GROUP BY layer, head").to_pylist()
    if not rows:
        raise AttnStoreError(f"The selection {where!r} matches no heads; nothing to plot.")
    layers, heads = st.manifest["layers"], st.manifest["heads"]
    grid = np.full((len(layers), len(heads)), np.nan)
    for r in rows:
        if r["v"] is not None:
            grid[layers.index(r["layer"]), heads.index(r["head"])] = r["v"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(heads), 1.0 + 0.3 * len(layers)))
    vmax = 1.0 if score != "mean_distance" else float(np.nanmax(grid)) or 1.0
    image = ax.imshow(
        grid, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    if grid.size <= 400:
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                colour = "black" if v > 0.6 * vmax else "white"
                ax.text(
                    j,
                    i,
                    f"{v:.2f}" if vmax <= 1 else f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color=colour,
                )
    ax.set_xticks(range(len(heads)), heads)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{score}" + (f" where {where}" if where else ""), fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(score)
    return _save(fig, out)


def plot_tokens(
    store: Store | str, doc_id: int, layer: int, head: int, query: int, out: str | os.PathLike[str]
) -> Path:
    """The document's tokens as text, each shaded by ``A[query, k]``; the query token is boxed."""
    import matplotlib as mpl

    plt = _pyplot()
    st = store if isinstance(store, Store) else Store(store)
    a = st.matrix(doc_id, layer, head)
    if not 0 <= query < a.shape[0]:
        raise AttnStoreError(f"Expected a query position in 0…{a.shape[0] - 1}. Got {query}.")
    weights = a[query]
    tokens = _tokens(st, doc_id)[: query + 1 + AFTER_QUERY]
    cmap = mpl.colormaps["Oranges"]
    norm = mpl.colors.PowerNorm(0.5, vmin=0.0, vmax=max(float(weights.max()), 1e-6))
    # Layout in character cells of the monospace font: 8 pt → 0.6 × 8 / 72 in wide, 0.3 in per line.
    width_in, font_pt = 10.0, 8
    per_line = int(width_in * 0.86 / (0.6 * font_pt / 72))
    placed, col, row = [], 0, 0
    for k, token in enumerate(tokens):
        text = token.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·") or "∅"
        if col and col + len(text) > per_line:
            col, row = 0, row + 1
        placed.append((col, row, text, k))
        col += len(text) + 1
        if "\n" in token:
            col, row = 0, row + 1
    lines = row + 1
    fig = plt.figure(figsize=(width_in, 0.3 * lines + 0.9))
    ax = fig.add_axes((0.01, 0.02, 0.86, 1 - 0.6 / (0.3 * lines + 0.9)))
    ax.set_xlim(-0.5, per_line)
    ax.set_ylim(lines - 0.5, -0.5)
    ax.axis("off")
    for x0, y0, text, k in placed:
        box = {"boxstyle": "square,pad=0.2", "facecolor": cmap(norm(weights[k])) if k <= query else "white",
               "edgecolor": "#1f4e9e" if k == query else "none", "linewidth": 1.5}  # fmt: skip
        colour = "#aaaaaa" if k > query else "black"
        ax.text(
            x0,
            y0,
            text,
            family="monospace",
            fontsize=font_pt,
            va="center",
            ha="left",
            bbox=box,
            color=colour,
        )
    fig.suptitle(
        f"doc {doc_id} · layer {layer} · head {head}: attention from position {query} "
        f"({_label(tokens[query])!r}, boxed); '·' marks a space",
        fontsize=10, x=0.01, ha="left",
    )  # fmt: skip
    cax = fig.add_axes((0.9, 0.1, 0.015, 0.75))
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax).set_label("A[q, k]")
    return _save(fig, out)
