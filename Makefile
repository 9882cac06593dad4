# The whole set-up is `make demo` (the main job) or `make test` (the test suite); each creates
# the virtual environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
# Installed first and on its own, so pip never resolves a bare "torch" to a multi-GB CUDA
# build. Elsewhere set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moevlm demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest
