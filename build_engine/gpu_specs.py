"""What a GPU moves and computes per engine step: datasheet bandwidths and dense fp16 throughput, and
the bytes a decode step reads for an INT4-AWQ model. `benchmarks roofline` bounds decode speed with it;
the synthetic engine (build_engine.synthetic) paces its steps with it."""

from __future__ import annotations

import math
from pathlib import Path

# Peak HBM/GDDR bandwidth, GB/s (vendor datasheets).
GPU_BANDWIDTH_GBS = {"h100": 3350, "h200": 4800, "a100": 2039, "a100-40gb": 1555, "l40s": 864, "l4": 300,
                     "a10": 600, "b200": 8000}
# Dense fp16/bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity).
GPU_FP16_TFLOPS = {"h100": 989, "h200": 989, "a100": 312, "a100-40gb": 312, "l40s": 362, "l4": 121,
                   "a10": 125, "b200": 2250}


def check_gpu(gpu: str) -> str:
    gpu = gpu.lower()
    if gpu not in GPU_BANDWIDTH_GBS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(GPU_BANDWIDTH_GBS))}")
    return gpu


def bytes_from_shapes(arch: dict, group_size: int, weight_bits: int = 4, scale_bytes: int = 2,
                      head_bytes: int = 2) -> dict[str, int]:
    """Weights read per decode step: int4 linears + their per-group scales + the fp16 lm_head.
    (Embedding lookups read one row; norms are negligible.)"""
    h, L = arch["hidden_size"], arch["num_hidden_layers"]
    hd = arch.get("head_dim") or h // arch["num_attention_heads"]
    q, kv, inter = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd, arch["intermediate_size"]
    linear = [(q + 2 * kv, h), (h, q), (inter, h), (inter, h), (h, inter)]  # (out, in)
    params = L * sum(o * i for o, i in linear)
    return {
        "quantized_weights": params * weight_bits // 8,
        "scales": L * sum(o * (i // group_size) for o, i in linear) * scale_bytes,
        "lm_head": arch["vocab_size"] * h * head_bytes,
    }


def bytes_from_checkpoint(ckpt: Path) -> dict[str, int]:
    """The same for the whole model, read off a TRT-LLM checkpoint's tensors, every rank's file
    (scales counted at fp16, as trtllm-build stores them for the W4A16 GEMM)."""
    from safetensors import safe_open

    out = {"quantized_weights": 0, "scales": 0, "lm_head": 0}
    for path in sorted(Path(ckpt).glob("rank*.safetensors")):
        with safe_open(path, "np") as f:
            for name in f.keys():
                n = math.prod(f.get_slice(name).get_shape())
                if name.endswith(".weight") and ".layers." in name and "layernorm" not in name:
                    out["quantized_weights"] += n  # int8 storage holds two int4 codes
                elif name.endswith("weights_scaling_factor"):
                    out["scales"] += n * 2
                elif name == "lm_head.weight":
                    out["lm_head"] += n * 2
    return out


def kv_bytes_per_token(arch: dict, dtype_bytes: int = 2) -> int:
    """KV cache bytes one position holds (keys and values of every layer; fp16 by default)."""
    hd = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    return 2 * arch["num_hidden_layers"] * arch["num_key_value_heads"] * hd * dtype_bytes


def flops_per_token(weight_bytes: dict[str, int]) -> int:
    """Multiply-adds of the linears and the lm_head for one token: 2 flops per int4 weight (two per
    byte) and per fp16 lm_head weight (attention's own flops are left out: small at chat lengths)."""
    return 2 * (2 * weight_bytes["quantized_weights"] + weight_bytes["lm_head"] // 2)
