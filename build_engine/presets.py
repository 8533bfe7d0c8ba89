"""Deployment presets: one JSON file per model under presets/, loaded into a dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from build_engine import UserError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    kv_cache_free_gpu_mem_fraction: float = 0.9

    def __post_init__(self):
        if self.max_input_len >= self.max_seq_len:
            raise UserError(f"max_input_len {self.max_input_len} must be below max_seq_len {self.max_seq_len}")


DEFAULT_LIMITS = EngineLimits(max_batch_size=8, max_input_len=2048, max_seq_len=4096, max_num_tokens=4096)


@dataclass(frozen=True)
class Calibration:
    dataset: str = "pydoc"
    size: int = 8
    seq_len: int = 128
    algorithm: str = "awq_lite"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    source: str
    group_size: int
    calibration: Calibration
    engine: EngineLimits
    triton_image: str  # the Triton TensorRT-LLM container of the GPU workflow (see build_engine.container)
    architecture: dict = field(default_factory=dict)


def names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load(name: str) -> Preset:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(names())}")
    raw = json.loads(path.read_text())
    raw["calibration"] = Calibration(**raw["calibration"])
    raw["engine"] = EngineLimits(**raw["engine"])
    return Preset(**raw)


def for_checkpoint(ckpt_manifest: dict) -> Preset | None:
    """The preset a checkpoint (or an engine made from it) was quantized with, from its manifest."""
    name = ckpt_manifest.get("preset")
    return load(name) if name else None


def limits_for(ckpt_manifest: dict) -> EngineLimits:
    """Engine limits: the checkpoint's preset, else one default for every engine target."""
    preset = for_checkpoint(ckpt_manifest)
    return preset.engine if preset else DEFAULT_LIMITS


def for_model(model: str) -> Preset | None:
    """The preset whose name or source is `model` (a built-in name or hub id), else None."""
    for n in names():
        p = load(n)
        if model in (p.name, p.source):
            return p
    return None
