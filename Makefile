# Set-up and entry points. Every target installs what it needs into .venv first, so each works on a
# fresh machine: `make run` (the embedded default DAG end to end) and `make test` (the test suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
CORES  ?= 2
STAMP  := $(VENV)/.flanpipe-installed
# Rules shell out to torchrun / flanpipe: put the venv's bin first for them.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test lint clean

# torch first, pinned: any other spec makes pip pull a multi-GB CUDA build on a CPU machine.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/snakemake --cores $(CORES) --profile profiles/local

test: setup
	$(PY) -m pytest -q -ra --durations=25

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake report.html
