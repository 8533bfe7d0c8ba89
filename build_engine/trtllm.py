"""The GPU engine: `trtllm-build` on the W4A16_AWQ checkpoint, with fused attention kernels.

TensorRT-LLM cannot be installed on a machine without an NVIDIA GPU; this module builds the exact
command as data (tested), and runs it only where `trtllm-build` and a GPU are present (inside the
Triton TRT-LLM container named by the preset).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from build_engine import UserError, checkpoint, manifest, presets

ENGINE_KIND = "trtllm-engine"


def build_command(ckpt: Path, output: Path, limits: presets.EngineLimits, workers: int = 1) -> list[str]:
    """trtllm-build with the fused-attention plugin path: GPT attention plugin with context FMHA
    (paged), paged KV cache, packed (padding-free) inputs, GEMM plugin for the fp16 lm_head.
    The AWQ weight-only GEMM plugin is selected by the builder from the checkpoint's quant_algo."""
    return [
        "trtllm-build",
        "--checkpoint_dir", str(ckpt),
        "--output_dir", str(output),
        "--gpt_attention_plugin", "auto",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",
        "--paged_kv_cache", "enable",
        "--remove_input_padding", "enable",
        "--gemm_plugin", "auto",
        "--max_batch_size", str(limits.max_batch_size),
        "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len),
        "--max_num_tokens", str(limits.max_num_tokens),
        "--workers", str(workers),
    ]


def preset_for_checkpoint(ckpt: Path) -> presets.Preset:
    m = manifest.read(ckpt, "trtllm-checkpoint")
    name = m.get("preset")
    return presets.load(name) if name else presets.load("nous-hermes-2-mistral-7b-dpo")


def missing_requirements() -> list[str]:
    missing = []
    if shutil.which("trtllm-build") is None:
        missing.append("trtllm-build (TensorRT-LLM 1.2.x) is not on PATH")
    if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode:
        missing.append("no NVIDIA GPU is visible (nvidia-smi)")
    return missing


def build(ckpt: Path, output: Path, dry_run: bool = False, limits: presets.EngineLimits | None = None) -> list[str]:
    ckpt, output = Path(ckpt), Path(output)
    checkpoint.validate(ckpt)
    preset = preset_for_checkpoint(ckpt)
    cmd = build_command(ckpt, output, limits or preset.engine)
    if dry_run:
        return cmd
    missing = missing_requirements()
    if missing:
        raise UserError(
            "cannot build a TensorRT-LLM engine here: " + "; ".join(missing)
            + f". Run this inside the {preset.triton_image} container on a GPU host "
            "(see README, 'GPU workflow'), or use --target cpu"
        )
    subprocess.run(cmd, check=True, env={**os.environ})
    manifest.write(output, ENGINE_KIND, checkpoint={"path": str(ckpt), "manifest": manifest.read(ckpt)["files"]},
                   preset=preset.name, command=cmd,
                   runtime={"max_attention_window_size": preset.max_attention_window,
                            "kv_cache_free_gpu_mem_fraction": preset.engine.kv_cache_free_gpu_mem_fraction},
                   model=manifest.read(ckpt)["model"], limits=vars(preset.engine))
    shutil.copytree(ckpt / "tokenizer", output / "tokenizer", dirs_exist_ok=True)
    return cmd
