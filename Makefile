# Two commands set everything up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BUNDLE ?= artifacts/small
HOST ?= 127.0.0.1
PORT ?= 8000
# ONNX Runtime build, one of pyproject's extras: gpu (onnxruntime-gpu, whose wheels exist for Linux
# x86_64 only) or cpu (onnxruntime, everywhere). Override with `make install ORT=cpu`.
ORT ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),gpu,cpu)
ORT_PACKAGE := $(if $(filter gpu,$(ORT)),onnxruntime-gpu,onnxruntime)
STAMP := $(VENV)/.installed-$(shell (sha256sum 2>/dev/null || shasum -a 256) < pyproject.toml | cut -c1-12)-$(ORT)

.PHONY: help install serve model tiny test test-docker image-cpu image-cuda lint format bench clean gpu-pack

help:
	@echo "make serve   install, build the default model if missing, serve it on http://$(HOST):$(PORT)"
	@echo "make test    install and run the whole test suite"
	@echo "make test-docker  build the CPU image (tiny bundle) and run it: container and compose tests"
	@echo "make image-cpu / image-cuda   build the serving image with the bundle $(BUNDLE)"
	@echo "make model   build the default (small) bundle into $(BUNDLE)"
	@echo "make lint    ruff check + format check"
	@echo "make bench   engine and serving benchmarks (writes docs/BENCHMARKS.md)"
	@echo "make gpu-pack  bundles, weights and wheels for python -m bench.gpu on a GPU machine (.gpu/, docs/gpu.md)"

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU wheel; install it first so nothing pulls the CUDA build.
# onnxruntime and onnxruntime-gpu install the same module: when the other one is there (ORT
# changed, or a venv from before the extras), both are removed before the chosen one goes in.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	@other=$(if $(filter gpu,$(ORT)),onnxruntime,onnxruntime-gpu); \
	if $(PIP) show -q $$other >/dev/null 2>&1; then \
		echo "ONNX Runtime: replacing $$other with $(ORT_PACKAGE) (ORT=$(ORT))"; \
		$(PIP) uninstall -y -q onnxruntime onnxruntime-gpu; \
	fi
	$(PIP) install -q -e '.[train,dev,$(ORT)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

$(BUNDLE)/config.json: | $(STAMP)
	@echo "No model bundle in $(BUNDLE): building the default 'small' model (about 8 minutes on 2 CPU cores)."
	$(PY) -m model build --preset small --out $(BUNDLE)

model: $(BUNDLE)/config.json

serve: $(STAMP) $(BUNDLE)/config.json
	$(PY) -m service --model $(BUNDLE) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Container tests: a real Docker engine, the CPU image built with a tiny bundle, then
# tests/deploy/test_container.py and test_compose_up.py (docs/deployment.md, "Testing the image").
test-docker: $(STAMP)
	PY=$(PY) deploy/docker/test-docker.sh

# Serving images with the bundle $(BUNDLE) (`make model` builds it when missing). With Docker 20.10
# (Debian 12) run as `make image-cpu DOCKER_BUILDKIT=1`.
DOCKER ?= docker
IMAGE ?= textgen
TAG ?= latest

image-cpu image-cuda: image-%: $(BUNDLE)/config.json
	$(DOCKER) build --build-arg RUNTIME=$* --build-arg BUNDLE_DIR=$(BUNDLE) -t $(IMAGE):$(TAG)-$* .

clean:
	rm -rf $(VENV) artifacts/tests .pytest_cache

# ---- offline engine benchmark: bench/engine.py, docs/BENCHMARKS.md "Engine (offline, CPU)" ----------
GENAI_VENV ?= .venv-genai
PRESET ?= small
INT8_BUNDLE ?= $(BUNDLE)-int8

.PHONY: bench-engine bench-env

# onnxruntime-genai needs the CPU onnxruntime package, which clashes with onnxruntime-gpu: its own
# environment, with the ONNX Runtime version the engine runs, and the engine's own imports
# (tokenizer, grammar matcher) so that bench.engine_genai runs both in one process.
bench-env: $(GENAI_VENV)/.installed-engine

$(GENAI_VENV)/.installed-engine:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q onnxruntime-genai==0.18.0 onnxruntime==1.31.1 numpy \
		$$(grep -oE '"(sentencepiece|llguidance)==[^"]+"' pyproject.toml | tr -d '"')
	@touch $@

$(INT8_BUNDLE)/config.json: $(BUNDLE)/config.json
	$(PY) -m model export --preset $(PRESET) --int8 --out $(INT8_BUNDLE)

# Every runner side by side on one machine (a few minutes); writes the tables into docs/BENCHMARKS.md.
bench-engine: $(STAMP) $(BUNDLE)/config.json $(INT8_BUNDLE)/config.json bench-env
	$(PIP) install -q -e '.[bench]'
	$(PY) -m bench.engine --bundle $(BUNDLE) --int8-bundle $(INT8_BUNDLE) --mixed 64 --bpc \
		--out docs/BENCHMARKS.md --plot docs/img/engine_bench.png --json bench/results/engine.json
	$(PY) -m bench.engine_profile --bundle $(BUNDLE) --batches 1,32,64 --mixed 64

# ---- GPU benchmark: what a GPU machine without network needs (docs/gpu.md) ---------------------------
gpu-pack: $(STAMP) $(BUNDLE)/config.json
	$(PY) -m bench.gpu_pack bench --checkpoint artifacts/.work/small/checkpoint.pt --out .gpu
	$(PY) -m bench.gpu_pack base --out .gpu-base
