# Two entry points for a fresh machine: `make demo` and `make test`.
# Setup installs torch (TORCH_SPEC) first, from the normal package index unless
# TORCH_INDEX_URL names another; on Linux the normal index gives the CUDA build (several GB).
# On a CPU-only Linux machine take the CPU build instead:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A GPU machine keeps the default (or passes the index of the CUDA build it wants); then
# `.venv/bin/pip install -e ".[gpu]"` adds flash-attn.
# python3 must be Python 3.11 or newer; otherwise name one: make demo PYTHON=python3.11
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# pip at -qq: errors only (its warnings are about the machine's pip configuration, not this
# project, and would bury the demo's output).
PIP_INSTALL = $(BIN)/python -m pip install --quiet --quiet

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "$(PYTHON) is Python %d.%d; wham-batch needs 3.11 or newer: make ... PYTHON=python3.11" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") \
		"$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/wham-batch run configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf out .pytest_cache
