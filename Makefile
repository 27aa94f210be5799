# The two set-up commands of README.md: `make train` (the main job) and `make test`.
PYTHON ?= python3

.PHONY: setup train test lint

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

train: setup
	$(PYTHON) -m rosa.cli train

test: setup
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
