# One entry point for humans and CI. PYTHON may point at any interpreter; `make install` puts the CPU
# wheel of torch first when none is installed, because a bare `torch` requirement pulls a multi-GB CUDA build.
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
FSCT := $(PYTHON) -m fsct
DEMO := outputs/demo
PYTEST_ARGS ?=

.PHONY: install demo test lint bench bench-shard bench-gpu bench-submission clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	@$(PYTHON) -c "import fsct, pytest, ruff" 2>/dev/null || $(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) tools/demo.py --out $(DEMO)

test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q $(PYTEST_ARGS)

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

clean:
	rm -rf outputs bench data shards/*/ wandb
