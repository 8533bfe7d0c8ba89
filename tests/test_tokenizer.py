"""The rebuilt Nous-Hermes-2 tokenizer reproduces the model's ids (DESIGN.md §3)."""

from build_engine import sources


def chat_ids(tok, msgs, gen=True):
    return tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]


def test_tokenizer_model_is_mistral_v1_byte_for_byte():
    assert sources.sha256_file(sources.mistral_tokenizer_model()) == sources.MISTRAL_V1_SHA256


def test_vocabulary_has_32002_tokens_with_chatml_specials(hermes_tokenizer):
    tok = hermes_tokenizer
    assert len(tok) == 32002
    assert tok.convert_tokens_to_ids("<|im_end|>") == 32000
    assert tok.convert_tokens_to_ids("<|im_start|>") == 32001
    assert tok.eos_token_id == 32000 and tok.bos_token_id == 1


def test_chatml_ids_carry_legacy_sentencepiece_quirks(hermes_tokenizer):
    ids = chat_ids(hermes_tokenizer, [{"role": "system", "content": "You are helpful."},
                                      {"role": "user", "content": "Hi"}])
    assert ids[:4] == [1, 32001, 1587, 13]  # BOS, <|im_start|>, "▁system", "\n"
    assert hermes_tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"] == [32000, 28705, 13]
    assert ids[-3:] == [32001, 13892, 13]  # generation prompt "<|im_start|>assistant\n"
    assert ids.count(1) == 1  # exactly one BOS


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


def test_smollm2_stops_at_im_end(smol_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_model)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
