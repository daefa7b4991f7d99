# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechkit-installed

.PHONY: demo test lint bench clean browser installed

$(STAMP): pyproject.toml
	@echo "installing torch (CPU build) and mechkit into $(VENV): a few quiet minutes the first time"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: the pinned CPU build lies on these machines; an unpinned torch pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# the venv may outlive its editable install (something ran pip uninstall): put it back before use
installed: $(STAMP)
	@$(BIN)/pip show -q mechkit >/dev/null 2>&1 || $(BIN)/pip install -q --no-deps -e .

demo: installed
	$(BIN)/mechkit demo --out demo_out

# Debian's Chromium + ChromeDriver for the real-browser dashboard test (root: CI and these machines).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "chromium not installed: the browser test will be skipped"; }

test: installed browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/patching.py

clean:
	rm -rf $(VENV) demo_out build dist
