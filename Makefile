# The two commands of the README: `make demo` and `make test`. Both set up .venv from scratch
# with the pinned versions in constraints.txt (torch==2.13.0: the CPU wheel here, never the CUDA stack).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-fast test-data system-packages lint venv dev-venv lock clean bench

$(VENV)/.runtime: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) -e ".[dev]"
	touch $@

venv: $(VENV)/.runtime
dev-venv: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/vaedist run jobs/demo.yaml

# The whole suite: real Ray, real MLflow, real MNIST / Fashion-MNIST, a real browser and PostgreSQL.
test: $(VENV)/.dev system-packages test-data
	$(BIN)/ruff check vaedist tests benchmarks
	$(BIN)/pytest $(PYTEST_ARGS)

# The fast tier: unit tests only (config, models, likelihoods, plans, decisions, parsing, figures);
# no data, no Ray cluster, no browser; 80 s on 2 cores (595 tests, 2026-12-07, AMD EPYC AVX2; goal <= 2 min).
test-fast: $(VENV)/.dev
	$(BIN)/ruff check vaedist tests benchmarks
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# Debian's chromium and postgresql, when missing (the UI and PostgreSQL-store tests drive them).
system-packages:
	bash scripts/system-packages.sh

# The official MNIST / Fashion-MNIST files for the slow tier: with $$VAEDIST_DATA_DIR set (CI), or
# ../shared/data beside the checkout, nothing is downloaded; otherwise the same verified download users
# get, into the data cache.
test-data: $(VENV)/.runtime
	@if [ -z "$$VAEDIST_DATA_DIR" ] && [ ! -d ../shared/data/mnist ]; then \
		$(BIN)/vaedist data fetch mnist && $(BIN)/vaedist data fetch fashion-mnist; \
	else \
		echo "test data: $${VAEDIST_DATA_DIR:-../shared/data} (nothing to download)"; \
	fi

# ruff check only: the code keeps its own line breaks (up to ~120 columns where a line reads better whole),
# which `ruff format` would rewrap in 45 files; `ruff format FILE` is still fine on new files.
lint: $(VENV)/.dev
	$(BIN)/ruff check vaedist tests benchmarks

# Re-pin every dependency after changing pyproject.toml (run in a fresh venv).
lock: $(VENV)/.dev
	$(BIN)/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' > constraints.body
	{ sed -n '/^#/p' constraints.txt; cat constraints.body; } > constraints.new  # not > constraints.txt: it is still being read
	mv constraints.new constraints.txt && rm constraints.body

clean:
	rm -rf $(VENV) mlflow.db mlartifacts vaedist-runs out .pytest_cache
