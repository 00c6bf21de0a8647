"""Figures from a store, as PNG files (matplotlib, Agg backend; the ``plot`` extra).

- :func:`plot_matrix`: one head's attention for one document, causal triangle visible;
- :func:`plot_grid`: a layer × head grid of a corpus-level score over a selection;
- :func:`plot_tokens`: one document's tokens shaded by the attention one query position gives them;
- :func:`plot_probe`: a layer × head grid of a span probe's accuracy around its position baseline.

Colour scales are square-root (``PowerNorm(0.5)``): attention is mostly tiny values with a few large
ones, and a linear scale shows only the largest.

Tokens are drawn from ``tokens.text`` (the characters each token covers; byte pieces of one character
marked ``注[1/3]``). Text is set in DejaVu (Latin, Greek, Cyrillic…) with a fallback chain to Noto CJK
for Chinese, Japanese and Korean when it is installed (Debian: ``apt-get install fonts-noto-cjk``;
``scripts/install.sh`` does it); without a CJK font, a :class:`FontWarning` says so once.
matplotlib keeps a font cache built the first time it ran: a font installed after that is unknown
to it, so when the cache has no CJK font but the font files are on disk (fontconfig's list, or the
usual font folders) they are added and the cache is rewritten (:func:`refresh_font_cache`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from attnstore.errors import AttnStoreError
from attnstore.store import Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from attnstore.storage import Location

__all__ = ["FontWarning", "plot_grid", "plot_matrix", "plot_probe", "plot_tokens"]

DPI: Final = 150
#: Documents up to this many tokens get token labels on the heatmap axes.
MAX_LABELLED: Final = 48
#: Tokens after the query position shown (greyed: a causal query cannot see them).
AFTER_QUERY: Final = 8


#: Font chains, first choice first: matplotlib falls back glyph by glyph along the chain.
SANS: Final = ("DejaVu Sans",)
MONO: Final = ("DejaVu Sans Mono",)
#: CJK fonts tried after those, when installed (Debian fonts-noto-cjk).
CJK_SANS: Final = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK KR", "Noto Sans CJK TC")
CJK_MONO: Final = ("Noto Sans Mono CJK SC", "Noto Sans Mono CJK JP", *CJK_SANS)


class FontWarning(UserWarning):
    """Text needs glyphs that no installed font has (shown once per process)."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Folders searched for CJK font files when fontconfig's ``fc-list`` is not available.
FONT_DIRS: Final = (
    "/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
    "/Library/Fonts", "/System/Library/Fonts", "~/Library/Fonts",
)  # fmt: skip
_FONT_SUFFIXES: Final = (".ttc", ".otf", ".ttf")

#: Why CJK font files on disk could not be added to matplotlib (for the warning).
_font_errors: list[str] = []


