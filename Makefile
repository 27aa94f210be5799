# The two set-up commands of README.md: `make train` (the main job) and `make test`. Both install first, into the
# checkout's own virtual environment .venv (scripts/setup.sh), and run from it.
PYTHON ?= python3
VENV ?= .venv

.PHONY: setup train test lint

setup:
	PYTHON=$(PYTHON) ROSA_VENV=$(VENV) bash scripts/setup.sh

train: setup
	$(VENV)/bin/rosa train

test: setup
	$(VENV)/bin/python -m pytest -q

lint:
	$(VENV)/bin/python -m ruff check .
