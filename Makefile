# Two entry points for a fresh machine: `make demo` and `make test`.
# On a CPU-only machine torch is pinned to 2.13.0 first, so nothing pulls a multi-GB CUDA
# build. On a GPU machine pass the CUDA build you want, e.g. TORCH_SPEC="torch==2.13.0".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/wham-batch run configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf out .pytest_cache