@functools.cache
def cjk_font_files() -> tuple[str, ...]:
    """Noto Sans CJK font files on disk, whatever matplotlib's font cache knows: fontconfig's list
    (``fc-list :lang=zh``) and the usual font folders."""
    found: set[str] = set()
    fc_list = shutil.which("fc-list")
    if fc_list:
        try:
            out = subprocess.run(
                [fc_list, ":lang=zh", "file"], capture_output=True, text=True, timeout=30,
                check=False,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            out = ""
        found |= {line.rsplit(":", 1)[0].strip() for line in out.splitlines() if ":" in line}
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if root.is_dir():
            found |= {str(p) for p in root.rglob("*CJK*") if p.suffix.lower() in _FONT_SUFFIXES}
    return tuple(
        sorted(f for f in found if "cjk" in Path(f).name.lower() and "serif" not in f.lower())
    )


def _persist_font_cache() -> None:
    """Rewrite matplotlib's font cache with the fonts added in this process, so the next process
    finds them at once (best effort: a read-only cache folder only costs the next one the search)."""
    import matplotlib
    from matplotlib import font_manager

    path = Path(
        matplotlib.get_cachedir(), f"fontlist-v{font_manager.FontManager.__version__}.json"
    )
    with contextlib.suppress(Exception):  # a cache that cannot be written is only slower
        font_manager.json_dump(font_manager.fontManager, path)


def _cjk_installed(names: set[str]) -> bool:
    return any(f in names for f in (*CJK_SANS, *CJK_MONO))


@functools.cache
def _fonts() -> tuple[list[str], list[str], bool]:
    """(sans chain, monospace chain, whether a CJK font is installed).

    A CJK font installed after matplotlib built its font cache is missing from that cache: its
    files are then added from disk and the cache rewritten.
    """
    from matplotlib import font_manager

    manager = font_manager.fontManager
    installed = {f.name for f in manager.ttflist}
    if not _cjk_installed(installed):
        for path in cjk_font_files():
            try:
                manager.addfont(path)
            except Exception as err:  # noqa: BLE001 - said in the FontWarning
                _font_errors.append(f"{path}: {err}")
        installed = {f.name for f in manager.ttflist}
        if _cjk_installed(installed):
            _persist_font_cache()
    cjk_sans = [f for f in CJK_SANS if f in installed]
    cjk_mono = [f for f in CJK_MONO if f in installed]
    return [*SANS, *cjk_sans[:1]], [*MONO, *cjk_mono[:1]], bool(cjk_sans or cjk_mono)


def refresh_font_cache() -> bool:
    """Make fonts installed since matplotlib built its font cache known to it (``scripts/install.sh``
    runs this after installing fonts-noto-cjk). Returns whether a CJK font is usable now."""
    _fonts.cache_clear()
    cjk_font_files.cache_clear()
    return _fonts()[2]


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or o >= 0x20000


_warned: set[str] = set()


def _check_glyphs(texts: list[str]) -> None:
    """Warn once when CJK text is drawn and no CJK font is installed (it would show as boxes)."""
    if _fonts()[2] or "cjk" in _warned or not any(_is_cjk(c) for t in texts for c in t):
        return
    _warned.add("cjk")
    files = cjk_font_files()
    if files:
        import matplotlib

        why = f" ({_font_errors[0]})" if _font_errors else ""
        message = (
            f"A CJK font is installed ({files[0]}) but matplotlib cannot use it{why}, so Chinese, "
            "Japanese and Korean characters show as empty boxes. matplotlib's font cache is stale "
            f"or unreadable: delete {matplotlib.get_cachedir()}/fontlist-*.json and rerun."
        )
    else:
        message = (
            "No CJK font is installed, so Chinese, Japanese and Korean characters show as empty "
            "boxes. Install one (Debian/Ubuntu: apt-get install fonts-noto-cjk) and rerun; "
            "attnstore adds a newly installed font to matplotlib's font cache itself."
        )
    warnings.warn(message, FontWarning, stacklevel=3)


def _label(token: str) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= 12 else text[:11] + "…"


def _save(fig: Figure, out: str | os.PathLike[str]) -> Path:
    """Write the PNG with the font chains; matplotlib's warning per missing glyph is replaced by
    one :class:`FontWarning` (see :func:`_check_glyphs`)."""
    plt = _pyplot()
    path = Path(out)
    if not path.parent.is_dir():
        plt.close(fig)
        raise AttnStoreError(
            f"Cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist. "
            "Create it first or choose another -o."
        )
    from matplotlib.text import Text

    texts = fig.findobj(Text)
    _check_glyphs([t.get_text() for t in texts])
    sans = _fonts()[0]
    for t in texts:  # titles and labels made with matplotlib's default family get the chain
        if t.get_fontfamily() in (["sans-serif"], [sans[0]]):
            t.set_fontfamily(sans)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _tokens(store: Store, doc_id: int) -> list[str]:
    """The document's tokens as readable text (``tokens.text``; the raw piece for parts written
    before that column existed)."""
    rows = store.sql(
        "SELECT coalesce(text, token) FROM tokens WHERE doc_id = ? ORDER BY pos", [doc_id]
    )
    return [str(t) for t in rows.column(0).to_pylist()]


def plot_matrix(
    store: Store | Location, doc_id: int, layer: int, head: int, out: str | os.PathLike[str]
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
        ax.set_xticks(range(t), labels, rotation=90, fontsize=7, family=_fonts()[1])
        ax.set_yticks(range(t), labels, fontsize=7, family=_fonts()[1])
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
    store: Store | Location, score: str, out: str | os.PathLike[str], where: str | None = None
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


def plot_probe(store: Store | Location, kind: str, out: str | os.PathLike[str]) -> Path:
    """Layer × head grid of ``probe_heads.accuracy`` for one kind (schemas/probes.md).

    The colour scale diverges at the position baseline (white = no better than "nearest"/"first"),
    the baseline is drawn on the colour bar, and heads that meet the ``semantic:<kind>`` rule
    (gain, n and mass) are outlined.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    from attnstore.labels import (
        SEMANTIC_GAIN,
        SEMANTIC_MASS_RATIO,
        SEMANTIC_MIN_MASS,
        SEMANTIC_MIN_N,
    )
    from attnstore.probes import check_kind

    plt = _pyplot()
    st = store if isinstance(store, Store) else Store(store)
    check_kind(st, kind)
    from attnstore.catalog import PROBE_KIND_SQL

    rows = st.sql(PROBE_KIND_SQL, [kind]).to_pylist()
    layers, heads = st.manifest["layers"], st.manifest["heads"]
    grid = np.full((len(layers), len(heads)), np.nan)
    marked = []
    for r in rows:
        if r["accuracy"] is None:
            continue
        i, j = layers.index(r["layer"]), heads.index(r["head"])
        grid[i, j] = r["accuracy"]
        if (
            r["gain"] >= SEMANTIC_GAIN
            and r["n"] >= SEMANTIC_MIN_N
            and r["mass_target"] >= max(SEMANTIC_MIN_MASS, SEMANTIC_MASS_RATIO * r["mass_distractor"])
        ):
            marked.append((i, j))
    if np.isnan(grid).all():
        raise AttnStoreError(
            f"No head has an accuracy for kind {kind!r}: its items have no counting distractor."
        )
    baselines = [r["baseline"] for r in rows if r["baseline"] is not None]
    baseline = float(np.mean(baselines))
    n = max(r["n"] for r in rows)
    center = min(max(baseline, 1e-6), 1 - 1e-6)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(heads), 1.0 + 0.3 * len(layers)))
    image = ax.imshow(
        grid, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=center, vmin=0.0, vmax=1.0),
        aspect="auto", interpolation="nearest",
    )  # fmt: skip
    if grid.size <= 400:
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v - center) > 0.35 else "black")  # fmt: skip
    for i, j in marked:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5))
    ax.set_xticks(range(len(heads)), heads)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(
        f"probe {kind}: accuracy (n = {n} items), baseline {baseline:.2f}; outlined: "
        f"semantic:{kind}",
        fontsize=9,
    )
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("accuracy (white = baseline)")
    bar.ax.axhline(baseline, color="black", lw=1.5)
    return _save(fig, out)


def plot_tokens(
    store: Store | Location, doc_id: int, layer: int, head: int, query: int, out: str | os.PathLike[str]
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
            family=_fonts()[1],
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
