"""The TensorRT-LLM W4A16_AWQ checkpoint: the contract between quantization and both engines.

Layout (ModelOpt 0.47 export, TP=1): config.json + rank0.safetensors. Each quantized linear has
  weight                   int8 [out/2, in]  signed int4 codes, two consecutive output rows per byte
                                             (even row in the low nibble)
  weights_scaling_factor   fp32 [out, in/group]
  prequant_scaling_factor  fp16 [in]
and computes y = (x * prequant) @ (codes * scale)^T.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from build_engine import UserError

LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
NORMS = ("input_layernorm", "post_layernorm")
ARCHITECTURES = ("MistralForCausalLM", "LlamaForCausalLM")
SUPPORTED_GROUP_SIZES = (64, 128)  # what TensorRT-LLM's AWQ kernels accept


@dataclass(frozen=True)
class Shapes:
    """Model dimensions as the checkpoint states them."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_padded: int
    group_size: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Shapes":
        q = cfg.get("quantization") or {}
        return cls(
            hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_size") or cfg["hidden_size"] // cfg["num_attention_heads"],
            intermediate=cfg["intermediate_size"], vocab_padded=cfg["vocab_size"],
            group_size=q.get("group_size", 0),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each quantized linear."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return {
            "attention.qkv": (qkv, self.hidden),
            "attention.dense": (self.hidden, self.heads * self.head_dim),
            "mlp.fc": (self.intermediate, self.hidden),
            "mlp.gate": (self.intermediate, self.hidden),
            "mlp.proj": (self.hidden, self.intermediate),
        }


def read_config(ckpt: Path) -> dict:
    path = Path(ckpt) / "config.json"
    if not path.is_file():
        raise UserError(f"{ckpt} is not a TensorRT-LLM checkpoint (no config.json)")
    return json.loads(path.read_text())


