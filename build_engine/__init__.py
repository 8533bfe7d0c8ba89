"""build_engine: Hugging Face checkpoint -> INT4-AWQ TensorRT-LLM checkpoint -> GPU or CPU engine.

Data flow (one module each): sources (where the HF model comes from) -> calibration (text to
calibrate on) -> quantize (ModelOpt INT4-AWQ + export) -> checkpoint (the W4A16_AWQ contract:
read, validate, unpack) -> trtllm (the GPU engine command) | cpu (the CPU engine: graph writer,
decoder, sampling, inflight scheduler) -> verify (engine vs reference, quantized vs original).
tokenization (tokenizer loading, streaming detokenizer) is shared with the Triton models.
"""

__version__ = "0.1.0"

from common.errors import UserError  # noqa: E402,F401  (build_engine's errors are the ground floor's)
