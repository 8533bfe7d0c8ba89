"""The OpenAI-compatible frontend, driven by the official `openai` client, in front of the real Triton
server hosting the SmolLM2 CPU deployment."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import openai
import pytest

from client import Client, Message
from tests.triton_util import wait_engine_idle

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _start(smol_server, **kw):
    from model_repo.__main__ import served_model_name, start_frontend
    from model_repo.openai_api import FrontendConfig
    from model_repo.server import free_port

    cfg = FrontendConfig(triton_url=kw.pop("triton_url", smol_server.grpc_url),
                         model_name=served_model_name(smol_server.repo), **kw)
    port = free_port()
    return start_frontend(cfg, "127.0.0.1", port), f"http://127.0.0.1:{port}", cfg.model_name


@pytest.fixture(scope="module")
def frontend(smol_server):
    server, url, name = _start(smol_server)
    yield url, name
    server.should_exit = True


@pytest.fixture
def oa(frontend):
    url, _ = frontend
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _metric(url: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$" if labels else rf"^{re.escape(name)} ([0-9.e+-]+)$"
    m = re.search(pattern, body, re.M)
    return float(m.group(1)) if m else 0.0


def test_models_names_the_served_model_and_health_follows_triton(frontend, oa):
    url, name = frontend
    assert [m.id for m in oa.models.list().data] == [name] and name == "smollm2-135m-instruct"
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        assert r.status == 200


def test_chat_stream_concatenates_to_the_whole_reply_which_stops_at_im_end(frontend, oa, smol_server):
    _, name = frontend
    whole = oa.chat.completions.create(model=name, messages=QUESTION, max_tokens=64)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and "Paris" in choice.message.content
    assert choice.message.role == "assistant" and "<|im_end|>" not in choice.message.content
    with Client(smol_server.grpc_url) as c:  # the server's own token counts
        direct = c.complete([Message(**m) for m in QUESTION], max_tokens=64)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (direct.prompt_tokens, direct.completion_tokens)
    assert whole.usage.completion_tokens < 64 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(oa.chat.completions.create(model=name, messages=QUESTION, max_tokens=64, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_async_client_streams_the_same_text(frontend):
    url, name = frontend

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as aoa:
            whole = await aoa.chat.completions.create(model=name, messages=QUESTION, max_tokens=48)
            stream = await aoa.chat.completions.create(model=name, messages=QUESTION, max_tokens=48, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(main())
    assert whole == streamed and "Paris" in whole


def test_stop_strings_are_honoured(frontend, oa):
    _, name = frontend
    r = oa.chat.completions.create(model=name, messages=QUESTION, max_tokens=64, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.startswith("The capital of France is")


def test_completions_take_the_raw_prompt(frontend, oa, smol_server):
    _, name = frontend
    r = oa.completions.create(model=name, prompt="The capital of France is", max_tokens=8)
    with Client(smol_server.grpc_url) as c:
        want = "".join(ch.text for ch in c.stream_text("The capital of France is", max_tokens=8))
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in oa.completions.create(model=name, prompt="The capital of France is",
                                                                          max_tokens=8, stream=True) if c.choices)
    assert streamed == want


BAD = [
    (dict(n=2), openai.BadRequestError, "n must be 1", None),
    (dict(temperature=-1), openai.BadRequestError, "temperature", "temperature"),
    (dict(max_tokens=10**6), openai.BadRequestError, "max_tokens must be at most", None),
    (dict(seed=-1), openai.BadRequestError, "seed", "seed"),
    (dict(extra_body={"logit_bias_typo": 1}), openai.BadRequestError, "unsupported parameter: logit_bias_typo",
     "logit_bias_typo"),
    (dict(messages=[]), openai.BadRequestError, "messages", "messages"),
    (dict(model="gpt-4o"), openai.NotFoundError, "does not exist", "model"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kwargs,error,message,param", BAD, ids=[str(b[0])[:30] for b in BAD])
def test_bad_parameters_get_openai_errors_and_the_frontend_keeps_serving(frontend, oa, stream, kwargs, error,
                                                                          message, param):
    _, name = frontend
    kwargs = {"model": name, "messages": QUESTION, "max_tokens": 16, **kwargs}
    with pytest.raises(error) as e:
        r = oa.chat.completions.create(stream=stream, **kwargs)
        list(r) if stream else None
    body = e.value.body
    assert message in body["message"] and set(body) >= {"message", "type", "param", "code"}
    assert body["param"] == param
    assert oa.chat.completions.create(model=name, messages=QUESTION, max_tokens=8).choices[0].message.content


def test_api_key_is_required_when_set(smol_server):
    server, url, name = _start(smol_server, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model=name, messages=QUESTION, max_tokens=8).choices
    finally:
        server.should_exit = True


def test_unreachable_triton_is_503(smol_server):
    from model_repo.server import free_port

    server, url, name = _start(smol_server, triton_url=f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/health", timeout=10)
        assert e.value.code == 503
        with pytest.raises(openai.APIStatusError) as e:
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model=name, messages=QUESTION, max_tokens=8)
        assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable"
    finally:
        server.should_exit = True


def test_client_disconnect_mid_stream_cancels_the_triton_request(frontend, smol_server):
    import http.client
    import json

    url, name = frontend
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": name, "stream": True, "max_tokens": 1500, "min_tokens": 1500,
        "messages": [{"role": "user", "content": "Tell me a very long story about dragons."}]}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(4):
        resp.fp.readline()
    resp.close()  # vanish mid-stream
    conn.close()
    wait_engine_idle(smol_server, 5)  # the request was cancelled: its 1500 tokens would take far longer
    deadline = time.time() + 30
    # The frontend no longer counts it in flight.
    while time.time() < deadline and _metric(f"{url}/metrics", "hermes_openai_requests_in_flight") != 0:
        time.sleep(0.1)
    assert _metric(f"{url}/metrics", "hermes_openai_requests_in_flight") == 0


def test_metrics_move_by_the_traffic_on_the_frontend_and_triton(frontend, oa, smol_server):
    url, name = frontend
    triton_metrics = f"http://127.0.0.1:{smol_server.ports.metrics}/metrics"
    label = '{endpoint="/v1/chat/completions",status="200"}'
    bls = '{model="tensorrt_llm_bls",version="1"}'
    before = (_metric(f"{url}/metrics", "hermes_openai_requests_total", label),
              _metric(f"{url}/metrics", "hermes_openai_completion_tokens_total"),
              _metric(f"{url}/metrics", "hermes_openai_time_to_first_token_seconds_count"),
              _metric(triton_metrics, "nv_inference_request_success", bls))
    usage = [oa.chat.completions.create(model=name, messages=QUESTION, max_tokens=16).usage.completion_tokens
             for _ in range(3)]
    after = (_metric(f"{url}/metrics", "hermes_openai_requests_total", label),
             _metric(f"{url}/metrics", "hermes_openai_completion_tokens_total"),
             _metric(f"{url}/metrics", "hermes_openai_time_to_first_token_seconds_count"),
             _metric(triton_metrics, "nv_inference_request_success", bls))
    assert [a - b for a, b in zip(after, before)] == [3, sum(usage), 3, 3]


def test_benchmark_measures_the_openai_frontend_like_the_triton_deployment(frontend, smol_server, tmp_path):
    """`benchmarks serve --backend openai` against the frontend and `--backend triton` against Triton,
    same workload: every request succeeds with the fixed output length, counted from `usage`."""
    from benchmarks.__main__ import main as bench

    url, name = frontend
    common = ["--num-prompts", "3", "--output-len", "8", "--concurrency", "2", "--warmup", "0"]
    assert bench(["serve", "--backend", "openai", "--url", f"{url}/v1", "--model", name, *common,
                  "--api-key", "sk-never-in-results", "--out", str(tmp_path / "oa")]) == 0
    assert bench(["serve", "--url", smol_server.grpc_url, *common, "--out", str(tmp_path / "grpc")]) == 0
    import json

    runs = {}
    for kind in ("oa", "grpc"):
        (result,) = [json.loads(p.read_text()) for p in (tmp_path / kind).glob("*.json")]
        runs[kind] = result
        assert [r["success"] for r in result["requests"]] == [True] * 3
        assert [r["output_tokens"] for r in result["requests"]] == [8] * 3
    # The key is sent (this frontend runs without one and ignores it) and never written to the results.
    assert not [p for p in (tmp_path / "oa").iterdir() if p.suffix in (".json", ".csv")
                and "sk-never-in-results" in p.read_text()]
    assert runs["oa"]["target"]["protocol"] == "openai" and runs["oa"]["metrics"]["median_ttft_ms"] is not None


def test_a_body_over_the_limit_is_413_before_it_is_read(smol_server):
    """The frontend refuses an oversized body by its Content-Length, and a chunked one without it,
    and keeps serving."""
    import http.client
    import json

    server, url, name = _start(smol_server, max_body_bytes=2000)
    try:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            oa.chat.completions.create(model=name, messages=[{"role": "user", "content": "x" * 5000}], max_tokens=4)
        assert e.value.status_code == 413 and "larger than 2000 bytes" in e.value.body["message"]
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "y" * 5000}]}).encode()
        conn.request("POST", "/v1/chat/completions", body=iter([body[:1000], body[1000:]]),
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, encode_chunked=True)
        assert conn.getresponse().status == 413
        assert oa.chat.completions.create(model=name, messages=QUESTION, max_tokens=4).choices[0].message.content
    finally:
        server.should_exit = True


def test_a_full_queue_is_429_overloaded():
    """The engine's full-queue error (TensorRT-LLM's message) becomes OpenAI's retryable 429."""
    from client import OverloadedError
    from model_repo.openai_api import api_error

    e = api_error(OverloadedError("Maximum queue size of 32 has been reached, please try again later"))
    assert e.status == 429 and e.body()["error"]["code"] == "overloaded"
