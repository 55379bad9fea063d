# Two commands do all the set-up on a fresh Linux machine with Python 3.10+:
#   make demo   synthesize a log and run the pipeline on it
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-prepare clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ezsasrec_ray.demo --workdir demo_output

test: $(STAMP)
	$(BIN)/python -m ruff check ezsasrec_ray jobs serve tests benchmarks
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/python -m ruff check ezsasrec_ray jobs serve tests benchmarks

bench-prepare: $(STAMP)
	$(BIN)/python benchmarks/prepare.py

clean:
	rm -rf demo_output .pytest_cache
