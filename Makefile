# vgen developer entry points. `make demo` and `make test` are the two set-up commands.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP = $(VENV)/bin/pip
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install $(TORCH_SPEC) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/unet_step.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
