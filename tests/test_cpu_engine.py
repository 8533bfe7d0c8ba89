"""The CPU engine executes the checkpoint faithfully, and its runner serves requests correctly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from build_engine import checkpoint, manifest, onnx_engine
from build_engine.reference import Reference
from build_engine.runtime import Detokenizer, Sampling
from build_engine.verify import engine_logits


def test_matmulnbits_repack_puts_even_k_in_the_low_nibble():
    codes = np.array([[-8, 7, 0, -1]], dtype=np.int8)
    packed = onnx_engine.repack_for_matmulnbits(codes, group=4)
    assert packed.shape == (1, 1, 2)
    assert packed[0, 0, 0] == (0 | (15 << 4)) and packed[0, 0, 1] == (8 | (7 << 4))


def test_reference_matches_transformers_with_the_dequantized_weights(tiny_ckpt, tiny_model):
    """The reference is itself checked against HF's Mistral (sliding window included), with the
    checkpoint's effective weights loaded into it."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager").eval()
    ck = checkpoint.Checkpoint(tiny_ckpt)
    s = ck.shapes
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    with torch.no_grad():
        for i, block in enumerate(hf.model.layers):
            w = {n: torch.from_numpy(ck.linear(i, n).effective_weight()) for n in checkpoint.LINEARS}
            block.self_attn.q_proj.weight.copy_(w["attention.qkv"][:q])
            block.self_attn.k_proj.weight.copy_(w["attention.qkv"][q : q + kv])
            block.self_attn.v_proj.weight.copy_(w["attention.qkv"][q + kv :])
            block.self_attn.o_proj.weight.copy_(w["attention.dense"])
            block.mlp.gate_proj.weight.copy_(w["mlp.fc"])
            block.mlp.up_proj.weight.copy_(w["mlp.gate"])
            block.mlp.down_proj.weight.copy_(w["mlp.proj"])
            block.input_layernorm.weight.copy_(torch.from_numpy(ck.norm(i, "input_layernorm")))
            block.post_attention_layernorm.weight.copy_(torch.from_numpy(ck.norm(i, "post_layernorm")))
        hf.model.embed_tokens.weight.copy_(torch.from_numpy(ck.tensor("transformer.vocab_embedding.weight")[:32002]))
        hf.model.norm.weight.copy_(torch.from_numpy(ck.tensor("transformer.ln_f.weight")))
        hf.lm_head.weight.copy_(torch.from_numpy(ck.tensor("lm_head.weight")[:32002]))
        ids = np.random.default_rng(1).integers(3, 32000, 150).tolist()  # longer than the 64-token window
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = Reference(tiny_ckpt, 32002, 64).logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("n_tokens", [9, 150])  # 150 > the 64-token sliding window
def test_engine_logits_match_the_reference(tiny_engine, tiny_ckpt, n_tokens):
    ids = np.random.default_rng(n_tokens).integers(3, 32000, n_tokens).tolist()
    want = Reference(tiny_ckpt, 32002, 64).logits(ids)
    got = engine_logits(tiny_engine, ids)
    assert got.shape == (n_tokens, 32002)  # sliced to the real vocabulary
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_window_is_really_applied(tiny_engine, tiny_ckpt):
    """A reference without the window disagrees with the engine past 64 tokens: the window matters."""
    ids = np.random.default_rng(7).integers(3, 32000, 150).tolist()
    no_window = Reference(tiny_ckpt, 32002, None).logits(ids)
    got = engine_logits(tiny_engine, ids)
    assert np.abs(got[-1] - no_window[-1]).max() / np.abs(no_window).max() > 1e-3


def test_engine_manifest_names_its_checkpoint_and_settings(tiny_engine, tiny_ckpt):
    m = manifest.read(tiny_engine, "cpu-engine")
    assert m["checkpoint"]["files"] == manifest.read(tiny_ckpt)["files"]
    assert m["settings"]["accuracy_level"] == 1 and m["settings"]["sliding_window"] == 64
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= set(m["files"])
    assert manifest.verify_files(tiny_engine) == []


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def test_smollm2_answers_paris_and_stops_at_im_end(smol_runtime):
    ids = chat(smol_runtime.tokenizer, "What is the capital of France?")
    toks, text, reason = smol_runtime.generate(ids, Sampling(max_tokens=48))
    assert "Paris" in text and reason == "stop"
    assert "<|im_end|>" not in text and len(toks) < 48