def validate(ckpt: Path, real_vocab: int | None = None) -> Shapes:
    """Check names, shapes, dtypes and the quantization block against the W4A16_AWQ layout.
    Raises UserError listing every problem found."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    cfg = read_config(ckpt)
    problems: list[str] = []
    if cfg.get("architecture") not in ARCHITECTURES:
        problems.append(f"architecture {cfg.get('architecture')!r} is not one of {ARCHITECTURES}")
    q = cfg.get("quantization") or {}
    expect_q = {"quant_algo": "W4A16_AWQ", "has_zero_point": False, "pre_quant_scale": True}
    for k, v in expect_q.items():
        if q.get(k) != v:
            problems.append(f"quantization.{k} is {q.get(k)!r}, expected {v!r}")
    if q.get("group_size") not in SUPPORTED_GROUP_SIZES:
        problems.append(f"quantization.group_size {q.get('group_size')!r} is not one of {SUPPORTED_GROUP_SIZES}")
    if "lm_head" not in (q.get("exclude_modules") or []):
        problems.append("quantization.exclude_modules does not exclude lm_head")
    for k in ("rotary_base", "norm_epsilon", "head_size", "position_embedding_type"):
        if k not in cfg:
            problems.append(f"config.json has no {k}")
    if cfg.get("position_embedding_type") not in (None, "rope_gpt_neox"):
        problems.append(f"position_embedding_type {cfg['position_embedding_type']!r} is not rope_gpt_neox")
    m = cfg.get("mapping") or {}
    if (m.get("tp_size"), m.get("pp_size")) != (1, 1):
        problems.append(f"mapping {m} is not tp_size=1, pp_size=1")
    if cfg.get("vocab_size", 0) % 64:
        problems.append(f"vocab_size {cfg.get('vocab_size')} is not padded to a multiple of 64")
    if real_vocab is not None and cfg.get("vocab_size", 0) < real_vocab:
        problems.append(f"vocab_size {cfg.get('vocab_size')} is smaller than the tokenizer's {real_vocab}")
    if problems:
        raise UserError(f"invalid checkpoint {ckpt}: " + "; ".join(problems))

    s = Shapes.from_config(cfg)
    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        "transformer.vocab_embedding.weight": ("F16", (s.vocab_padded, s.hidden)),
        "transformer.ln_f.weight": ("F16", (s.hidden,)),
        "lm_head.weight": ("F16", (s.vocab_padded, s.hidden)),
    }
    g = s.group_size
    for i in range(s.layers):
        p = f"transformer.layers.{i}."
        for n in NORMS:
            expected[p + n + ".weight"] = ("F16", (s.hidden,))
        for name, (out, inp) in s.linear_shapes().items():
            if inp % g:
                problems.append(f"{p}{name}: group_size {g} does not divide in_features {inp}")
            expected[p + name + ".weight"] = ("I8", (out // 2, inp))
            expected[p + name + ".weights_scaling_factor"] = ("F32", (out, inp // g))
            expected[p + name + ".prequant_scaling_factor"] = ("F16", (inp,))
    path = ckpt / "rank0.safetensors"
    if not path.is_file():
        raise UserError(f"invalid checkpoint {ckpt}: no rank0.safetensors")
    with safe_open(path, "np") as f:
        found = set(f.keys())
        for name in sorted(expected.keys() - found):
            problems.append(f"missing tensor {name}")
        for name in sorted(found - expected.keys()):
            problems.append(f"unexpected tensor {name}")
        for name in sorted(expected.keys() & found):
            sl = f.get_slice(name)
            dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
            if (dtype, shape) != expected[name]:
                problems.append(f"{name}: {dtype}{list(shape)}, expected {expected[name][0]}{list(expected[name][1])}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise UserError(f"invalid checkpoint {ckpt}: " + "; ".join(shown))
    return s


def unpack_int4_rows(packed: np.ndarray) -> np.ndarray:
    """int8 [out/2, in] -> int8 codes [out, in] in [-8, 7]; byte row r holds rows 2r (low nibble)
    and 2r+1 (high nibble)."""
    p = packed.astype(np.int8)
    low = (p << 4) >> 4  # arithmetic shifts sign-extend the low nibble
    high = p >> 4
    out = np.empty((p.shape[0] * 2, p.shape[1]), dtype=np.int8)
    out[0::2], out[1::2] = low, high
    return out


def pack_int4_rows(codes: np.ndarray) -> np.ndarray:
    """Inverse of unpack_int4_rows."""
    c = codes.astype(np.int16)
    return ((c[0::2] & 0xF) | ((c[1::2] & 0xF) << 4)).astype(np.uint8).view(np.int8)


@dataclass
class QuantLinear:
    codes: np.ndarray  # int8 [out, in]
    scale: np.ndarray  # fp32 [out, in/group]
    prequant: np.ndarray  # fp32 [in]

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantized(self) -> np.ndarray:
        """fp32 [out, in]: codes * scale (per group), without the prequant factor."""
        return (self.codes.astype(np.float32).reshape(self.codes.shape[0], -1, self.group_size)
                * self.scale[:, :, None]).reshape(self.codes.shape)

    def effective_weight(self) -> np.ndarray:
        """W such that x @ W^T == (x * prequant) @ (codes * scale)^T."""
        return self.dequantized() * self.prequant[None, :]


class Checkpoint:
    """Read access to a validated checkpoint's tensors."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.config = read_config(self.path)
        self.shapes = Shapes.from_config(self.config)
        self._file = safe_open(self.path / "rank0.safetensors", "np")

    def tensor(self, name: str) -> np.ndarray:
        t = self._file.get_tensor(name)
        return t.astype(np.float32) if t.dtype == np.float16 else t

    def linear(self, layer: int, name: str) -> QuantLinear:
        p = f"transformer.layers.{layer}.{name}."
        return QuantLinear(
            codes=unpack_int4_rows(self.tensor(p + "weight")),
            scale=self.tensor(p + "weights_scaling_factor").astype(np.float32),
            prequant=self.tensor(p + "prequant_scaling_factor").astype(np.float32),
        )

    def norm(self, layer: int, name: str) -> np.ndarray:
        return self.tensor(f"transformer.layers.{layer}.{name}.weight")
