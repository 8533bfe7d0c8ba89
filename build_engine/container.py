"""The NVIDIA Triton TensorRT-LLM container the whole GPU workflow runs in (quantize, trtllm-build,
generate, serve), and what it ships. One place: presets name an image from `IMAGES`, the
Dockerfile builds FROM `DEFAULT_IMAGE`, `constraints-trtllm.txt` pins `TRTLLM_PINS`, and tests
check all three against this table.

Sources:
- images: triton-inference-server/server, docs/introduction/compatibility.md @ 0f963c9a (read
  2026-11): 26.02-trtllm-python-py3 ships TensorRT-LLM 1.1.0, 26.03 ships 1.2.0, 26.04 to 26.07 ship
  1.2.1 with TensorRT 10.14.1.48, PyTorch 2.10.0a0+b4e4ee81d3.nv25.12, Python 3.12.3, CUDA 13.1.0.036,
  driver 590.44.01. No later trtllm-python-py3 row exists there.
- pins: NVIDIA/TensorRT-LLM v1.2.1, requirements.txt (the package metadata of tensorrt_llm 1.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Image:
    tag: str
    tensorrt_llm: str
    tensorrt: str
    python: str
    torch: str
    cuda: str
    driver: str


_REGISTRY = "nvcr.io/nvidia/tritonserver"
IMAGES = {
    f"{_REGISTRY}:{month}-trtllm-python-py3": Image(
        f"{month}-trtllm-python-py3", tensorrt_llm="1.2.1", tensorrt="10.14.1.48", python="3.12.3",
        torch="2.10.0a0+b4e4ee81d3.nv25.12", cuda="13.1.0.036", driver="590.44.01")
    for month in ("26.04", "26.05", "26.06", "26.07")
}
DEFAULT_IMAGE = f"{_REGISTRY}:26.07-trtllm-python-py3"
# The TensorRT engine path (trtllm-build, the C++ tensorrtllm Triton backend) lives through 1.2.x.
SUPPORTED_TRTLLM = "1.2."

# TensorRT-LLM 1.2.1's own pins of the Python packages this project touches. Installing the
# project inside the container must not replace any of them (the Dockerfile enforces it), and the
# container-versions test venv (.venv-trtllm, constraints-trtllm.txt) runs the tests under them.
TRTLLM_PINS = {
    "transformers": "==4.57.3",
    "nvidia-modelopt": "~=0.37.0",
    "numpy": "<2",
    "setuptools": "<80",
    "torch": ">=2.9.1,<=2.10.0a0",
    "datasets": "==3.1.0",
    "onnx": "<1.20",
}


def image(tag: str) -> Image:
    if tag not in IMAGES:
        raise KeyError(f"{tag} is not a known Triton TensorRT-LLM {SUPPORTED_TRTLLM}x image "
                       f"(known: {', '.join(sorted(IMAGES))})")
    return IMAGES[tag]


# The GPU image of this project: DEFAULT_IMAGE plus this project (Dockerfile; `make gpu-image`).
# The python models of a GPU repository (preprocessing, postprocessing, BLS) import this project,
# so a GPU repository is served from this image, not from the bare NVIDIA one.
SERVING_IMAGE = "hermes-trtllm:gpu-trtllm1.2.1"
