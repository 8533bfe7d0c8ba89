# The GPU image of hermes-trtllm: NVIDIA's Triton TensorRT-LLM container (TensorRT-LLM 1.2.1, the
# C++ tensorrtllm backend, trtllm-build) with this project installed on top. Every package the
# container ships is pinned to the container's own version while installing, so the project adds
# what is missing and replaces nothing under tensorrt_llm (a conflict fails the build).
#   make gpu-image        (= docker build -t hermes-trtllm:gpu-trtllm1.2.1 .)
# The base image is build_engine/container.py's DEFAULT_IMAGE (26.04-26.07 ship TensorRT-LLM 1.2.1).
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3
FROM ${BASE_IMAGE}

COPY pyproject.toml README.md /opt/hermes-trtllm/
COPY build_engine /opt/hermes-trtllm/build_engine
COPY model_repo /opt/hermes-trtllm/model_repo
COPY client /opt/hermes-trtllm/client
COPY benchmarks /opt/hermes-trtllm/benchmarks

RUN python3 -m pip list --format=freeze > /opt/hermes-trtllm/container-pins.txt \
 && python3 -m pip install --no-cache-dir -c /opt/hermes-trtllm/container-pins.txt "/opt/hermes-trtllm[container]" \
 && python3 -c "import importlib.metadata as m, common, build_engine, model_repo, client; print('tensorrt_llm', m.version('tensorrt_llm'))"

# Which code the image holds (build_engine.manifest.source_digest): `serve` outside the image runs the
# image's own `serve`, and refuses an image built from other code. The label must match what was installed.
ARG HERMES_SOURCE=unknown
LABEL hermes-trtllm.source=${HERMES_SOURCE}
RUN installed="$(cd / && python3 -m build_engine.manifest)" \
 && { [ "${HERMES_SOURCE}" = unknown ] || [ "${HERMES_SOURCE}" = "$installed" ] \
      || { echo "HERMES_SOURCE ${HERMES_SOURCE} is not the code installed ($installed)" >&2; exit 1; }; }

# The README's GPU workflow drives the steps with make.
RUN command -v make >/dev/null || (apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*)

WORKDIR /workspace
