"""The viewer in a real headless browser: Debian's Chromium driven by Playwright's Python API.

Every test fails on a console error or an uncaught page error, and on any request that would
leave 127.0.0.1 (all requests are intercepted; others are aborted and recorded). Screenshots of
each page go to ``build/screenshots/`` (or ``$ATTNSTORE_SCREENSHOTS``) for a person to look at.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

import attnstore
from attnstore.serve import make_server
from tests.helpers import ROOT
from tests.viewer_store import HEADS, LAYERS, LONG, N_SHORT, OVERVIEW, PREV, SHORT, SINK, SYNTAX

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/install.sh); never `playwright install`
SHOTS = Path(
    os.environ.get("ATTNSTORE_SCREENSHOTS", ROOT / "build" / "screenshots")
)


@pytest.fixture(scope="module")
def server(viewer_store: Path) -> Iterator[Any]:
    srv = make_server([viewer_store], port=0, time_limit=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


class Watch:
    """What a page did that it should not: console errors, page errors, non-loopback requests."""

    def __init__(self) -> None:
        self.console: list[str] = []
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.requests: list[str] = []
        #: the SQL refusal test provokes 4xx answers, which Chromium logs as console errors
        self.allow_4xx = False


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def page(browser: Browser, watch: Watch) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})

    def route(r: Route) -> None:
        url = r.request.url
        watch.requests.append(url)
        host = urllib.parse.urlsplit(url).hostname
        if url.startswith("data:") or host == "127.0.0.1":
            r.continue_()
        else:
            watch.outside.append(url)
            r.abort()

    context.route("**/*", route)
    pg = context.new_page()
    pg.on("console", lambda m: watch.console.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: watch.errors.append(str(e)))
    yield pg
    context.close()
    assert watch.errors == [], watch.errors
    assert watch.outside == [], watch.outside
    if watch.allow_4xx:  # only the API's own refusals, nothing else
        assert all("status of 4" in m for m in watch.console), watch.console
    else:
        assert watch.console == [], watch.console


def until(page: Page, js: str, timeout: float = 60) -> None:
    """Poll a JavaScript expression until it is truthy (wait_for_function evaluates strings in
    the page, which the viewer's Content-Security-Policy forbids, as it should)."""
    end = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > end:
            raise TimeoutError(f"Still false after {timeout} s: {js}")
        time.sleep(0.05)


def open_view(page: Page, server: Any, view: str) -> None:
    """Open a view and wait until the page says it has rendered it."""
    if page.url.startswith(server.url):  # a hash change: mark "not ready" before it happens
        page.evaluate("document.body.dataset.ready = '0'")
    if page.url == server.url + view:
        page.reload()
    else:
        page.goto(server.url + view)
    until(page, "document.body.dataset.ready === '1'")


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def api(server: Any, name: str, **params: Any) -> Any:
    import urllib.request

    url = f"{server.url}api/{name}?{urllib.parse.urlencode(params)}"
    req = urllib.request.Request(url, headers={"X-Attnstore": "1"})
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.load(res)


def wait_heatmaps(page: Page, n: int = 1) -> None:
    until(
        page,
        f"document.querySelectorAll('canvas.main[data-ready=\"1\"]').length >= {n}",
        timeout=60,
    )


def test_overview_grid_matches_the_api(page: Page, server: Any) -> None:
    t0 = time.perf_counter()
    open_view(page, server, "#/overview?score=prev_token")
    elapsed = time.perf_counter() - t0
    cells = page.locator(".cell").evaluate_all(
        "els => els.map(e => [+e.dataset.layer, +e.dataset.head, e.dataset.value])"
    )
    assert len(cells) == LAYERS * HEADS
    want = {
        (c["layer"], c["head"]): c["value"]
        for c in api(server, "grid", score="prev_token")["cells"]
    }
    assert {(la, h): float(v) for la, h, v in cells} == want
    # top-1 highlighting marks the planted previous-token head only
    open_view(page, server, "#/overview?score=prev_token&top=1")
    top = page.locator(".cell.top").evaluate_all(
        "els => els.map(e => [+e.dataset.layer, +e.dataset.head])"
    )
    assert top == [list(PREV)]
    shot(page, "overview")
    print(f"overview of the test store loaded in {elapsed:.2f} s")


def test_overview_by_label(page: Page, server: Any) -> None:
    open_view(page, server, "#/overview?score=label")
    cell = page.locator(f".cell[data-layer='{SINK[0]}'][data-head='{SINK[1]}']")
    assert cell.get_attribute("data-value") == "sink"
    assert (
        page.locator(f".cell[data-layer='{PREV[0]}'][data-head='{PREV[1]}']").get_attribute(
            "data-value"
        )
        == "previous-token"
    )
    shot(page, "overview-labels")


def test_scatter_selection_filters_the_grid(page: Page, server: Any) -> None:
    open_view(page, server, "#/overview?score=prev_token&x=prev_token&y=sink")
    box = page.locator("#scatter").bounding_box()
    assert box is not None
    # drag a rectangle over the right half of the plot area: only high prev_token heads
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] - 2, steps=5)
    page.mouse.up()
    until(page, "location.hash.includes('sel=')")
    until(page, "document.body.dataset.ready === '1' && document.querySelector('.cell.dim')")
    selected = page.locator(".cell[data-selected='1']").evaluate_all(
        "els => els.map(e => [+e.dataset.layer, +e.dataset.head])"
    )
    assert selected == [list(PREV)]
    shot(page, "overview-scatter-selection")


