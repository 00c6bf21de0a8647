#!/usr/bin/env bash
# The README's test command: install, lint, type-check, test (the real-model test included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check attnstore tests scripts
python3 -m mypy
python3 -m pytest -q "$@"
