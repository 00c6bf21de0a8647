#!/usr/bin/env bash
# The README's test command: install, lint, type-check, test (the real-model test included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check attnstore tests scripts
python3 -m mypy
# --durations: the 15 slowest tests, so a test that grows slow is seen (mark it @pytest.mark.slow)
python3 -m pytest -q --durations=15 "$@"
