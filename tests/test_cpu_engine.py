"""The CPU engine executes the checkpoint faithfully, and its runner serves requests correctly."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from build_engine import checkpoint, manifest
from build_engine.cpu import Sampling, graph
from build_engine.reference import Reference
from build_engine.tokenization import Detokenizer
from build_engine.verify import engine_logits


def test_matmulnbits_repack_puts_even_k_in_the_low_nibble():
    codes = np.array([[-8, 7, 0, -1]], dtype=np.int8)
    packed = graph.repack_for_matmulnbits(codes, group=4)
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
    got = engine_logits(tiny_engine, ids)  # one token per step: the decode path at every position
    assert got.shape == (n_tokens, 32002)  # sliced to the real vocabulary
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    # Chunked prefill (the scheduler's prompt path) gives the last position's logits as well.
    chunked = engine_logits(tiny_engine, ids, chunk=64)
    assert np.abs(chunked[-1] - want[-1]).max() / np.abs(want).max() < 1e-4


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
    from build_engine.cpu import CpuEngine

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


def test_backlog_counts_the_steps_a_slow_reader_has_not_taken(smol_runtime):
    """The served model sends what piled up as one response when its reader falls behind: it asks the
    stream's backlog, which must count exactly the steps made and not yet read."""
    with smol_runtime.submit(chat(smol_runtime.tokenizer, "Tell me a long story."), Sampling(max_tokens=6)) as s:
        deadline = time.monotonic() + 30
        while s.finished_step is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.backlog == 6 + 1  # six tokens and the final step
        steps = iter(s)
        next(steps)
        assert s.backlog == 6
        assert [st.finish_reason for st in steps] == [None] * 5 + ["length"] and s.backlog == 0


def test_sampling_explores_and_seeds_reproduce_whatever_the_batch(smol_runtime):
    tok = smol_runtime.tokenizer
    ids = chat(tok, "Write a poem about the moon.")
    s = Sampling(max_tokens=24, temperature=1.5, top_k=50, top_p=0.95)
    greedy = smol_runtime.generate(ids, Sampling(max_tokens=24))[0]
    samples = {tuple(smol_runtime.generate(ids, s)[0]) for _ in range(3)}
    assert len(samples) > 1 and tuple(greedy) not in samples
    seeded = Sampling(max_tokens=24, temperature=1.2, top_p=0.9, seed=1234)
    alone = smol_runtime.generate(ids, seeded)[0]
    # The same seed with other requests in the batch, sampled ones drawing from their own generators.
    others = [smol_runtime.submit(chat(tok, q), Sampling(max_tokens=30, temperature=1.0))
              for q in ("Tell me a story.", "Name a fruit.")]
    in_batch = smol_runtime.generate(ids, seeded)[0]
    for o in others:
        list(o)
    assert in_batch == alone
    assert smol_runtime.generate(ids, Sampling(max_tokens=24, temperature=1.2, top_p=0.9, seed=4321))[0] != alone


def test_a_request_joins_the_running_batch_and_changes_nothing_for_it(smol_runtime):
    tok = smol_runtime.tokenizer
    long_ids, short_ids = chat(tok, "Tell me a long story about a dragon."), chat(tok, "What is 2+2?")
    long_s = Sampling(max_tokens=120, ignore_eos=True)
    solo_long = smol_runtime.generate(long_ids, long_s)[0]
    solo_short = smol_runtime.generate(short_ids, Sampling(max_tokens=8))[0]
    long_tokens = []
    stream = smol_runtime.submit(long_ids, long_s)
    for step in stream:
        if step.token_id is not None:
            long_tokens.append(step.token_id)
        if len(long_tokens) == 10:
            joined = {}
            t = threading.Thread(target=lambda: joined.update(
                out=smol_runtime.generate(short_ids, Sampling(max_tokens=8))[0], at=len(long_tokens)))
            t.start()
    t.join()
    assert joined["at"] < len(long_tokens) == 120  # the short one finished while the long one ran
    assert joined["out"] == solo_short and long_tokens == solo_long  # greedy: bit-identical to solo


