"""The GPU engine: `trtllm-build` on the W4A16_AWQ checkpoint, with fused attention kernels.

TensorRT-LLM cannot be installed on a machine without an NVIDIA GPU; this module builds the exact
command as data (tested), and runs it only where `trtllm-build` and a GPU are present (inside the
Triton TRT-LLM container, build_engine.container).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from build_engine import UserError, checkpoint, container, manifest, presets

ENGINE_KIND = "trtllm-engine"


def build_command(ckpt: Path, output: Path, limits: presets.EngineLimits, workers: int = 1) -> list[str]:
    """trtllm-build (TensorRT-LLM 1.2.x) with the fused-attention path: GPT attention plugin with
    context FMHA (paged), paged KV cache, packed (padding-free) inputs, GEMM plugin for the fp16
    lm_head. The AWQ weight-only GEMM is selected by the builder from the checkpoint's quant_algo.
    `--kv_cache_type paged` replaces the deprecated `--paged_kv_cache enable` (1.2's build.py)."""
    return [
        "trtllm-build",
        "--checkpoint_dir", str(ckpt),
        "--output_dir", str(output),
        "--gpt_attention_plugin", "auto",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",
        "--kv_cache_type", "paged",
        "--remove_input_padding", "enable",
        "--gemm_plugin", "auto",
        "--max_batch_size", str(limits.max_batch_size),
        "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len),
        "--max_num_tokens", str(limits.max_num_tokens),
        "--workers", str(workers),
    ]


def missing_requirements() -> list[str]:
    missing = []
    if shutil.which("trtllm-build") is None:
        missing.append(f"trtllm-build (TensorRT-LLM {container.SUPPORTED_TRTLLM}x) is not on PATH")
    if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode:
        missing.append("no NVIDIA GPU is visible (nvidia-smi)")
    return missing


def tensorrt_llm_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_logged(cmd: list[str]) -> tuple[int, list[str]]:
    """Run with the tool's own log on stderr (the build takes minutes); keep its tail for the error."""
    import collections
    import sys

    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    return proc.returncode, list(tail)


def build(ckpt: Path, output: Path, dry_run: bool = False, limits: presets.EngineLimits | None = None) -> list[str]:
    ckpt, output = Path(ckpt), Path(output)
    ck_manifest = manifest.read(ckpt, "trtllm-checkpoint")
    checkpoint.validate(ckpt, real_vocab=ck_manifest["model"]["vocab_size"])
    preset = presets.for_checkpoint(ck_manifest)
    image = preset.triton_image if preset else container.DEFAULT_IMAGE
    limits = limits or presets.limits_for(ck_manifest)
    # The world size is the checkpoint's (its mapping, from `quantize --tp-size`): trtllm-build takes no
    # TP flag and builds one rank<r>.engine per rank, `--workers` of them at once (one per GPU).
    ck_config = checkpoint.read_config(ckpt)
    world_size = ck_config["mapping"]["world_size"]
    cmd = build_command(ckpt, output, limits, workers=world_size)
    if dry_run:
        return cmd
    missing = missing_requirements()
    if missing:
        raise UserError(
            "cannot build a TensorRT-LLM engine here: " + "; ".join(missing)
            + f". Run this inside the {image} container on a GPU host "
            "(see README, 'GPU workflow'), or use --target cpu"
        )
    version = tensorrt_llm_version()
    if version is None or not version.startswith(container.SUPPORTED_TRTLLM):
        raise UserError(f"TensorRT-LLM {version or '(not importable)'} is installed; the TensorRT engine path and "
                        f"the tensorrtllm Triton backend need {container.SUPPORTED_TRTLLM}x ({image})")
    facts = ck_manifest["model"]
    with manifest.staging(output) as tmp:
        code, tail = _run_logged(build_command(ckpt, tmp, limits, workers=world_size))
        if code:
            raise UserError(f"trtllm-build failed with exit code {code}; its last lines:\n" + "\n".join(tail))
        missing = [f"rank{r}.engine" for r in range(world_size) if not (tmp / f"rank{r}.engine").is_file()]
        if missing:
            raise UserError(f"trtllm-build exited 0 but wrote no {', '.join(missing)} for world size {world_size}")
        shutil.copytree(ckpt / "tokenizer", tmp / "tokenizer")
        manifest.write(tmp, ENGINE_KIND,
                       checkpoint={"path": str(ckpt.resolve()), "files": ck_manifest["files"]},
                       preset=preset.name if preset else None, command=cmd, image=image,
                       # What the build really ran in: NVIDIA's containers set NVIDIA_TRITON_SERVER_VERSION.
                       container_release=os.environ.get("NVIDIA_TRITON_SERVER_VERSION"),
                       tensorrt_llm=version, world_size=world_size,
                       # The width the engine samples over: the checkpoint's vocab_size, which ModelOpt pads to a
                       # multiple of 64 with zero rows (logit 0): ids the tokenizer does not have, unless banned.
                       engine_vocab_size=ck_config["vocab_size"],
                       runtime={"kv_cache_free_gpu_mem_fraction": limits.kv_cache_free_gpu_mem_fraction},
                       model=facts, limits=vars(limits))
    return cmd