def test_clicking_a_cell_opens_the_head_page(page: Page, server: Any) -> None:
    open_view(page, server, "#/overview?score=prev_token")
    page.locator(f".cell[data-layer='{PREV[0]}'][data-head='{PREV[1]}']").click()
    until(page, "location.hash.startsWith('#/head')")
    until(page, "document.body.dataset.ready === '1' && document.getElementById('head-title')")
    title = page.locator("#head-title")
    assert (title.get_attribute("data-layer"), title.get_attribute("data-head")) == tuple(
        map(str, PREV)
    )
    assert "previous-token" in title.inner_text()
    row = page.locator("#head-scores tr[data-score='prev_token']")
    assert f"rank 1 of {LAYERS * HEADS}" in row.inner_text()
    first_doc = page.locator("#top-docs a").first.inner_text()
    top = api(server, "head", layer=PREV[0], head=PREV[1])["top"][0]["doc_id"]
    assert first_doc == f"doc {top}"
    assert page.locator("#deciles tr").count() > 5
    shot(page, "head")


def test_head_page_shows_syntactic_results(page: Page, server: Any) -> None:
    open_view(page, server, f"#/head?layer={SYNTAX[0]}&head={SYNTAX[1]}")
    row = page.locator("#syntax tr").nth(1).inner_text()
    assert row.split() == ["det", "dep->head", "80", "0.900", "0.400", "0.500"]
    open_view(page, server, "#/overview?score=syntactic&top=1")
    top = page.locator(".cell.top")
    assert (top.get_attribute("data-layer"), top.get_attribute("data-head")) == tuple(
        map(str, SYNTAX)
    )
    shot(page, "overview-syntactic")


def _brightest(page: Page, selector: str = "canvas.main") -> tuple[np.ndarray, np.ndarray]:
    """Per row of the heatmap canvas's own pixels (one per cell): the column of the brightest
    pixel (the first one on ties) and the ratio of its luminance to the row's median."""
    out = page.evaluate(
        """(sel) => { const c = document.querySelector(sel), w = c.width;
        const d = c.getContext('2d').getImageData(0, 0, w, c.height).data;
        const arg = [], ratio = [];
        for (let i = 0; i < c.height; i++) {
          const lum = [];
          for (let j = 0; j < w; j++) { const o = (i * w + j) * 4;
            lum.push(0.2126 * d[o] + 0.7152 * d[o + 1] + 0.0722 * d[o + 2]); }
          let best = 0; for (let j = 1; j < w; j++) if (lum[j] > lum[best]) best = j;
          const sorted = [...lum].sort((a, b) => a - b);
          arg.push(best); ratio.push(lum[best] / Math.max(sorted[w >> 1], 1e-9));
        }
        return {arg, ratio, w, h: c.height}; }""", selector)
    assert out["w"] == out["h"]
    return np.array(out["arg"]), np.array(out["ratio"])


@pytest.mark.parametrize("scale", ["linear", "sqrt", "log"])
def test_heatmap_brightest_pixel_is_the_previous_token(page: Page, server: Any, scale: str) -> None:
    open_view(page, server, f"#/doc?doc=0&layer={PREV[0]}&head={PREV[1]}&scale={scale}")
    wait_heatmaps(page)
    arg, _ = _brightest(page)
    assert len(arg) == SHORT
    assert arg[1:].tolist() == list(range(SHORT - 1))  # row q: brightest at key q − 1
    if scale == "sqrt":
        shot(page, "doc-previous-token")


