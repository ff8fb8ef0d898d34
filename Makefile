# Fresh clone: `make test` or `make demo` creates .venv and installs everything.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RANK1  := $(VENV)/bin/rank1
# torch is pinned for development and CI (a CPU wheel of it is on these machines);
# the package itself accepts torch>=2.1.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install lint format test test-fast demo docs-examples bench bench-report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# ruff: lint (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and the format check, CI runs it first,
# over the whole repository: code, tests, benchmarks, docs scripts and the Python blocks of the docs pages.
LINT_PATHS := .
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# The whole suite (what CI runs), then the 15 slowest tests: about 5 minutes on a quiet 2-core machine.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# Without the tests that start Ray or train the demo policy (markers `ray`, `training`).
test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not ray and not training"

# The GRPO demo in demo-out/ and its page (demo-out/report.html, the path printed), and the planted
# synthetic run in demo-synthetic/, on which the examples of docs/commands/*.md run as written (seconds).
demo: $(STAMP)
	$(RANK1) demo --force
	$(RANK1) report demo-out --out demo-out/report.html --force -q
	$(RANK1) demo --synthetic --out demo-synthetic --force -q

# Rerun every example of docs/commands/*.md and docs/cli.md and write their transcripts into the
# pages (tests/test_docs_examples.py checks them; a scratch folder, nothing left here).
docs-examples: $(STAMP)
	$(PY) docs/commands/examples.py write

# Every benchmark, then docs/benchmarks.md regenerated from benchmarks/results/*.json.
# `$(PY) benchmarks/run_all.py --only NAME` runs one; `--quick` checks every script at tiny sizes.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Only the page, from the existing results files (needs no venv: it imports no torch).
bench-report:
	$(PYTHON) benchmarks/run_all.py --report-only

clean:
	rm -rf $(VENV) demo-out demo-synthetic benchmarks/work .pytest_cache
