"""The OpenAI frontend's refusals and disconnects over raw HTTP (not only the SDK), in front of a real Triton
serving a synthetic engine (long replies at a steady pace, no compute)."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.test_openai_api import _metric
from tests.triton_util import engine_metrics, wait_for

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def paced_server(paced_synthetic_server):
    return paced_synthetic_server


@pytest.fixture(scope="module")
def frontend(paced_server):
    from model_repo.__main__ import served_model_name, start_frontend
    from model_repo.openai_api import FrontendConfig
    from model_repo.server import free_port

    port, name = free_port(), served_model_name(paced_server.repo)
    server = start_frontend(FrontendConfig(paced_server.grpc_url, name, max_body_bytes=4000), "127.0.0.1", port)
    yield "127.0.0.1", port, name
    server.should_exit = True


def raw(frontend, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port, _ = frontend
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def chat(frontend, **fields) -> bytes:
    return json.dumps({"model": frontend[2], "messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


@pytest.mark.parametrize("case, method, path, body, status, error_type", [
    ("unknown path", "GET", "/v1/nothing-here", None, 404, "invalid_request_error"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, "invalid_request_error"),
    ("body not UTF-8", "POST", "/v1/chat/completions", b'{"model": "\xff\xfe"}', 400, "invalid_request_error"),
    ("body not JSON", "POST", "/v1/chat/completions", b"{nope", 400, "invalid_request_error"),
    ("missing messages", "POST", "/v1/chat/completions", b'{"model": "x"}', 400, "invalid_request_error"),
    ("unknown parameter", "POST", "/v1/completions", b'{"model": "x", "prompt": "a", "best_of": 3}', 400,
     "invalid_request_error"),
    ("body too large", "POST", "/v1/chat/completions", b"x" * 5000, 413, "invalid_request_error"),
])
def test_every_refusal_has_openais_error_shape(frontend, case, method, path, body, status, error_type):
    got, data = raw(frontend, method, path, body)
    assert got == status, (case, data)
    error = json.loads(data)["error"]
    assert set(error) == OPENAI_ERROR_KEYS and error["type"] == error_type and error["message"], case


def test_wrong_model_and_out_of_range_values_are_openai_errors(frontend):
    status, data = raw(frontend, "POST", "/v1/chat/completions", chat(frontend, model="gpt-4"))
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found"
    status, data = raw(frontend, "POST", "/v1/chat/completions", chat(frontend, temperature=9))
    assert status == 400 and json.loads(data)["error"]["param"] == "temperature"


def test_a_missing_api_key_is_401_in_openais_shape(paced_server):
    from model_repo.__main__ import start_frontend
    from model_repo.openai_api import FrontendConfig
    from model_repo.server import free_port

    port = free_port()
    server = start_frontend(FrontendConfig(paced_server.grpc_url, "m", api_key="s3cret"), "127.0.0.1", port)
    try:
        status, data = raw(("127.0.0.1", port, "m"), "POST", "/v1/chat/completions", b"{}")
        assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    finally:
        server.should_exit = True


def test_the_framework_error_types_follow_the_status():
    from model_repo.openai_api import error_type

    assert [error_type(s) for s in (400, 401, 404, 405, 413, 415, 422, 429, 500, 503)] == [
        "invalid_request_error", "authentication_error", "invalid_request_error", "invalid_request_error",
        "invalid_request_error", "invalid_request_error", "invalid_request_error", "overloaded_error",
        "server_error", "service_unavailable"]


@pytest.mark.parametrize("path, extra", [("/v1/chat/completions", {}), ("/v1/completions", {"prompt": "Hi"})])
def test_a_non_streaming_client_that_disconnects_cancels_its_request(frontend, paced_server, path, extra):
    """Within a second of the disconnect the engine holds no request and the frontend counts none in flight;
    the server log shows the cancellation. (The whole reply would take 8 s.)"""
    host, port, name = frontend
    fields = {"model": name, "max_tokens": 400, "min_tokens": 400, **extra}
    if "prompt" not in extra:
        fields["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    body = json.dumps(fields).encode()
    mark = paced_server.log_mark()
    sock = socket.create_connection((host, port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: engine_metrics(paced_server)[("nv_trt_llm_request_metrics", "active")] == 1, 10, "generating")
    time.sleep(0.3)
    sock.close()
    left = time.monotonic()
    wait_for(lambda: engine_metrics(paced_server)[("nv_trt_llm_request_metrics", "active")] == 0, 5, "engine idle")
    wait_for(lambda: _metric(f"http://{host}:{port}/metrics", "hermes_openai_requests_in_flight") == 0, 5,
             "nothing in flight")
    assert time.monotonic() - left < 1.0
    wait_for(lambda: any("cancelled after" in line for line in paced_server.logs_since(mark)), 5, "the log line")