def test_sink_head_and_sink_exclusion(page: Page, server: Any, viewer_store: Path) -> None:
    m = attnstore.open(str(viewer_store)).matrix(0, *SINK)
    open_view(page, server, f"#/doc?doc=0&layer={SINK[0]}&head={SINK[1]}&scale=linear")
    wait_heatmaps(page)
    assert (_brightest(page)[0] == 0).all()
    assert float(page.locator("canvas.main").get_attribute("data-vmax") or 0) == float(m.max())
    open_view(page, server, f"#/doc?doc=0&layer={SINK[0]}&head={SINK[1]}&scale=linear&sink=1")
    wait_heatmaps(page)
    assert float(page.locator("canvas.main").get_attribute("data-vmax") or 0) == float(
        m[:, 1:].max()
    )
    shot(page, "doc-sink-excluded")


def _hover_cell(page: Page, q: int, k: int, n: int, selector: str = "canvas.main") -> None:
    box = page.locator(selector).first.bounding_box()
    assert box is not None
    page.mouse.move(
        box["x"] + (k + 0.5) * box["width"] / n, box["y"] + (q + 0.5) * box["height"] / n
    )


@pytest.mark.parametrize(("q", "k"), [(40, 39), (50, 7), (63, 0)])
def test_hover_shows_the_stored_value(
    page: Page, server: Any, viewer_store: Path, q: int, k: int
) -> None:
    m = attnstore.open(str(viewer_store)).matrix(0, *PREV)
    open_view(page, server, f"#/doc?doc=0&layer={PREV[0]}&head={PREV[1]}")
    wait_heatmaps(page)
    _hover_cell(page, q, k, SHORT)
    hover = page.locator("#hover")
    until(page, f"document.getElementById('hover').dataset.q === '{q}'")
    assert (hover.get_attribute("data-q"), hover.get_attribute("data-k")) == (str(q), str(k))
    assert float(hover.get_attribute("data-value") or "nan") == float(m[q, k])
    assert f"query {q}" in hover.inner_text()


def test_token_strip_hover_shows_where_a_token_attends(page: Page, server: Any) -> None:
    open_view(page, server, f"#/doc?doc=0&layer={PREV[0]}&head={PREV[1]}")
    wait_heatmaps(page)
    page.locator(".tok[data-pos='20']").hover()
    until(page, "document.querySelector(\".tok[data-pos='19']\").style.background !== ''")
    alpha = page.locator(".tok").evaluate_all(
        "els => els.map(e => { const m = e.style.background.match(/rgba?\\(([^)]*)\\)/);"
        " if (!m) return 0; const p = m[1].split(','); return p.length > 3 ? +p[3] : 1; })"
    )
    assert int(np.argmax(alpha)) == 19  # it attends most to the previous token
    incoming = page.locator(".tok[data-pos='21']").evaluate("e => e.style.borderBottomColor")
    assert "36, 99, 199" in incoming  # token 21 attends to token 20 (blue underline)
    shot(page, "doc-token-hover")


