# The two commands of the README: `make demo` and `make test`. Both set up .venv from scratch
# with the pinned versions in constraints.txt (torch==2.13.0: the CPU wheel here, never the CUDA stack).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test lint venv dev-venv lock clean bench

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

test: $(VENV)/.dev
	$(BIN)/ruff check vaedist tests benchmarks
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check vaedist tests benchmarks
	$(BIN)/ruff format --check vaedist tests benchmarks

# Re-pin every dependency after changing pyproject.toml (run in a fresh venv).
lock: $(VENV)/.dev
	$(BIN)/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' > constraints.body
	{ sed -n '/^#/p' constraints.txt; cat constraints.body; } > constraints.txt && rm constraints.body

clean:
	rm -rf $(VENV) mlflow.db mlartifacts vaedist-runs out .pytest_cache
