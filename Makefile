# Two entry points, each doing its own set-up on a fresh machine:
#   make table5   -> builds the environment, then `dvc repro table5_ablation` (smoke profile by default)
#   make test     -> builds the environment, then runs the test suite
#   make gpu-check -> builds the environment, then checks a GPU machine (python -m reproduce doctor)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# the exact tested versions (constraints.txt) within pyproject.toml's ranges; either file changing rebuilds
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: setup test table5 repro bench gpu-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip compiles bytecode at install time (imports of torch+timm are ~3x slower without it).
	$(BIN)/python -m pip install --quiet -e '.[test]' -c constraints.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

table5: setup
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 $(BIN)/dvc repro table5_ablation

repro: setup
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 $(BIN)/dvc repro

bench: setup
	$(BIN)/python -m reproduce bench

# GPU self-check (smoke training on all GPUs under torchrun/nccl, SyncBN, bf16 and fp16, evaluation,
# CUDA benchmark); report on stdout and in results/doctor.json. Without CUDA: one line, exit 2.
gpu-check: setup
	@$(BIN)/python -m reproduce doctor --device cuda

clean-venv:
	rm -rf $(VENV)
