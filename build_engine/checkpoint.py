"""The TensorRT-LLM W4A16_AWQ checkpoint: the contract between quantization and both engines.

Layout (ModelOpt 0.47 export): config.json + rank{0..N-1}.safetensors for tensor parallelism N
(config.json `mapping`: world_size = tp_size = N, pp_size = 1). Each quantized linear has
  weight                   int8 [out/2, in]  signed int4 codes, two consecutive output rows per byte
                                             (even row in the low nibble)
  weights_scaling_factor   fp32 [out, in/group]
  prequant_scaling_factor  fp16 [in]
and computes y = (x * prequant) @ (codes * scale)^T.

How ModelOpt shards for N > 1 (modelopt/torch/export/postprocess.py `_split_model_config_for_tp`,
model_config_utils.py `merge_qkv`, 0.47; the int4 packing happens per rank, after the split):
  column-parallel (attention.qkv, mlp.fc, mlp.gate): weight and scales split on `out`, prequant copied;
    the fused qkv of rank r is [q_r; k_r; v_r] (q, k and v are split separately, then concatenated)
  row-parallel (attention.dense, mlp.proj): weight and scales split on `in` (whole groups), prequant split
  vocab_embedding and lm_head: split on the vocabulary; norms copied to every rank.
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
TP_SIZES = (1, 2, 4, 8)  # GPUs on one host (NVLink domain)
ROW_PARALLEL = ("attention.dense", "mlp.proj")  # split on in_features; the other LINEARS on out_features


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

    def linear_shapes(self, tp: int = 1) -> dict[str, tuple[int, int]]:
        """(out, in) of each quantized linear, per rank of `tp`."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        return {
            "attention.qkv": (qkv // tp, self.hidden),
            "attention.dense": (self.hidden, self.heads * self.head_dim // tp),
            "mlp.fc": (self.intermediate // tp, self.hidden),
            "mlp.gate": (self.intermediate // tp, self.hidden),
            "mlp.proj": (self.hidden, self.intermediate // tp),
        }

    def tp_problems(self, tp: int) -> list[str]:
        """Why these shapes cannot be split into `tp` ranks. ModelOpt's own check
        (postprocess.py `check_weight_shape_valid`) wants in_features / tp to hold whole quantization
        groups for every linear, column-parallel ones included; a row-parallel layer needs it to split
        its groups between ranks."""
        if tp not in TP_SIZES:
            return [f"tensor parallelism {tp} is not one of {TP_SIZES}"]
        problems = []
        if self.heads % tp:
            problems.append(f"{self.heads} attention heads do not split over {tp} ranks")
        if self.kv_heads % tp:  # ModelOpt would duplicate KV heads; the CPU engine cannot reassemble that
            problems.append(f"{self.kv_heads} KV heads do not split over {tp} ranks (tensor parallelism above the "
                            "KV head count is not supported)")
        g = self.group_size
        for name, (_, inp) in self.linear_shapes().items():
            if inp % tp or (g and (inp // tp) % g):
                problems.append(f"{name}: in_features {inp} / tp {tp} = {inp / tp:g} is not a multiple of the "
                                f"group size {g}" + (" (quantize with --group-size 64, or use a smaller tp)"
                                                     if g == 128 and (inp // tp) % 64 == 0 else ""))
        return problems


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
    tp = m.get("tp_size")
    if m.get("pp_size") != 1 or not isinstance(tp, int) or m.get("world_size") != tp:
        problems.append(f"mapping {m} is not world_size = tp_size with pp_size 1")
        tp = 1
    if cfg.get("vocab_size", 0) % 64:
        problems.append(f"vocab_size {cfg.get('vocab_size')} is not padded to a multiple of 64")
    if real_vocab is not None and cfg.get("vocab_size", 0) < real_vocab:
        problems.append(f"vocab_size {cfg.get('vocab_size')} is smaller than the tokenizer's {real_vocab}")
    if problems:
        raise UserError(f"invalid checkpoint {ckpt}: " + "; ".join(problems))

    s = Shapes.from_config(cfg)
    problems += s.tp_problems(tp)
    if problems:
        raise UserError(f"invalid checkpoint {ckpt}: " + "; ".join(problems))
    expected = rank_tensors(s, tp)
    ranks = sorted(p.name for p in ckpt.glob("rank*.safetensors"))
    if ranks != sorted(f"rank{r}.safetensors" for r in range(tp)):
        raise UserError(f"invalid checkpoint {ckpt}: mapping tp_size {tp} needs rank0..rank{tp - 1}.safetensors, "
                        f"found {ranks or 'none'}")
    for r in range(tp):
        with safe_open(ckpt / f"rank{r}.safetensors", "np") as f:
            where = f"rank{r}: " if tp > 1 else ""
            found = set(f.keys())
            for name in sorted(expected.keys() - found):
                problems.append(f"{where}missing tensor {name}")
            for name in sorted(found - expected.keys()):
                problems.append(f"{where}unexpected tensor {name}")
            for name in sorted(expected.keys() & found):
                sl = f.get_slice(name)
                dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                if (dtype, shape) != expected[name]:
                    problems.append(f"{where}{name}: {dtype}{list(shape)}, expected "
                                    f"{expected[name][0]}{list(expected[name][1])}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise UserError(f"invalid checkpoint {ckpt}: " + "; ".join(shown))
    return s


def rank_tensors(s: Shapes, tp: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in each rank's file."""
    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        "transformer.vocab_embedding.weight": ("F16", (s.vocab_padded // tp, s.hidden)),
        "transformer.ln_f.weight": ("F16", (s.hidden,)),
        "lm_head.weight": ("F16", (s.vocab_padded // tp, s.hidden)),
    }
    g = s.group_size
    for i in range(s.layers):
        p = f"transformer.layers.{i}."
        for n in NORMS:
            expected[p + n + ".weight"] = ("F16", (s.hidden,))
        for name, (out, inp) in s.linear_shapes(tp).items():
            expected[p + name + ".weight"] = ("I8", (out // 2, inp))
            expected[p + name + ".weights_scaling_factor"] = ("F32", (out, inp // g))
            expected[p + name + ".prequant_scaling_factor"] = ("F16", (inp,))
    return expected


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
    """Read access to a validated checkpoint's tensors, whole: the shards of a tensor-parallel
    checkpoint are put back together (the inverse of ModelOpt's split, module docstring)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.config = read_config(self.path)
        self.shapes = Shapes.from_config(self.config)
        self.tp = (self.config.get("mapping") or {}).get("tp_size", 1)
        self._files = [safe_open(self.path / f"rank{r}.safetensors", "np") for r in range(self.tp)]

    def _get(self, name: str, rank: int = 0) -> np.ndarray:
        t = self._files[rank].get_tensor(name)
        return t.astype(np.float32) if t.dtype == np.float16 else t

    def tensor(self, name: str) -> np.ndarray:
        """A whole tensor: the vocabulary tables from every rank, the norms from rank 0."""
        if self.tp > 1 and name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
            return np.concatenate([self._get(name, r) for r in range(self.tp)])
        return self._get(name)

    def linear(self, layer: int, name: str) -> QuantLinear:
        p = f"transformer.layers.{layer}.{name}."
        shards = [QuantLinear(codes=unpack_int4_rows(self._get(p + "weight", r)),
                              scale=self._get(p + "weights_scaling_factor", r).astype(np.float32),
                              prequant=self._get(p + "prequant_scaling_factor", r).astype(np.float32))
                  for r in range(self.tp)]
        if self.tp == 1:
            return shards[0]
        if name in ROW_PARALLEL:
            return QuantLinear(codes=np.concatenate([q.codes for q in shards], axis=1),
                               scale=np.concatenate([q.scale for q in shards], axis=1),
                               prequant=np.concatenate([q.prequant for q in shards]))
        if name == "attention.qkv":  # rank r holds [q_r; k_r; v_r]
            s, tp = self.shapes, self.tp
            sizes = [s.heads * s.head_dim // tp, s.kv_heads * s.head_dim // tp, s.kv_heads * s.head_dim // tp]
            cuts = np.cumsum(sizes)[:-1]

            def whole(parts):
                split = [np.split(x, cuts) for x in parts]
                return np.concatenate([np.concatenate([x[k] for x in split]) for k in range(3)])

            return QuantLinear(codes=whole([q.codes for q in shards]), scale=whole([q.scale for q in shards]),
                               prequant=shards[0].prequant)
        return QuantLinear(codes=np.concatenate([q.codes for q in shards]),
                           scale=np.concatenate([q.scale for q in shards]), prequant=shards[0].prequant)

    def norm(self, layer: int, name: str) -> np.ndarray:
        return self.tensor(f"transformer.layers.{layer}.{name}.weight")
