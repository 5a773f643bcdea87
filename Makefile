# diffmask — set-up and common tasks. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned: the local CPU build; an open range would pull GBs of CUDA wheels
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: help install demo test test-fast lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv and install diffmask with its pinned stack (+dev tools)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: install  ## the whole pipeline, small, on CPU (JSRT if found, else the phantom)
	HF_HUB_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) -m diffmask.cli.pipeline experiment=pipeline_demo

test: install  ## the whole test suite (CPU, tiny models); what CI runs
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## the suite without the slow (multirun, DDP) tests
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS) -m "not slow"

lint: install  ## ruff
	$(VENV)/bin/ruff check diffmask tests experiments

bench: install  ## CPU micro-benchmarks (GPU recipes: experiments/*/README.md)
	HF_HUB_OFFLINE=1 $(PY) experiments/bench.py

clean:  ## remove run outputs (keeps .venv)
	rm -rf logs outputs multirun .pytest_cache
