# One entry point for humans and CI: `make demo`, `make test` work on a fresh clone with a stock Python.
# Interpreter: the active virtualenv/conda env when there is one, else .venv here (made on first use), because
# a system Python refuses pip installs (PEP 668). PYTHON=... picks any other interpreter.
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON ?= python
else
PYTHON ?= .venv/bin/python
endif
# torch: the CPU wheel where no NVIDIA GPU answers (the default wheel is a multi-GB CUDA build), from
# TORCH_INDEX; where that index cannot be reached (offline mirrors), fall back at once to the configured index.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
FSCT := $(PYTHON) -m fsct
DEMO := outputs/demo
PYTEST_ARGS ?=

.PHONY: install install-torch demo test lint bench bench-shard bench-gpu bench-submission clean

.venv/bin/python:
	python3 -m venv .venv

install: $(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory install-torch
	@$(PYTHON) -c "import importlib.metadata as m; [m.version(p) for p in ('fsct', 'pytest', 'ruff')]" 2>/dev/null \
		|| $(PYTHON) -m pip install -q -e ".[dev]"

install-torch:
	@if nvidia-smi >/dev/null 2>&1; then \
		echo "make: NVIDIA GPU found: default (CUDA) torch build"; $(PYTHON) -m pip install -q "$(TORCH_SPEC)"; \
	else \
		echo "make: no NVIDIA GPU: CPU torch from $(TORCH_INDEX)"; \
		$(PYTHON) -m pip install -q --retries 0 --timeout 5 --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)" 2>/dev/null \
		|| { echo "make: $(TORCH_INDEX) not reachable: torch from the configured index"; \
		     $(PYTHON) -m pip install -q "$(TORCH_SPEC)"; }; \
	fi

demo: install
	$(PYTHON) tools/demo.py --out $(DEMO)

test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -rs $(PYTEST_ARGS)

lint: install
	$(PYTHON) -m ruff check fsct tests tools

bench: bench-shard bench-submission

bench-shard: install
	$(PYTHON) tools/bench_shard.py --work bench/shard

bench-submission: install
	$(PYTHON) tools/bench_submission.py

bench-gpu: install
	$(FSCT) bench train --config configs/panet_5w5s.yaml --compare-compile --out bench/train.json
	$(FSCT) bench predict --out bench/predict.json
	$(FSCT) bench predict --config configs/partition_gpu.yaml --compare-partition-ops --out bench/predict_partition.json

clean:
	rm -rf outputs bench data shards/*/ wandb
