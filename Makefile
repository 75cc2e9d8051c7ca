# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv with the pinned requirements on first use.

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test lint format dag study clean-demo

$(STAMP): requirements.txt
	command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

## The whole workflow on generated demo data, on the CPU (a few minutes on 2 cores).
demo: $(STAMP)
	snakemake --configfile config/demo.yaml --cores 2

## The test suite; Slurm tests run where Slurm is installed (.ci/run installs it).
test: $(STAMP)
	python -m pytest tests

lint: $(STAMP)
	snakemake --lint --configfile config/demo.yaml
	snakefmt --check Snakefile rules
	ruff check workflow_scripts tests
	ruff format --check workflow_scripts tests

format: $(STAMP)
	snakefmt Snakefile rules
	ruff format workflow_scripts tests
	ruff check --fix workflow_scripts tests

## The rule graph as SVG (needs graphviz's `dot`).
dag: $(STAMP)
	snakemake --configfile config/demo.yaml --rulegraph | dot -Tsvg > docs/rulegraph.svg

## Fine tuning vs the head on real image sets shipped in scikit-learn / scikit-image (CPU,
## about half an hour on 2 cores); prints the README's study table.
study: $(STAMP)
	python -m pip install --quiet -r tools/requirements-study.txt
	python tools/study_finetune.py --out study

clean-demo:
	rm -rf data/demo results logs benchmarks
