# Everyday targets. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Keep every cache (tokenizer, tiny models, HF) inside the project, never /tmp defaults.
export MXLORA_CACHE ?= $(CURDIR)/.cache/mxlora
export HF_HOME ?= $(CURDIR)/.cache/hf
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-all lint format bench bench-120b clean

$(BIN)/mxlora: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build lies on this machine's disk; a bare `torch` would pull CUDA.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/mxlora

demo: setup
	$(BIN)/mxlora run configs/tiny/seed.yaml --overwrite

# Two xdist workers on the 2-core machine, one BLAS/OpenMP thread each: oversubscribed threads made
# tiny CPU training steps ~20x slower. --dist loadfile keeps a module (and its module-scoped tiny
# models) on one worker; xdist_group marks are not honoured under pytest 9 + xdist 3.8.
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -n 2 --dist loadfile

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(PYTEST)

test-all: setup
	$(PYTEST) -m ""

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: setup
	$(BIN)/mxlora bench bench/configs/gpt-oss-20b.yaml

# gpt-oss-120b generated in GPU memory (random:120b): one 80 GB GPU, no checkpoint on disk.
bench-120b: setup
	$(BIN)/mxlora bench bench/configs/gpt-oss-120b.yaml

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache
