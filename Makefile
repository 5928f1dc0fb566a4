# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Both install from the lock file (requirements/test.lock): every package of the test and demo
# environments pinned with its hashes, so an upstream release cannot turn main red between two
# commits. `make lock` refreshes the lock; `make test-latest` tries the newest allowed versions.
# docs/dependencies.md says how and why.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LATEST ?= .venv-latest
# Where this project's machines keep the CPU build of torch that the lock pins
# (requirements/torch-cpu.txt); elsewhere, point WHEELS at a folder holding that wheel.
WHEELS ?= /opt/wheels
LOCK := requirements/test.lock
BOOTSTRAP := requirements/bootstrap.txt
TORCH_CPU := requirements/torch-cpu.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) $(BOOTSTRAP) | cksum | cut -d' ' -f1)
UV_FLAGS := --find-links $(WHEELS) --quiet
PYTEST := -m pytest -q -p no:cacheprovider --timeout=900

.PHONY: demo test test-latest lock lint bench-speed install clean

# A virtual environment with uv (hash-checked), the installer of everything else.
$(BIN)/uv: $(BOOTSTRAP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(BOOTSTRAP)
	touch $@

$(STAMP): pyproject.toml $(LOCK) $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) --require-hashes -r $(LOCK)
	$(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m modelalloy.demo

test: $(STAMP)
	$(BIN)/python $(PYTEST)

# Re-resolve the lock from the newest versions pyproject allows (torch held at the CPU wheel).
lock: $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra test --generate-hashes --upgrade --refresh \
		--python-version 3.11 --constraint $(TORCH_CPU) $(UV_FLAGS) -o $(LOCK)

# The suite on the newest versions pyproject allows, in its own environment: finds out early,
# and on purpose, that a new transformers, typer, numba... breaks us.
test-latest: $(BIN)/uv
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(BIN)/uv pip install --python $(LATEST)/bin/python $(UV_FLAGS) --upgrade --refresh \
		--constraint $(TORCH_CPU) -e ".[test]"
	$(LATEST)/bin/python $(PYTEST)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) $(LATEST) demo-out