def test_a_burst_is_prefilled_one_chunk_per_step(smol_runtime):
    """Prefill is compute-bound on a CPU: prompts that share a step delay each other's first token.
    Three 40-token prompts that arrive together, while a long prompt is prefilling, get their first
    tokens in three consecutive steps after it, each prefilled alone."""
    tok, engine = smol_runtime.tokenizer, smol_runtime
    long_ids = chat(tok, " ".join(f"item {i}," for i in range(100)))
    assert len(long_ids) > 3 * engine.prefill_chunk
    shorts = [chat(tok, f"Write a short poem about the sea, the wind, the sky and the colour number {i}.")[:40]
              for i in range(3)]
    assert {len(ids) for ids in shorts} == {40} and 2 * 40 > engine.max_num_tokens - 4  # one per step
    with engine.submit(long_ids, Sampling(max_tokens=4, ignore_eos=True)) as long_stream:
        deadline = time.monotonic() + 30
        while long_stream.admitted_step is None and time.monotonic() < deadline:
            time.sleep(0.001)
        burst = [engine.submit(ids, Sampling(max_tokens=2, ignore_eos=True)) for ids in shorts]
        for s in [long_stream, *burst]:
            assert all(not st.error for st in s)
    firsts = [s.first_token_step for s in burst]
    assert long_stream.first_token_step - long_stream.admitted_step + 1 == -(-len(long_ids) // engine.prefill_chunk)
    # First come, first prefilled: the burst waits for the long prompt's chunks, then one prompt a step.
    assert firsts == list(range(firsts[0], firsts[0] + 3))
    assert firsts[0] in (long_stream.first_token_step, long_stream.first_token_step + 1)


def test_a_cancelled_request_frees_its_row_for_a_waiting_one_at_the_next_step(smol_engine_fp32):
    from build_engine.cpu import CpuEngine

    engine = CpuEngine(smol_engine_fp32, max_batch_size=2)
    try:
        ids = chat(engine.tokenizer, "Tell me a long story.")
        s = Sampling(max_tokens=400, ignore_eos=True)
        first, second, third = engine.submit(ids, s), engine.submit(ids, s), engine.submit(ids, Sampling(max_tokens=4))
        next(iter(second))
        it = iter(first)
        next(it)
        assert engine.running_requests() == 2 and third.admitted_step is None  # queued, not failed
        first.close()
        assert len([st for st in third if st.token_id is not None]) == 4
        assert third.admitted_step == first.finished_step
        second.close()
    finally:
        engine.close()


def test_a_full_kv_budget_queues_requests_instead_of_failing(smol_engine_fp32):
    from build_engine.cpu import CpuEngine

    engine = CpuEngine(smol_engine_fp32, kv_cache_tokens=200)
    try:
        ids = chat(engine.tokenizer, "Name a fruit.")
        s = Sampling(max_tokens=200 - len(ids), ignore_eos=True)
        with pytest.raises(ValueError, match="KV cache budget of 200 tokens"):
            engine.submit(ids + [1], s)
        a, b = engine.submit(ids, s), engine.submit(ids, Sampling(max_tokens=5))
        out_a, out_b = [st for st in a], [st for st in b]
        assert a.finish_reason == "length" and b.finish_reason in ("length", "stop")
        assert b.admitted_step >= a.finished_step  # b waited for a's reservation to be returned
        assert not any(st.error for st in out_a + out_b)
    finally:
        engine.close()


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


def test_a_released_kv_row_gives_its_memory_back(tiny_engine):
    from build_engine.cpu.decoder import Decoder

    dec = Decoder(tiny_engine, rows=2, capacity=1024)
    ids = np.random.default_rng(0).integers(3, 32000, (2, 20))
    dec.forward(0, ids, [20, 20])
    assert all(np.abs(kv[r, :, :20]).sum() > 0 for kv in dec.kv for r in (0, 1))
    dec.release(0)
    # The pages are dropped (MADV_DONTNEED on private memory), so they read back as zeros; row 1 is kept.
    assert not any(kv[0].any() for kv in dec.kv)
    assert all(np.abs(kv[1, :, :20]).sum() > 0 for kv in dec.kv)


def test_token_ids_outside_the_vocabulary_are_refused_before_they_reach_the_batch(smol_runtime):
    v = smol_runtime.vocab_size
    for bad in (dict(bad_words=((v,),)), dict(stop_words=((1, -3),))):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            smol_runtime.submit([1, 2, 3], Sampling(max_tokens=4, **bad))
    with pytest.raises(ValueError, match="token id"):
        smol_runtime.submit([1, v], Sampling(max_tokens=4))


def test_a_request_whose_sampling_fails_fails_alone(smol_runtime, monkeypatch):
    """An exception while sampling one request ends that request with an error; its batch goes on."""
    from build_engine.cpu import sampling

    tok = smol_runtime.tokenizer
    healthy = smol_runtime.submit(chat(tok, "Tell me a story."), Sampling(max_tokens=40, ignore_eos=True))
    real = sampling.Sampler.next_token

    def broken(self, logits):
        if self.s.seed == 666:
            raise FloatingPointError("injected")
        return real(self, logits)

    monkeypatch.setattr(sampling.Sampler, "next_token", broken)
    doomed = smol_runtime.submit(chat(tok, "Name a fruit."), Sampling(max_tokens=40, temperature=1.0, seed=666))
    steps = list(doomed)
    assert doomed.finish_reason == "error" and "injected" in steps[-1].error
    assert len([s for s in healthy if s.token_id is not None]) == 40 and healthy.finish_reason == "length"
