# The two commands a new user needs: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsedit-setup

.PHONY: setup test demo report lint format bench clean

# The compiled CPU kernels: built once per source, torch and CPU (a no-op when that build exists). Without a
# compiler everything still runs, on the reference backend (`sparsedit info` says why).
setup: $(STAMP)
	@$(VENV)/bin/sparsedit build-ops || echo "(the compiled CPU kernels were not built: the reference backend runs)"

# Re-runs only when the package metadata or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# The web editor on the shipped scene models: prints the URL, serves until Ctrl-C.
demo: setup
	$(VENV)/bin/sparsedit serve --host 127.0.0.1 --port $(or $(PORT),8000) --measure-dense

# The static HTML report of fixed edits (what `make demo` wrote before the web editor).
report: setup
	$(VENV)/bin/sparsedit report --out demo-out

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) benchmarks/conv_stack.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache build *.egg-info src/*.egg-info
