"""The rebuilt Nous-Hermes-2 tokenizer reproduces the model's ids (DESIGN.md §3)."""

import pytest

from build_engine import sources


def chat_ids(tok, msgs, gen=True):
    return tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]


def test_tokenizer_model_is_mistral_v1_byte_for_byte():
    assert sources.sha256_file(sources.mistral_tokenizer_model()) == sources.MISTRAL_V1_SHA256


@pytest.mark.container_versions
def test_vocabulary_has_32002_tokens_with_chatml_specials(hermes_tokenizer):
    tok = hermes_tokenizer
    assert len(tok) == 32002
    assert tok.convert_tokens_to_ids("<|im_end|>") == 32000
    assert tok.convert_tokens_to_ids("<|im_start|>") == 32001
    assert tok.eos_token_id == 32000 and tok.bos_token_id == 1


@pytest.mark.container_versions
def test_chatml_ids_carry_legacy_sentencepiece_quirks(hermes_tokenizer):
    ids = chat_ids(hermes_tokenizer, [{"role": "system", "content": "You are helpful."},
                                      {"role": "user", "content": "Hi"}])
    assert ids[:4] == [1, 32001, 1587, 13]  # BOS, <|im_start|>, "▁system", "\n"
    assert hermes_tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"] == [32000, 28705, 13]
    assert ids[-3:] == [32001, 13892, 13]  # generation prompt "<|im_start|>assistant\n"
    assert ids.count(1) == 1  # exactly one BOS


@pytest.mark.container_versions
def test_chat_template_text_is_chatml(hermes_tokenizer):
    text = hermes_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                tokenize=False)
    assert text == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_hermes_ships_the_same_tokenizer(tiny_model, hermes_tokenizer):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "user", "content": "Ünïcödé ☃ and 中文 text"}]
    assert chat_ids(tok, msgs) == chat_ids(hermes_tokenizer, msgs)
    cfg = AutoConfig.from_pretrained(tiny_model)
    assert cfg.model_type == "mistral" and cfg.sliding_window and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.vocab_size == 32002


@pytest.mark.container_versions
def test_smollm2_stops_at_im_end(smol_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_model)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


# -- artifacts carry a tokenizer that transformers 4.57 (TensorRT-LLM 1.2.1) and 5 read alike --------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Héllo — 東京? 🌊"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks!\nBye."}],
]
IDS_SCRIPT = """import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
chats = json.loads(sys.argv[2])
print(json.dumps({"chat": [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                           for c in chats], "eos": tok.eos_token_id, "len": len(tok)}))
"""


def _ids(python: str, tok_dir) -> dict:
    import json
    import subprocess

    out = subprocess.run([python, "-c", IDS_SCRIPT, str(tok_dir), json.dumps(CHATS)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.container_versions
@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "smol_ckpt"])
def test_checkpoint_tokenizer_gives_the_same_ids_under_the_other_transformers(request, ckpt):
    """make test runs this in both venvs, each against the other (HERMES_OTHER_PYTHON)."""
    import os
    import sys

    import transformers

    other = os.environ.get("HERMES_OTHER_PYTHON")
    if not other:  # make test always sets it
        pytest.skip("HERMES_OTHER_PYTHON (the other venv's python) is not set; run make test")
    tok_dir = request.getfixturevalue(ckpt) / "tokenizer"
    here, there = _ids(sys.executable, tok_dir), _ids(other, tok_dir)
    assert here == there, f"transformers {transformers.__version__} vs {other}"
    assert here["eos"] == (32000 if ckpt == "tiny_ckpt" else 2)


@pytest.mark.container_versions
def test_checkpoint_carries_the_source_models_own_tokenizer_files(tiny_ckpt, tiny_model):
    files = sorted(p.name for p in (tiny_ckpt / "tokenizer").iterdir())
    assert "tokenizer.model" in files and "tokenizer_config.json" in files
    for name in files:
        assert sources.sha256_file(tiny_ckpt / "tokenizer" / name) == sources.sha256_file(tiny_model / name), name
