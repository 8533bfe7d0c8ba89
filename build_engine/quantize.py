"""HF checkpoint -> INT4-AWQ TensorRT-LLM checkpoint (W4A16_AWQ) with NVIDIA ModelOpt.

Calibration runs on the GPU when there is one and on the CPU otherwise. The export is written to a
temporary folder, validated, given the tokenizer and a manifest, and only then renamed into place.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from build_engine import UserError, calibration, checkpoint, manifest, presets, sources
from build_engine.tokenization import load_tokenizer
from build_engine.cli import quiet_progress

ALGORITHMS = ("awq_lite", "awq_full")
CHECKPOINT_KIND = "trtllm-checkpoint"


@dataclass(frozen=True)
class QuantizeSettings:
    group_size: int
    algorithm: str
    calib_dataset: str | None
    calib_text: str | None
    calib_size: int
    calib_seq_len: int
    seed: int
    tp_size: int = 1  # tensor parallelism: ModelOpt's export writes one rank file per GPU

    def __post_init__(self):
        if self.group_size not in checkpoint.SUPPORTED_GROUP_SIZES:
            raise UserError(f"group size {self.group_size} is not supported by TensorRT-LLM AWQ "
                            f"(use one of {checkpoint.SUPPORTED_GROUP_SIZES})")
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown AWQ algorithm {self.algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if self.tp_size not in checkpoint.TP_SIZES:
            raise UserError(f"tensor parallelism {self.tp_size} is not one of {checkpoint.TP_SIZES}")


def check_tp(model_dir: Path, settings: QuantizeSettings) -> None:
    """Refuse, before loading and calibrating the model, a TP size its shapes cannot be split into
    (from its config.json, by the same rule the checkpoint validator applies)."""
    import json

    path = Path(model_dir) / "config.json"
    if settings.tp_size == 1 or not path.is_file():
        return
    c = json.loads(path.read_text())
    heads = c["num_attention_heads"]
    shapes = checkpoint.Shapes(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                               kv_heads=c.get("num_key_value_heads") or heads,
                               head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                               intermediate=c["intermediate_size"], vocab_padded=c["vocab_size"],
                               group_size=settings.group_size)
    problems = shapes.tp_problems(settings.tp_size)
    if problems:
        raise UserError(f"cannot split {model_dir.name} into {settings.tp_size} tensor-parallel ranks: "
                        + "; ".join(problems))


def default_settings(model: str, preset_name: str | None = None,
                     **overrides) -> tuple[QuantizeSettings, presets.Preset | None]:
    """Settings from the named preset (or the model's own, if it has one), then the caller's overrides."""
    preset = presets.load(preset_name) if preset_name else presets.for_model(model)
    cal = preset.calibration if preset else presets.Calibration()
    base = dict(group_size=preset.group_size if preset else 128, algorithm=cal.algorithm,
                calib_dataset=cal.dataset, calib_text=None, calib_size=cal.size,
                calib_seq_len=cal.seq_len, seed=0)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["calib_text"]:
        base["calib_dataset"] = None
    return QuantizeSettings(**base), preset


def check_group_size(model, group_size: int) -> None:
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name and mod.in_features % group_size:
            raise UserError(f"group size {group_size} must divide in_features {mod.in_features} of {name}; "
                            f"choose a group size that divides every linear layer's input size")


def awq_config(group_size: int, algorithm: str) -> dict:
    """ModelOpt's INT4_AWQ_CFG with our group size and algorithm. Its `quant_cfg` is a dict of
    pattern -> settings in modelopt 0.37 (TensorRT-LLM 1.2.1's container) and a list of
    {"quantizer_name", "cfg"} entries in 0.47 (our CPU pins); both are handled."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    quant_cfg = cfg["quant_cfg"]
    settings = quant_cfg.values() if isinstance(quant_cfg, dict) else (e.get("cfg") for e in quant_cfg)
    blocked = [c["block_sizes"] for c in settings if isinstance(c, dict) and isinstance(c.get("block_sizes"), dict)]
    if not blocked:
        raise UserError("this nvidia-modelopt's INT4_AWQ_CFG has no block-quantized weight quantizer; "
                        "use nvidia-modelopt 0.37 (TensorRT-LLM 1.2.1) or 0.47")
    for sizes in blocked:
        sizes[-1] = group_size
    cfg["algorithm"] = {"method": algorithm}
    return cfg


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model from {path}: {e}") from None
    return model, tok


def calibration_text(settings: QuantizeSettings) -> list[str]:
    return calibration.load_text(settings.calib_dataset, settings.calib_text, settings.calib_size)


def calibration_batches(tokenizer, settings: QuantizeSettings, docs: list[str] | None = None) -> list[list[int]]:
    docs = calibration_text(settings) if docs is None else docs
    return calibration.token_batches(tokenizer, docs, settings.calib_size, settings.calib_seq_len, settings.seed)


def quantize_model(model, tokenizer, settings: QuantizeSettings, batches: list[list[int]] | None = None):
    """Calibrate AWQ in place (fake-quantized modules). Returns the model."""
    import modelopt.torch.quantization as mtq
    import torch
    from tqdm.auto import tqdm

    check_group_size(model, settings.group_size)
    if batches is None:
        batches = calibration_batches(tokenizer, settings)
    device = next(model.parameters()).device
    passes = [0]

    def forward_loop(m):
        passes[0] += 1
        for ids in tqdm(batches, desc=f"AWQ calibration pass {passes[0]}", unit="sample",
                        disable=quiet_progress(), leave=False):
            m(torch.tensor([ids], device=device))

    torch.manual_seed(settings.seed)
    with torch.no_grad():
        mtq.quantize(model, awq_config(settings.group_size, settings.algorithm), forward_loop)
    return model


def export(model, export_dir: Path, tp_size: int = 1) -> None:
    """TensorRT-LLM checkpoint export. Mutates the model: deep-copy first to keep it."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    cfg = model.config
    # transformers 5 keeps rope_theta in rope_parameters; the exporter reads config.rope_theta and
    # silently drops rotary_base without it.
    rope = getattr(cfg, "rope_parameters", None) or {}
    if getattr(cfg, "rope_theta", None) is None and "rope_theta" in rope:
        cfg.rope_theta = rope["rope_theta"]
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.float16,
                                   export_dir=str(export_dir), inference_tensor_parallel=tp_size)


# Runs of spaces are left out: transformers 5 splits them unlike SentencePiece (which 4.57 matches),
# and differently again when the folder also holds the model's config.json.
PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo — 東京? 🌊 Bye.\n"}]


def check_tokenizer_copy(folder: Path, source_tokenizer) -> None:
    """The artifact's tokenizer must load on its own and give the source's ids."""
    def ids(t):
        if t.chat_template:
            return t.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return t(PROBE_CHAT[1]["content"])["input_ids"]

    copied = load_tokenizer(folder)
    if ids(copied) != ids(source_tokenizer) or len(copied) != len(source_tokenizer):
        raise UserError(f"the tokenizer files copied to {folder} do not reproduce the source's ids "
                        "(does its tokenizer_config.json name a tokenizer_class?)")


def model_facts(hf_config, tokenizer) -> dict:
    """What downstream steps need to know about the model that the TRT-LLM config does not carry."""
    end_id = tokenizer.convert_tokens_to_ids(sources.IM_END)
    if end_id is None or end_id == tokenizer.unk_token_id:
        end_id = tokenizer.eos_token_id
    return {
        "architecture": (hf_config.architectures or [None])[0],
        "vocab_size": len(tokenizer),
        "end_id": end_id,
        "bos_id": tokenizer.bos_token_id,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id,
        "sliding_window": getattr(hf_config, "sliding_window", None),
        "max_position_embeddings": hf_config.max_position_embeddings,
        "chat_template": bool(tokenizer.chat_template),
    }


def run(model: str, output: Path, progress_log=print, preset: str | None = None, **overrides) -> Path:
    settings, preset = default_settings(model, preset, **overrides)
    t0 = time.perf_counter()
    # The calibration text first: an offline hub fails in seconds, not after downloading a 7B model.
    docs = calibration_text(settings)
    src = sources.resolve(model)
    check_tp(src.path, settings)
    batches = calibration_batches(load_tokenizer(src.path), settings, docs)
    hf_model, tok = load_model(src.path)
    facts = model_facts(hf_model.config, tok)
    # The name the model is served under (OpenAI's `model`): the hub id or built-in name it came from.
    facts["name"] = preset.source if preset and src.kind == "local" else (
        src.name if src.kind != "local" else Path(src.name).name)
    quantize_model(hf_model, tok, settings, batches)
    calib_s = time.perf_counter() - t0

    output = Path(output)
    with manifest.staging(output) as tmp:
        export(hf_model, tmp, settings.tp_size)
        checkpoint.validate(tmp, real_vocab=facts["vocab_size"])
        sources.copy_tokenizer(src.path, tmp / "tokenizer")
        check_tokenizer_copy(tmp / "tokenizer", tok)
        manifest.write(
            tmp, CHECKPOINT_KIND,
            source={"model": src.name, "kind": src.kind, "path": str(src.path), "revision": src.revision,
                    "files": manifest.file_hashes(src.path) if src.kind != "hub" else None},
            preset=preset.name if preset else None,
            quantization={"algorithm": settings.algorithm, "quant_algo": "W4A16_AWQ",
                          "group_size": settings.group_size, "tool": "nvidia-modelopt",
                          "tp_size": settings.tp_size},
            calibration={k: v for k, v in asdict(settings).items() if k.startswith("calib") or k == "seed"},
            model=facts,
            timing={"calibration_s": round(calib_s, 1), "total_s": round(time.perf_counter() - t0, 1)},
        )
    progress_log(f"wrote {output} (W4A16_AWQ, group {settings.group_size}, tp {settings.tp_size}) in {time.perf_counter() - t0:.0f} s")
    return output