def test_default_int8_activation_engine_answers_paris(smol_engine):
    from build_engine.runtime import CpuEngine

    engine = CpuEngine(smol_engine)
    try:
        assert manifest.read(smol_engine)["settings"]["accuracy_level"] == 4
        _, text, reason = engine.generate(chat(engine.tokenizer, "What is the capital of France?"), Sampling(max_tokens=48))
        assert "Paris" in text and reason == "stop"
    finally:
        engine.close()


def test_concurrent_requests_match_their_solo_runs(smol_runtime):
    tok = smol_runtime.tokenizer
    prompts = [chat(tok, q) for q in ("Name a color.", "What is 2+2?", "Say hello.", "Name a fruit.")]
    solo = [smol_runtime.generate(p, Sampling(max_tokens=16))[0] for p in prompts]
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, smol_runtime.generate(
        prompts[i], Sampling(max_tokens=16))[0])) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [results[i] for i in range(4)] == solo


def test_closing_a_stream_cancels_and_frees_the_slot(smol_runtime):
    import time

    stream = smol_runtime.submit(chat(smol_runtime.tokenizer, "Tell me a long story."), Sampling(max_tokens=500))
    n = 0
    for _ in stream:
        n += 1
        if n == 3:
            break  # the generator's finally closes the stream
    deadline = time.time() + 5
    while smol_runtime.active_requests() and time.time() < deadline:
        time.sleep(0.01)
    assert smol_runtime.active_requests() == 0
    assert "Paris" in smol_runtime.generate(chat(smol_runtime.tokenizer, "What is the capital of France?"),
                                            Sampling(max_tokens=32))[1]


def test_stop_sequence_ends_generation_before_the_sequence(smol_runtime):
    _, text, reason = smol_runtime.generate(chat(smol_runtime.tokenizer, "What is the capital of France?"),
                                            Sampling(max_tokens=48, stop=("Paris",)))
    assert reason == "stop" and "Paris" not in text and text.strip()


def test_max_tokens_reports_length(smol_runtime):
    toks, _, reason = smol_runtime.generate(chat(smol_runtime.tokenizer, "Tell me a long story."),
                                            Sampling(max_tokens=5))
    assert len(toks) == 5 and reason == "length"


def test_sampling_explores_and_seeds_are_refused_clearly(smol_runtime):
    ids = chat(smol_runtime.tokenizer, "Write a poem about the moon.")
    s = Sampling(max_tokens=24, temperature=1.5, top_k=50, top_p=0.95)
    greedy = smol_runtime.generate(ids, Sampling(max_tokens=24))[0]
    samples = {tuple(smol_runtime.generate(ids, s)[0]) for _ in range(3)}
    assert len(samples) > 1 and tuple(greedy) not in samples
    with pytest.raises(ValueError, match="seeds are not supported"):
        smol_runtime.submit(ids, Sampling(seed=1))


def test_prompt_limits_are_enforced(smol_runtime):
    with pytest.raises(ValueError, match="empty"):
        smol_runtime.submit([], Sampling())
    with pytest.raises(ValueError, match="at most"):
        smol_runtime.submit([1] * (smol_runtime.limits["max_input_len"] + 1), Sampling())
    with pytest.raises(ValueError, match="max_tokens"):
        Sampling(max_tokens=0)


@pytest.mark.parametrize("text", ["Hello world, how are you?", "naïve café — 東京 🚀 done", "  two  spaces\n\nnewline"])
def test_detokenizer_deltas_concatenate_to_the_full_text(hermes_tokenizer, smol_runtime, text):
    for tok in (hermes_tokenizer, smol_runtime.tokenizer):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        d = Detokenizer(tok)
        deltas = [d.push(i) for i in ids]
        deltas.append(d.flush())
        assert "".join(deltas) == tok.decode(ids)
        assert all("\ufffd" not in x for x in deltas)
