"""Batch-1 decode is memory-bound: each generated token reads every weight once. Bytes per decode
step from the model's shapes and quantization (or a checkpoint's actual tensors) give an upper
bound on tokens/s for a GPU's memory bandwidth."""

from __future__ import annotations

import json
from pathlib import Path

from build_engine.gpu_specs import GPU_BANDWIDTH_GBS, bytes_from_checkpoint, bytes_from_shapes, check_gpu

__all__ = ["GPU_BANDWIDTH_GBS", "bytes_from_checkpoint", "bytes_from_shapes", "roofline", "inputs", "format_roofline"]


def roofline(bytes_per_step: dict[str, int], gpu: str, batch: int = 1, tp: int = 1, arch: dict | None = None) -> dict:
    """The bound for one GPU of `tp`: tensor parallelism splits every weight (the linears, their
    scales and the lm_head) evenly, so each GPU reads 1/tp of the bytes per step. In exchange every
    decoder layer all-reduces its activations twice (after attention and after the MLP), and the
    logits are gathered: with `arch`, the traffic per token each GPU sends (ring all-reduce:
    2 (tp-1)/tp of the message) and the number of all-reduces per step, whose latency (some us each
    over NVLink) rather than bandwidth is what they cost at batch 1."""
    gpu = check_gpu(gpu)
    if tp < 1:
        raise ValueError("tp must be at least 1")
    total = sum(bytes_per_step.values())
    per_gpu = total / tp
    steps_per_s = GPU_BANDWIDTH_GBS[gpu] * 1e9 / per_gpu
    r = {"gpu": gpu, "bandwidth_gbs": GPU_BANDWIDTH_GBS[gpu], "tp": tp, "bytes_per_step": total,
         "gb_per_step": total / 1e9, "gb_per_step_per_gpu": per_gpu / 1e9, "breakdown_bytes": bytes_per_step,
         "batch": batch, "max_tokens_per_s": steps_per_s * batch, "min_tpot_ms": 1000 / steps_per_s}
    if arch is not None and tp > 1:
        activation = arch["hidden_size"] * 2  # fp16 per token
        r["allreduces_per_step"] = 2 * arch["num_hidden_layers"]
        r["allreduce_bytes_per_token_per_gpu"] = int(r["allreduces_per_step"] * 2 * (tp - 1) / tp * activation
                                                     + (tp - 1) / tp * arch["vocab_size"] * 2)  # + logits gather
    return r


def inputs(checkpoint: Path | None = None, preset: str | None = None, tp: int | None = None) -> tuple[dict, int, dict]:
    """(bytes per step, tensor parallelism, architecture) from a checkpoint (its own mapping unless `tp` is
    given) or from a preset's shapes (tp 1 unless given)."""
    from build_engine import checkpoint as ckpt, presets  # noqa: PLC0415 (build extra)

    if checkpoint is not None:
        cfg = ckpt.read_config(Path(checkpoint))
        arch = {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
        return bytes_from_checkpoint(Path(checkpoint)), tp or cfg["mapping"]["tp_size"], arch
    return preset_bytes(preset), tp or 1, presets.load(preset).architecture


def preset_bytes(preset_name: str) -> dict[str, int]:
    from build_engine import presets  # noqa: PLC0415 (build extra; roofline of a preset needs its shapes)

    p = presets.load(preset_name)
    return bytes_from_shapes(p.architecture, p.group_size)


def format_roofline(r: dict, measured: dict | None = None) -> str:
    per = f" ({r['gb_per_step_per_gpu']:.2f} GB per GPU of {r['tp']})" if r.get("tp", 1) > 1 else ""
    lines = [f"{r['gpu'].upper()} ({r['bandwidth_gbs']} GB/s): {r['gb_per_step']:.2f} GB per decode step{per} "
             f"-> at most {r['max_tokens_per_s']:.0f} tok/s at batch {r['batch']} "
             f"(TPOT >= {r['min_tpot_ms']:.2f} ms)"]
    for k, v in r["breakdown_bytes"].items():
        lines.append(f"  {k:<18} {v / 1e9:8.3f} GB")
    if "allreduces_per_step" in r:
        lines.append(f"  all-reduce: {r['allreduces_per_step']} per step, "
                     f"{r['allreduce_bytes_per_token_per_gpu'] / 1e3:.0f} kB sent per token per GPU")
    if measured:
        tpot = measured.get("median_tpot_ms")
        if tpot:
            lines.append(f"  measured median TPOT {tpot:.2f} ms = {100 * r['min_tpot_ms'] / tpot:.0f}% of the roofline")
    return "\n".join(lines)


def load_result(path: Path) -> dict:
    return json.loads(Path(path).read_text())["metrics"]
