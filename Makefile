VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean mutate

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/hyperdescent demo

test: setup lint
	OMP_NUM_THREADS=2 $(PY) -m pytest

bench: setup
	$(PIP) install -q -e '.[dev,bench]'
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache

# mutation testing (not part of CI: hours for all mutants on two cores): mutmut over
# hypergrad/, optim/, tuners/ with the fast test selection of pyproject.toml; MUTATE_SAMPLE=N
# runs a seeded uniform sample of N mutants instead; report in benchmarks/results/mutation.md
MUTATE_SAMPLE ?= 0
mutate: setup
	$(PIP) install -q mutmut==3.8.1
	rm -rf mutants
	OMP_NUM_THREADS=1 $(PY) benchmarks/mutate.py --sample $(MUTATE_SAMPLE) --seed 0 \
		--out benchmarks/results/mutation.md
