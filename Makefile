# Two entry points (see README.md):
#   make reproduce   create .venv, install the pinned dependencies and the package, write the raw
#                    data, check the external inputs the active params.yaml needs (seconds), then
#                    `dvc repro` the pipeline (Figures 1-7 into figures/) and print a summary
#   make test        the same setup, then the whole test suite (offline)
#   make lab         JupyterLab at the repository root (notebooks/ are Jupytext pairs)
# Setup is idempotent: it reinstalls only when pyproject.toml or requirements-lock.txt change.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# A Python 3.11 interpreter to create the venv with.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# e.g. PROFILE=tiny: apply profiles/tiny.yaml to params.yaml before `dvc repro`.
PROFILE ?=
PYTEST_ARGS ?=
# Extra arguments for `jupyter lab`, e.g. make lab ARGS="--port 8899 --no-browser --ip 0.0.0.0"
ARGS ?=
# jupyter refuses to start as root unless told: in a container, root is the usual user.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

# dvc.yaml's commands call `python`: make it the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: help setup data reproduce test lab clean-results

help:
	@echo "make reproduce   set up .venv and run the pipeline (dvc repro) on params.yaml"
	@echo "make test        set up .venv and run the test suite"
	@echo "make lab         JupyterLab at the repository root (open notebooks/*.ipynb)"
	@echo "options: PYTHON=python3.11  PROFILE=tiny  PYTEST_ARGS='-k digits'  ARGS='--port 8899'"

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	@test -x $(VENV)/bin/python || { echo "setup: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@$(VENV)/bin/python -c 'import sys; v = sys.version_info[:2]; assert v == (3, 11), f"need Python 3.11 for the pins, got {v}: make PYTHON=/path/to/python3.11"'
	@echo "setup: installing the pinned packages (requirements-lock.txt; torch, transformers, dvc, jupyterlab ...): about 5 minutes on a new machine, seconds when they are cached"
	$(VENV)/bin/python -m pip install --disable-pip-version-check --quiet -c requirements-lock.txt -e ".[replication,test]"
	@echo "setup: registering the notebooks' Jupyter kernel"
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (localvol)" >/dev/null
	@echo "setup: done ($(VENV))"
	@touch $(STAMP)

# Raw inputs (data/, tracked by data.dvc). With a DVC remote configured, pull them; otherwise
# (a fresh clone) write them: a byte-for-byte copy of scikit-learn's bundled digits file, so
# `dvc add` reproduces the committed data.dvc hash.
data: setup
	@if [ ! -e data/digits/digits.csv.gz ] && [ -n "$$(dvc remote list)" ]; then dvc pull data.dvc; fi
	python -m replication.mlp.data write-data data/digits
	dvc add --quiet data

reproduce: data
	$(if $(PROFILE),python -m replication.pipeline apply-profile profiles/$(PROFILE).yaml)
	python -m replication.pipeline preflight
	dvc repro
	python -m replication.summary

test: setup
	HF_HUB_OFFLINE=1 python -m pytest -ra $(PYTEST_ARGS)

lab: setup
	jupyter lab --notebook-dir="$(CURDIR)" --config="$(CURDIR)/jupyter_server_config.py" $(ALLOW_ROOT) $(ARGS)

clean-results:
	rm -rf results
