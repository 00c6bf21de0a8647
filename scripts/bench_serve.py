"""Page load times of ``attnstore serve`` in headless Chromium (Debian's /usr/bin/chromium).

    python scripts/bench_serve.py demo.attn [--runs 5]

Measures, for the store: the server's start (views, lockdown), the overview page (navigation until
the layer × head grid is drawn, each run a fresh page with an empty cache), one head page, and the
document × head page of the store's longest document. Prints JSON (median and all runs, seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from playwright.sync_api import Page, sync_playwright

from attnstore.serve import make_server


def _until(page: Page, js: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > end:
            raise TimeoutError(js)
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    t0 = time.perf_counter()
    server = make_server([args.store], port=0)
    start_s = time.perf_counter() - t0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    meta = server.viewer.meta({})["stores"][0]
    layer, head = meta["layers"][-1], meta["heads"][0]
    _, rows, _ = server.viewer.query(
        server.viewer.sources[0],
        "SELECT doc_id FROM docs WHERE skipped IS NULL ORDER BY n_tokens DESC LIMIT 1",
    )
    longest = rows[0][0]
    views = {
        "overview": ("#/overview", "document.querySelectorAll('.cell').length > 0"),
        "head": (f"#/head?layer={layer}&head={head}", "!!document.getElementById('head-title')"),
        "doc": (
            f"#/doc?doc={longest}&layer={layer}&head={head}",
            "!!document.querySelector('canvas.main[data-ready=\"1\"]')",
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in views}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        for _ in range(args.runs):
            for name, (view, ready) in views.items():
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                t = time.perf_counter()
                page.goto(server.url + view)
                _until(page, f"document.body.dataset.ready === '1' && {ready}")
                times[name].append(time.perf_counter() - t)
                context.close()
        browser.close()
    server.shutdown()
    server.server_close()
    out = {
        "store": args.store,
        "layers": len(meta["layers"]),
        "heads": len(meta["heads"]),
        "docs": meta["docs"],
        "longest_doc_tokens": meta["max_tokens"],
        "server_start_s": round(start_s, 3),
        **{
            f"{k}_s": {"median": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]}
            for k, v in times.items()
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
