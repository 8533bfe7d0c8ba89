"""Raw tritonclient helpers for the serving tests (the project's client is tested separately)."""

from __future__ import annotations

import json
import queue
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient


def inputs(prompt: str, max_tokens: int = 32, stream: bool = False, **extra):
    def t(name, arr, dtype):
        x = grpcclient.InferInput(name, list(arr.shape), dtype)
        x.set_data_from_numpy(arr)
        return x

    out = [t("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
           t("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
           t("stream", np.array([[stream]]), "BOOL")]
    for name, (value, dtype) in extra.items():
        out.append(t(name, np.array([[value]], dtype={"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64,
                                                      "BOOL": np.bool_, "BYTES": object}[dtype]), dtype))
    return out


def llm_inputs(ids: list[int], max_tokens: int, **extra):
    """Inputs of a direct tensorrt_llm request, as TensorRT-LLM's backend takes them ([1, ...] each)."""
    tensors = {"input_ids": (np.array([ids], dtype=np.int32), "INT32"),
               "input_lengths": (np.array([[len(ids)]], dtype=np.int32), "INT32"),
               "request_output_len": (np.array([[max_tokens]], dtype=np.int32), "INT32")}
    for name, (value, dtype) in extra.items():
        tensors[name] = (np.array([[value]], dtype={"INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32,
                                                   "UINT64": np.uint64}[dtype]), dtype)
    out = []
    for name, (arr, dtype) in tensors.items():
        x = grpcclient.InferInput(name, list(arr.shape), dtype)
        x.set_data_from_numpy(arr)
        out.append(x)
    return out


def stream_results(url: str, model: str, ins, timeout: float = 120, outputs=None) -> tuple[list, str | None]:
    """(responses, error) of one gRPC streaming request, up to its final flag."""
    c = grpcclient.InferenceServerClient(url)
    q: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    c.async_stream_infer(model, ins, outputs=outputs, enable_empty_final_response=True)
    results, err = [], None
    try:
        while True:
            r, e = q.get(timeout=timeout)
            if e is not None:
                err = e.message()
                break
            results.append(r)
            if r.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        c.stop_stream()
        c.close()
    return results, err


def stream_call(url: str, model: str, ins, timeout: float = 120) -> tuple[list[str], str | None]:
    """(text pieces, error) of one gRPC streaming request."""
    results, err = stream_results(url, model, ins, timeout)
    pieces = [x.decode() for r in results if (a := r.as_numpy("text_output")) is not None for x in a.reshape(-1)]
    return pieces, err


def http_post(url: str, path: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ready(url: str) -> bool:
    with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as r:
        return r.status == 200


def engine_metrics(server) -> dict[tuple[str, str], float]:
    """The tensorrt_llm model's engine metrics (TensorRT-LLM's nv_trt_llm_* families), {(family, category): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("nv_trt_llm_"):
            for s in fam.samples:
                category = next(v for k, v in s.labels.items() if k not in ("model", "version"))
                out[(fam.name, category)] = s.value
    return out


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_engine_idle(server, timeout_s: float) -> None:
    """Until the engine holds no request (its active-request gauge, refreshed every 0.1 s, reads 0)."""
    time.sleep(0.15)
    wait_for(lambda: engine_metrics(server)[("nv_trt_llm_request_metrics", "active")] == 0, timeout_s,
             "the engine to hold no request")
