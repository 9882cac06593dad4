# The whole set-up is `make demo` (the main job) or `make test` (the test suite); each creates
# the virtual environment it needs on first use, with every extra (`pip install moevlm` alone is the
# lean core: see docs/getting-started.md). `make docs` builds the documentation site into site/;
# `make wheel-check` builds the wheel and sdist and tries the wheel, core only, in a clean virtual environment.
PYTHON ?= python3
VENV ?= .venv
# Installed first and on its own, so pip never resolves a bare "torch" to a multi-GB CUDA
# build. Elsewhere set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test docs wheel-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e ".[all,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moevlm demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest

# The documentation site into site/ (open site/index.html); --strict: a broken link or reference fails.
docs: $(STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

wheel-check: $(STAMP)
	PYTHON=$(VENV)/bin/python BASE_PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" .ci/wheel_check
