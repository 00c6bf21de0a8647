"""Compare across two stores in Chromium (issue 21): documents are paired by text, and the page
says when "doc N" of each store are different texts. Fixtures and helpers: tests/viewer/test_browser.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

import attnstore
from attnstore.serve import make_server
from tests.viewer import test_browser
from tests.viewer.test_browser import _hover_cell, api, open_view, until, wait_heatmaps
from tests.viewer_store import N_SHORT, PREV, SHORT, write_viewer_store

# the browser fixtures of tests/viewer/test_browser.py (Chromium, a page that fails on console errors)
browser, page, watch = test_browser.browser, test_browser.page, test_browser.watch

SHIFT = 3


@pytest.fixture(scope="module")
def stores(viewer_store: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("compare")
    return [
        viewer_store,  # store 0
        # store 1: the same texts, each stored SHIFT documents later
        write_viewer_store(folder / "shifted.attn", long_doc=False, shift=SHIFT),
        # store 2: other texts under the same numbers
        write_viewer_store(folder / "other.attn", long_doc=False, seed=99),
    ]


@pytest.fixture(scope="module")
def server(stores: list[Path]) -> Iterator[Any]:
    srv = make_server([str(s) for s in stores], port=0, time_limit=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_pair_api_pairs_by_text(server: Any) -> None:
    assert api(server, "pair", store=0, doc=2)["doc_id"] == 2
    shifted = api(server, "pair", store=1, doc=2)
    assert (shifted["doc_id"], shifted["how"]) == ((2 + SHIFT) % N_SHORT, "text")
    other = api(server, "pair", store=2, doc=2)
    assert (other["doc_id"], other["how"], other["same_number"]) == (None, None, True)


def test_compare_across_stores_pairs_documents_by_text(
    page: Page, server: Any, stores: list[Path]
) -> None:
    doc, paired = 1, (1 + SHIFT) % N_SHORT
    a, b = (attnstore.open(str(s)) for s in stores[:2])
    assert a.sql("SELECT text FROM docs WHERE doc_id = ?", [doc]).to_pylist() == b.sql(
        "SELECT text FROM docs WHERE doc_id = ?", [paired]
    ).to_pylist()
    open_view(page, server, f"#/compare?doc={doc}&heads=0:{PREV[0]}:{PREV[1]},1:{PREV[0]}:{PREV[1]}")
    wait_heatmaps(page, 2)
    pairing = page.locator("#compare-pairing")
    assert json.loads(pairing.get_attribute("data-docs") or "{}") == {"0": doc, "1": paired}
    assert f"doc {doc} of " in pairing.inner_text()
    assert f"is doc {paired} of shifted.attn" in pairing.inner_text()
    assert page.locator("#compare-warning").count() == 0
    _hover_cell(page, 30, 29, SHORT)
    until(page, "document.querySelectorAll('#compare .hover[data-value]').length === 2")
    values = page.locator("#compare .hover").evaluate_all("els => els.map(e => e.dataset.value)")
    assert [float(v) for v in values] == [
        float(a.matrix(doc, *PREV)[30, 29]),
        float(b.matrix(paired, *PREV)[30, 29]),
    ]


def test_compare_says_when_doc_n_are_different_texts(page: Page, server: Any) -> None:
    open_view(page, server, f"#/compare?doc=2&heads=0:{PREV[0]}:{PREV[1]},2:{PREV[0]}:{PREV[1]}")
    wait_heatmaps(page, 2)
    warning = page.locator("#compare-warning")
    assert warning.count() == 1
    text = warning.inner_text()
    assert "Different texts" in text
    assert "doc 2 of viewer.attn and doc 2 of other.attn" in text
    assert json.loads(page.locator("#compare-pairing").get_attribute("data-docs") or "{}") == {
        "0": 2, "2": 2,
    }
