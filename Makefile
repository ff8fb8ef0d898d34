# Fresh clone: `make test` or `make demo` creates .venv and installs everything.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RANK1  := $(VENV)/bin/rank1
# torch is pinned for development and CI (a CPU wheel of it is on these machines);
# the package itself accepts torch>=2.1.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo bench bench-report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The whole suite (what CI runs), then the 15 slowest tests. About 11 minutes on a busy 2-core machine.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# Without the tests that start Ray or train the demo policy (markers `ray`, `training`).
test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not ray and not training"

demo: $(STAMP)
	$(RANK1) demo --force

# Every benchmark, then docs/benchmarks.md regenerated from benchmarks/results/*.json.
# `$(PY) benchmarks/run_all.py --only NAME` runs one; `--quick` checks every script at tiny sizes.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Only the page, from the existing results files (needs no venv: it imports no torch).
bench-report:
	$(PYTHON) benchmarks/run_all.py --report-only

clean:
	rm -rf $(VENV) demo-out benchmarks/work .pytest_cache