def test_long_document_renders_through_pooled_tiles(page: Page, server: Any) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    t0 = time.perf_counter()
    open_view(page, server, f"#/doc?doc={N_SHORT}&layer={SINK[0]}&head={SINK[1]}&scale=sqrt&sink=1")
    wait_heatmaps(page)
    elapsed = time.perf_counter() - t0
    # the first picture comes from the stored overview (format 2.1), then the exact tiles
    assert any("/api/overview?" in u for u in requested)
    canvas = page.locator("canvas.main")
    assert canvas.get_attribute("data-overview") in (None, str(LONG // OVERVIEW))
    pool = int(canvas.get_attribute("data-pool") or 0)
    assert pool > 1
    assert int(canvas.get_attribute("width") or 0) == LONG // pool
    arg, ratio = _brightest(page)
    assert (arg == 0).all()  # the one-column sink survives pooling
    assert (ratio > 2).all()
    assert page.locator(".tok").count() == LONG
    shot(page, "doc-long-sink")
    # the one-cell previous-token diagonal too: each pooled row is brightest on its diagonal
    open_view(page, server, f"#/doc?doc={N_SHORT}&layer={PREV[0]}&head={PREV[1]}&scale=sqrt")
    wait_heatmaps(page)
    arg, ratio = _brightest(page)
    rows = np.arange(len(arg))
    # pooled row i holds queries 8i … 8i + 7, whose previous tokens lie in blocks i − 1 and i
    assert np.isin(arg[1:] - rows[1:], [-1, 0]).all()
    assert (ratio[1:] > 2).all()
    shot(page, "doc-long-previous-token")
    # a click zooms down to exact cells: the 256 × 256 block around (q 2100, k 2090), one pixel
    # per cell from a partial read of its 256 rows; each row brightest on its previous token
    box = canvas.bounding_box()
    assert box is not None
    canvas.click(position={"x": box["width"] * 2090 / LONG, "y": box["height"] * 2100 / LONG})
    until(page, "document.querySelector('canvas.zoom[data-ready=\"1\"]') !== null", timeout=60)
    zoom = page.locator("canvas.zoom")
    assert zoom.get_attribute("data-q0") == zoom.get_attribute("data-k0") == "2048"
    arg, ratio = _brightest(page, "canvas.zoom")
    assert (arg[1:] == np.arange(len(arg))[:-1]).all()
    assert (ratio[1:] > 2).all()
    shot(page, "doc-long-zoom")
    print(f"4,096-token document rendered in {elapsed:.2f} s (pool {pool})")


def test_compare_synchronises_hover(page: Page, server: Any, viewer_store: Path) -> None:
    store = attnstore.open(str(viewer_store))
    heads = [PREV, SINK, (1, 3)]
    spec = ",".join(f"0:{la}:{h}" for la, h in heads)
    open_view(page, server, f"#/compare?doc=1&heads={spec}")
    wait_heatmaps(page, len(heads))
    _hover_cell(page, 30, 29, SHORT)
    until(page, "document.querySelectorAll('#compare .hover[data-value]').length === 3")
    values = page.locator("#compare .hover").evaluate_all("els => els.map(e => e.dataset.value)")
    assert [float(v) for v in values] == [float(store.matrix(1, *lh)[30, 29]) for lh in heads]
    shot(page, "compare")


def test_sql_console_rows_link_to_pages(page: Page, server: Any) -> None:
    sql = (
        f"SELECT doc_id, layer, head, prev_token FROM heads WHERE layer = {PREV[0]} AND "
        f"head = {PREV[1]} ORDER BY prev_token DESC LIMIT 3"
    )
    open_view(page, server, "#/sql?q=" + urllib.parse.quote(sql))
    page.wait_for_selector("#sql-results")
    assert page.locator("#sql-results a.row-link").count() == 3
    shot(page, "sql")
    # typing a query and pressing Run puts it in the URL and shows its rows
    page.locator("#sql-input").fill(
        "SELECT layer, head, label FROM head_summary WHERE label = 'sink'"
    )
    page.locator("#sql-run").click()
    until(page, "document.body.dataset.ready === '1' && location.hash.includes('sink')")
    page.locator("#sql-results").wait_for()
    cells = page.locator("#sql-results tr").nth(1).locator("td").all_inner_texts()
    assert cells[1:] == [str(SINK[0]), str(SINK[1]), "sink"]
    page.locator("#sql-results a.row-link").first.click()
    until(page, "location.hash.startsWith('#/head')")
    until(page, "document.body.dataset.ready === '1' && !!document.getElementById('head-title')")
    assert page.locator("#head-title").get_attribute("data-head") == str(SINK[1])
    open_view(page, server, "#/sql?q=" + urllib.parse.quote(sql))
    page.locator("#sql-results").wait_for()
    page.locator("#sql-results a.row-link").first.click()
    until(page, "location.hash.startsWith('#/doc')")
    wait_heatmaps(page)
    assert page.locator("canvas.main").get_attribute("data-head") == str(PREV[1])


def test_sql_console_refuses_writes_files_and_runaways(
    page: Page, server: Any, watch: Watch
) -> None:
    watch.allow_4xx = True
    refused = {
        "copy": "COPY heads TO '/tmp/attnstore-browser.csv'",
        "attach": "ATTACH '/tmp/attnstore-browser.duckdb' AS x",
        "read_text": "SELECT * FROM read_text('/etc/passwd')",
        "cross_join": "SELECT count(*) FROM range(1000000000) a, range(1000000000) b",
        # last: CPU without memory (the cross join may end in DuckDB's memory limit first, as it
        # cannot spill: the SQL policy gives it no temporary folder)
        "runaway": "SELECT sum(hash(range)) FROM range(1000000000000)",
    }
    for name, sql in refused.items():
        open_view(page, server, "#/sql?q=" + urllib.parse.quote(sql))
        error = page.locator("#sql-error")
        error.wait_for()
        assert error.inner_text().strip(), name
        assert page.locator("#sql-results").count() == 0, name
        shot(page, f"sql-refused-{name}")
    assert not Path("/tmp/attnstore-browser.csv").exists()
    assert "time limit" in page.locator("#sql-error").inner_text()
