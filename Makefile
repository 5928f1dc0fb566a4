# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench-speed install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The pinned CPU wheel lies on this machine's disk; a bare `torch` would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 || echo "pinned CPU torch not available; using torch>=2.4 from the package"
	$(BIN)/python -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m modelalloy.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) demo-out
