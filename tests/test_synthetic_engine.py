"""The synthetic engine: TensorRT-LLM's contract at a GPU's pace with no compute (build_engine.synthetic),
under the CPU engine's scheduler and served by the same tensorrt_llm model."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from build_engine import UserError, gpu_specs, presets
from build_engine.cpu import CpuEngine, QueueFull, Sampling
from client import Message, format_chatml
from tests.triton_util import engine_metrics, inputs, stream_call, wait_engine_idle, wait_for

MISTRAL_7B = "nous-hermes-2-mistral-7b-dpo"


@pytest.fixture(scope="session")
def synthetic_max(tiny_ckpt):
    from build_engine import synthetic

    return synthetic.build(tiny_ckpt, tiny_ckpt.parent / "engine-synthetic-max", schedule="max", size_as=MISTRAL_7B)


@pytest.fixture(scope="session")
def synthetic_server(synthetic_max):
    from model_repo.generate import generate
    from model_repo.server import TritonServer

    server = TritonServer(generate(synthetic_max, synthetic_max.parent / "repo-synthetic")).start()
    yield server
    server.stop()


def test_the_roofline_step_model_is_the_bytes_read_over_the_bandwidth():
    from build_engine.synthetic import step_model

    p = presets.load(MISTRAL_7B)
    weights = gpu_specs.bytes_from_shapes(p.architecture, p.group_size)
    m = step_model("roofline", "h100", p.architecture, weights, efficiency=0.5)
    # Independently: Mistral-7B INT4 g128 reads ~3.86 GB a step (DESIGN §11); its KV cache holds
    # 2 (K, V) x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB a position; H100: 3,350 GB/s.
    assert m.weight_bytes == pytest.approx(3.86e9, rel=0.01)
    assert m.kv_bytes_per_token == 128 * 1024
    assert m.decode_s(0) == pytest.approx(m.weight_bytes / (3350e9 * 0.5))
    assert m.decode_s(1000) - m.decode_s(0) == pytest.approx(1000 * 128 * 1024 / (3350e9 * 0.5))
    # A long prefill is compute-bound: 2 flops per weight and token at 989 TFLOP/s x 0.5.
    params = 2 * weights["quantized_weights"] + weights["lm_head"] // 2
    assert m.prefill_s(2048, 0) == pytest.approx(2 * params * 2048 / (989e12 * 0.5), rel=1e-6)
    assert m.prefill_s(1, 0) == pytest.approx(m.decode_s(1))  # one token: memory-bound
    assert step_model("rate", None, {}, {}, tokens_per_s=50).decode_s(10**6) == pytest.approx(0.02)
    assert step_model("max", None, {}, {}).decode_s(10**6) == 0


@pytest.mark.parametrize("kw, message", [
    ({"schedule": "rate"}, "--tokens-per-s"), ({"schedule": "roofline", "gpu": "gtx480"}, "unknown GPU"),
    ({"schedule": "roofline", "gpu": None}, "needs --gpu"), ({"schedule": "fast"}, "not one of"),
    ({"schedule": "roofline", "gpu": "h100", "efficiency": 1.5}, "efficiency")])
def test_a_bad_schedule_is_refused_with_the_fix(kw, message):
    from build_engine.synthetic import step_model

    with pytest.raises(UserError, match=message):
        step_model(arch=presets.load(MISTRAL_7B).architecture, weight_bytes={"a": 1}, **{"gpu": "h100", **kw})


def test_the_engine_folder_records_its_model_and_sizes_as_the_7b(synthetic_max):
    from build_engine import manifest

    m = manifest.read(synthetic_max, "synthetic-engine")
    assert m["settings"]["sized_as"] == MISTRAL_7B
    assert m["limits"]["max_batch_size"] == presets.load(MISTRAL_7B).engine.max_batch_size
    assert m["engine_vocab_size"] == 32064 and m["model"]["end_id"] == 32000
    assert manifest.verify_files(synthetic_max) == []


def _paragraphs(engine_dir) -> list[list[int]]:
    corpus = np.load(engine_dir / "corpus.npy").tolist()
    out, start = [], 0
    for i, t in enumerate(corpus):
        if t == 32000:
            out.append(corpus[start:i])
            start = i + 1
    return out


def test_replies_are_real_text_that_ends_on_the_end_id(synthetic_max):
    engine = CpuEngine(synthetic_max)
    paragraphs = _paragraphs(synthetic_max)
    try:
        prompt = engine.tokenizer(format_chatml([Message("user", "Hi")]))["input_ids"]
        ids, text, reason = engine.generate(prompt, Sampling(max_tokens=2000))
        # Each request replays the next paragraph, tokenized by the deployment's tokenizer, then the end id.
        assert reason == "stop" and ids == paragraphs[0]
        assert text == engine.tokenizer.decode(paragraphs[0]) and len(text.split()) >= 30
        # min_tokens past the paragraph's end: the next paragraph follows, no token repeated or lost.
        n = len(paragraphs[1]) + 20
        ids2, _, reason2 = engine.generate(prompt, Sampling(max_tokens=n, min_tokens=n))
        assert reason2 == "length" and ids2 == paragraphs[1] + paragraphs[2][:20]
    finally:
        engine.close()


def test_the_contract_of_the_scheduler_holds_stop_words_queue_bound_and_cancellation(synthetic_max):
    engine = CpuEngine(synthetic_max, max_batch_size=1, max_queue_size=1)
    para = _paragraphs(synthetic_max)  # request k of this engine replays paragraph k
    try:
        prompt = [1, 2, 3]
        assert engine.generate(prompt, Sampling(max_tokens=12))[0] == para[0][:12]
        # A stop word (token sequence) ends the reply on it, as TensorRT-LLM's does.
        got, _, reason = engine.generate(prompt, Sampling(max_tokens=12, stop_words=(tuple(para[1][3:5]),)))
        assert reason == "stop" and got == para[1][:5]
        # A bad word is never drawn: its runner-up (the text's next token) comes instead.
        got, _, _ = engine.generate(prompt, Sampling(max_tokens=3, bad_words=((para[2][1],),)))
        assert got[0] == para[2][0] and para[2][1] not in got
        running = engine.submit(prompt, Sampling(max_tokens=10**4 - 10, min_tokens=10**4 - 10))
        steps = iter(running)  # held: a dropped iterator closes (cancels) its stream
        next(steps)
        waiting = engine.submit(prompt, Sampling(max_tokens=4))
        with pytest.raises(QueueFull, match="Maximum queue size of 1"):
            engine.submit(prompt, Sampling(max_tokens=4))
        running.close()  # frees the row for the waiting request
        assert [s.token_id for s in waiting if s.token_id is not None] == para[4][:4]
        assert engine.generate(prompt, Sampling(max_tokens=4))[0] == para[5][:4]
    finally:
        engine.close()


def test_the_rate_schedule_paces_each_stream(tiny_ckpt, tmp_path):
    from build_engine import synthetic

    engine_dir = synthetic.build(tiny_ckpt, tmp_path / "engine", schedule="rate", tokens_per_s=100)
    engine = CpuEngine(engine_dir)
    try:
        t0 = time.perf_counter()
        ids, _, _ = engine.generate([1, 2, 3], Sampling(max_tokens=20, min_tokens=20))
        # 19 decode steps after the first token at 10 ms each: a lower bound holds on a busy machine.
        assert len(ids) == 20 and time.perf_counter() - t0 >= 0.19
    finally:
        engine.close()


def test_served_it_honours_the_backend_contract(synthetic_server):
    from model_repo import backend_contract
    from model_repo.config import parse

    cfg = parse((synthetic_server.repo / "tensorrt_llm" / "config.pbtxt").read_text())
    assert backend_contract.check(cfg) == []
    prompt = format_chatml([Message("user", "Hello")])
    for model in ("tensorrt_llm_bls", "ensemble"):
        pieces, err = stream_call(synthetic_server.grpc_url, model, inputs(prompt, 64, stream=True))
        assert err is None and len("".join(pieces)) > 100


def test_a_cancelled_stream_leaves_the_paced_engine_at_once(paced_synthetic_server):
    """At 50 tokens/s a 400-token reply takes 8 s: the engine is idle within a few seconds of the close."""
    server = paced_synthetic_server
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got = []
    c.start_stream(callback=lambda result, error: got.append((result, error)))
    c.async_stream_infer("tensorrt_llm_bls", inputs(format_chatml([Message("user", "Hello")]), 400, stream=True,
                                                     min_tokens=(400, "INT32")))
    wait_for(lambda: len(got) >= 3, 30, "three chunks")
    wait_for(lambda: engine_metrics(server)[("nv_trt_llm_request_metrics", "active")] == 1, 5, "the request running")
    c.stop_stream(cancel_requests=True)
    wait_engine_idle(server, 3)


def test_a_caller_that_keeps_up_gets_every_token_in_its_own_response(tiny_ckpt, tmp_path):
    """The BLS sends what piled up since its last send: at a GPU-like 50 tokens/s per stream nothing piles
    up, so no token waits for the next (each response carries exactly one more token)."""
    from build_engine import synthetic
    from client import Client
    from model_repo.generate import generate
    from model_repo.server import TritonServer

    engine_dir = synthetic.build(tiny_ckpt, tmp_path / "engine", schedule="rate", tokens_per_s=50)
    with TritonServer(generate(engine_dir, tmp_path / "repo")) as server:
        counts = [c.completion_tokens for c in Client(server.grpc_url).stream(
            [Message("user", "Hi")], max_tokens=40, min_tokens=40) if c.text]
    assert counts == list(range(1, 41))


def test_the_ceiling_command_measures_every_server_process_on_each_path(synthetic_max, tmp_path):
    """benchmarks ceiling end to end on a synthetic repository: Triton and the OpenAI frontend (its own
    process) are served, every stream completes, each process on a path has a CPU cost per token."""
    import json

    from benchmarks.__main__ import main
    from model_repo.generate import generate

    repo = generate(synthetic_max, tmp_path / "repo")
    assert main(["ceiling", "--repo", str(repo), "--out", str(tmp_path / "out"), "--concurrency", "2",
                 "--paths", "bls,openai", "--output-len", "128", "--input-len", "32"]) == 0
    runs = json.loads((tmp_path / "out" / "ceiling.json").read_text())["runs"]
    assert [(r["path"], r["concurrency"], r["metrics"]["failed"]) for r in runs] == [("bls", 2, 0), ("openai", 2, 0)]
    for r in runs:
        # CPU time comes in 10 ms ticks: over 512 tokens a process can show 0, the stream's relay cannot.
        cpu = {name.split("#")[0]: v for name, v in r["server_cpu"].items()}
        assert all(v["us_per_token"] >= 0 for v in cpu.values())
        assert cpu["tritonserver"]["us_per_token"] + cpu["tensorrt_llm_bls"]["us_per_token"] > 0
    assert "frontend" in {n.split("#")[0] for n in runs[1]["server_cpu"]}
    assert "frontend" not in {n.split("#")[0] for n in runs[0]["server_cpu"]}
    assert (tmp_path / "out" / "ceiling.png").stat().st_size > 1000
