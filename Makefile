# Everyday targets. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Keep every cache (tokenizer, tiny models, HF) inside the project, never /tmp defaults.
export MXLORA_CACHE ?= $(CURDIR)/.cache/mxlora
export HF_HOME ?= $(CURDIR)/.cache/hf
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-all lint format bench clean

$(BIN)/mxlora: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build lies on this machine's disk; a bare `torch` would pull CUDA.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/mxlora

demo: setup
	$(BIN)/mxlora run configs/tiny/seed.yaml

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/pytest -n 2 --dist loadgroup

test-all: setup
	$(BIN)/pytest -m "" -n 2 --dist loadgroup

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: setup
	$(BIN)/mxlora bench bench/configs/gpt-oss-20b.yaml

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache
