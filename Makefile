# `make demo` and `make test` each create or reuse .venv. torch==2.13.0 is installed first so that
# nothing pulls a CUDA build; never add torchvision.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/tsm bench digits

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check tsm tests
	$(VENV)/bin/ruff check tsm tests

test: lint
	$(PY) -m pytest

format: $(VENV)/.installed
	$(VENV)/bin/ruff format tsm tests
	$(VENV)/bin/ruff check --fix tsm tests

bench: $(VENV)/.installed
	$(PY) -m tsm.bench.speed
