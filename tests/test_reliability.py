"""Faults and limits against the real Triton server: a shutdown drains streams in flight, a killed
client frees its engine row, an engine failure fails only the requests in flight, a full queue and
an oversized prompt get clear errors, and the engine's metrics (TensorRT-LLM's families) follow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from client import BadRequestError, Client, Message, OverloadedError, ServerError, UnavailableError
from tests.triton_util import engine_metrics, http_post, inputs, ready, stream_call, wait_engine_idle, wait_for

ROOT = Path(__file__).resolve().parent.parent

STORY = [Message("user", "Tell me a very long story about dragons.")]


def shm_entries() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("*")}


def processes_mentioning(text: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in a for a in (p.info["cmdline"] or [])):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


# -- a shutdown drains -------------------------------------------------------------------------

def test_sigterm_drains_streams_in_flight_and_leaves_nothing_behind(smol_engine_fp32, tmp_path):
    """SIGTERM to `serve` while three streams run: each finishes with all its tokens, a request sent
    during the drain is refused as retryable (another replica can take it), the process exits 0, and no
    process or /dev/shm region of the server is left."""
    from model_repo.generate import generate
    from model_repo.server import free_port

    repo = generate(smol_engine_fp32, tmp_path / "repo")
    http, grpc, metrics = free_port(), free_port(), free_port()
    shm_before = shm_entries()
    proc = subprocess.Popen([sys.executable, "-m", "model_repo", "serve", "--repo", str(repo), "--quiet",
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"127.0.0.1:{grpc}"
    try:
        wait_for(lambda: Client(url).ready(), 120, "the server")
        results: dict[int, object] = {}
        first_chunk = threading.Barrier(4)

        def run(i: int) -> None:
            try:
                chunks = []
                with Client(url) as c:
                    for chunk in c.stream(STORY, max_tokens=120, min_tokens=120):
                        chunks.append(chunk)
                        if len(chunks) == 1:
                            first_chunk.wait(timeout=60)
                results[i] = chunks[-1]
            except Exception as e:  # noqa: BLE001 -- recorded and asserted below
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        first_chunk.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(UnavailableError):
            Client(url, retries=0).complete([Message("user", "hi")], max_tokens=4)
        [t.join(timeout=120) for t in threads]
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert [getattr(results[i], "completion_tokens", results[i]) for i in range(3)] == [120] * 3
    assert all(results[i].finish_reason == "length" for i in range(3))
    assert processes_mentioning(str(repo)) == []
    assert shm_entries() - shm_before == set()


# -- a vanished client frees its row ------------------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    from client import Client, Message
    with Client(sys.argv[1]) as c:
        s = c.stream([Message("user", "Tell me a very long story about dragons.")], max_tokens=1500,
                     min_tokens=1500, request_id="killed-client")
        for chunk in s:
            print(chunk.completion_tokens, flush=True)
""")


def test_a_killed_client_frees_its_engine_row_within_a_few_tokens(smol_server):
    """A client process killed mid-stream (no close, no goodbye): the engine notices and frees the row;
    the request generated only a few tokens past what the client had received."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, smol_server.grpc_url], stdout=subprocess.PIPE,
                            text=True)
    received = 0
    try:
        for line in proc.stdout:
            received = int(line)
            if received >= 10:
                break
        mark = smol_server.log_mark()
        proc.kill()
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert received >= 10
    wait_engine_idle(smol_server, 10)
    line = wait_for(lambda: next((x for x in smol_server.logs_since(mark) if "request killed-client#" in x), None),
                    10, "the cancellation in the server log")
    generated = int(line.rsplit("cancelled after", 1)[1].split()[0])
    assert received <= generated <= received + 20, line


# -- engine metrics ----------------------------------------------------------------------------

def test_engine_metrics_are_tensorrt_llms_and_follow_the_load(smol_server):
    """nv_trt_llm_* families with the backend's label values: max = the batch size, active/scheduled
    move with a stream in flight and return to 0, the iteration counter advances."""
    before = engine_metrics(smol_server)
    assert before[("nv_trt_llm_request_metrics", "max")] == 8
    assert {k[1] for k in before if k[0] == "nv_trt_llm_kv_cache_block_metrics"} == {
        "max", "free", "used", "tokens_per", "fraction"}
    with Client(smol_server.grpc_url) as c:
        with c.stream(STORY, max_tokens=200, min_tokens=200) as s:
            for i, _ in enumerate(s):
                if i == 5:
                    # Sampled every 0.1 s and set one after another: wait until all three show it.
                    busy = wait_for(lambda: (m := engine_metrics(smol_server))[
                        ("nv_trt_llm_request_metrics", "scheduled")] >= 1
                        and m[("nv_trt_llm_request_metrics", "active")] >= 1
                        and m[("nv_trt_llm_kv_cache_block_metrics", "used")] >= 1 and m, 5,
                        "a scheduled request holding KV blocks")
                    break
    assert busy[("nv_trt_llm_kv_cache_block_metrics", "free")] < busy[("nv_trt_llm_kv_cache_block_metrics", "max")]
    # The gauges are set one after another: wait until both read 0.
    after = wait_for(lambda: (m := engine_metrics(smol_server))[("nv_trt_llm_request_metrics", "active")] == 0
                     and m[("nv_trt_llm_kv_cache_block_metrics", "used")] == 0 and m, 10,
                     "no active request and no KV block in use")
    assert after[("nv_trt_llm_general_metrics", "iteration_counter")] > before[
        ("nv_trt_llm_general_metrics", "iteration_counter")]


# -- a full queue, an engine failure: one small deployment ----------------------------------------

FAULTY_MODEL = textwrap.dedent("""
    # The CPU tensorrt_llm model with a fault switch: while FLAG exists, every engine step raises.
    import os

    from model_repo.triton_models import tensorrt_llm_cpu as base

    FLAG = {flag!r}


    class TritonPythonModel(base.TritonPythonModel):
        def initialize(self, args):
            super().initialize(args)
            forward = self.engine.decoder.forward

            def faulty(*a, **k):
                if os.path.exists(FLAG):
                    raise RuntimeError("injected fault")
                return forward(*a, **k)

            self.engine.decoder.forward = faulty
""")


@pytest.fixture(scope="module")
def small_server(smol_engine_fp32, tmp_path_factory):
    """One engine row, a queue of one, and an engine that fails while a flag file exists."""
    from model_repo.generate import generate
    from model_repo.server import TritonServer

    d = tmp_path_factory.mktemp("small")
    repo = generate(smol_engine_fp32, d / "repo", max_batch_size=1, max_queue_size=1)
    flag = d / "fail"
    (repo / "tensorrt_llm" / "1" / "model.py").write_text(FAULTY_MODEL.format(flag=str(flag)))

    server = TritonServer(repo).start()
    server.fault_flag = flag
    yield server
    server.stop()


def test_a_full_queue_refuses_with_an_overloaded_error_and_serves_the_rest(small_server):
    """Batch 1, queue 1: with one request running and one waiting, a third is refused at once with
    TensorRT-LLM's executor message (OverloadedError: retryable), over gRPC and HTTP; the two
    accepted requests complete."""
    url = small_server.grpc_url
    done: dict[int, object] = {}

    def run(i):
        try:
            done[i] = Client(url).complete(STORY, max_tokens=60, min_tokens=60)
        except Exception as e:  # noqa: BLE001
            done[i] = e

    first = threading.Thread(target=run, args=(0,))
    first.start()
    wait_for(lambda: engine_metrics(small_server)[("nv_trt_llm_request_metrics", "scheduled")] == 1, 30, "a row in use")
    second = threading.Thread(target=run, args=(1,))
    second.start()
    wait_for(lambda: engine_metrics(small_server)[("nv_trt_llm_request_metrics", "waiting")] == 1, 30, "a waiting request")
    t0 = time.monotonic()
    with pytest.raises(OverloadedError, match="Maximum queue size of 1 has been reached"):
        Client(url, retries=0).complete(STORY, max_tokens=4)
    with pytest.raises(OverloadedError, match="Maximum queue size of 1"):
        Client(small_server.http_url, retries=0, protocol="http").complete(STORY, max_tokens=4)
    assert time.monotonic() - t0 < 5  # refused, not queued
    first.join(120), second.join(120)
    assert [getattr(done[i], "completion_tokens", done[i]) for i in (0, 1)] == [60, 60]


@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "tensorrt_llm"])
def test_a_caller_that_leaves_while_its_request_waits_takes_it_out_of_the_queue(small_server, model):
    """A client that gives up on a queued request (a timeout under load) must not cost the engine a
    prefill and a first token for nobody: the BLS and tensorrt_llm watch their callers (common.CancelWatch,
    as the C++ backend's WaitForCancel thread), so the request leaves the engine's queue while the one
    ahead of it is still generating, and that one is not disturbed."""
    import tritonclient.grpc as grpcclient

    from client import format_chatml
    from tests.triton_util import llm_inputs

    url = small_server.grpc_url
    done = {}
    first = threading.Thread(target=lambda: done.update(r=Client(url).complete(STORY, max_tokens=400, min_tokens=400)))
    first.start()
    wait_for(lambda: engine_metrics(small_server)[("nv_trt_llm_request_metrics", "scheduled")] == 1, 30, "a row in use")
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: None)
    if model == "tensorrt_llm":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(small_server.repo / "preprocessing" / "tokenizer")
        c.async_stream_infer(model, llm_inputs(tok(format_chatml(STORY))["input_ids"], 50, streaming=(True, "BOOL")))
    else:
        c.async_stream_infer(model, inputs(format_chatml(STORY), 50, stream=True))
    wait_for(lambda: engine_metrics(small_server)[("nv_trt_llm_request_metrics", "waiting")] == 1, 30, "a waiting request")
    c.stop_stream(cancel_requests=True)
    wait_for(lambda: engine_metrics(small_server)[("nv_trt_llm_request_metrics", "waiting")] == 0, 2,
             "the abandoned request to leave the queue")
    assert first.is_alive()  # while the first is still generating
    first.join(120)
    assert done["r"].completion_tokens == 400
    wait_engine_idle(small_server, 20)


def test_an_engine_failure_fails_the_requests_in_flight_and_the_model_keeps_serving(small_server):
    """An engine step that raises mid-stream: the request in flight ends with the engine's error, through
    the BLS and on a direct tensorrt_llm stream (an error response, as the C++ backend sends it); the
    engine then serves the next request."""
    from tests.triton_util import llm_inputs, stream_results

    url = small_server.grpc_url
    errors, streaming = [], threading.Event()

    def run():
        try:
            with Client(url).stream(STORY, max_tokens=200, min_tokens=200) as s:
                for i, _ in enumerate(s):
                    if i == 3:
                        streaming.set()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert streaming.wait(timeout=60)
    small_server.fault_flag.touch()
    try:
        t.join(timeout=30)
    finally:
        small_server.fault_flag.unlink()
    assert not t.is_alive(), "the request in flight hung"
    # Mid-stream, through the BLS (on Triton 2.51 by the failure marker, common.FAILURE_MARKER).
    assert len(errors) == 1 and isinstance(errors[0], ServerError)
    assert str(errors[0]) == "generation failed: engine failure: RuntimeError: injected fault"
    # Direct: the engine's own error, in band, as the C++ backend sends it (error and final flag together).
    results: dict = {}
    t = threading.Thread(target=lambda: results.update(r=stream_results(
        url, "tensorrt_llm", llm_inputs([1, 2, 3, 4], 300, streaming=(True, "BOOL"), min_tokens=(300, "INT32")),
        timeout=30)))
    t.start()
    wait_for(lambda: engine_metrics(small_server)[("nv_trt_llm_request_metrics", "scheduled")] == 1, 30, "a row in use")
    small_server.fault_flag.touch()
    try:
        t.join(timeout=30)
    finally:
        small_server.fault_flag.unlink()
    assert results["r"][1] == "engine failure: RuntimeError: injected fault"
    assert ready(small_server.http_url)
    assert Client(url).complete([Message("user", "What is the capital of France?")], max_tokens=24).text
    wait_engine_idle(small_server, 5)


# -- limits that protect the server --------------------------------------------------------------

def test_a_prompt_over_the_size_limit_is_refused_before_tokenization(smol_server):
    """A prompt larger than any text of max_input_len tokens is refused by its size (the tokenizer never
    runs on it), on every model that takes text, over gRPC and HTTP."""
    from build_engine.tokenization import load_tokenizer, max_prompt_bytes
    from model_repo.config import parse

    pre = parse((smol_server.repo / "preprocessing" / "config.pbtxt").read_text())
    limit = max_prompt_bytes(load_tokenizer(smol_server.repo / "preprocessing" / "tokenizer"),
                             int(pre.parameters["max_input_len"].string_value))
    prompt = "a" * (limit + 1)
    for model in ("tensorrt_llm_bls", "ensemble"):
        with pytest.raises(BadRequestError, match=f"the prompt is {limit + 1} bytes"):
            list(Client(smol_server.grpc_url, model=model).stream_text(prompt, max_tokens=4))
    status, body = http_post(smol_server.http_url, "/v2/models/tensorrt_llm_bls/generate",
                             {"text_input": prompt, "max_tokens": 4})
    assert status == 400 and f"the prompt is {limit + 1} bytes".encode() in body
    assert ready(smol_server.http_url)


def test_the_model_control_api_is_off(smol_server):
    """Nobody can unload or load a model over the wire (Triton's model-control mode "none")."""
    status, body = http_post(smol_server.http_url, "/v2/repository/models/tensorrt_llm/unload", {})
    assert status >= 400 and b"explicit model load / unload is not allowed" in body
    assert ready(smol_server.http_url)


def test_prompts_and_outputs_stay_out_of_the_server_log(smol_server):
    marker = "zebra-marker-7f3a"
    mark = smol_server.log_mark()
    reply = Client(smol_server.grpc_url).complete([Message("user", f"Repeat: {marker}")], max_tokens=24)
    with Client(smol_server.grpc_url).stream([Message("user", f"Say {marker} forever")], max_tokens=200) as s:
        next(iter(s))  # then cancelled: the cancellation is logged, by id and count only
    time.sleep(0.5)
    log = "\n".join(smol_server.logs_since(mark))
    assert marker not in log and (not reply.text.strip() or reply.text.strip() not in log)
    assert json.dumps(marker) not in log


# -- a stalled model: the watchdog of `serve` -------------------------------------------------------

def test_stall_watchdog_flags_only_pending_requests_that_make_no_progress():
    from model_repo.server import StallWatchdog

    w = StallWatchdog("http://unused", stall_s=60)
    assert w.check({"bls": (3, 10), "pre": (0, 5)}, now=0) is None
    assert w.check({"bls": (3, 12), "pre": (0, 5)}, now=50) is None      # progress: the wait starts again
    assert w.check({"bls": (3, 12), "pre": (0, 5)}, now=100) is None     # 50 s without progress
    assert w.check({"bls": (0, 12), "pre": (0, 5)}, now=200) is None     # nothing pending: no stall
    assert w.check({"bls": (2, 12), "pre": (0, 5)}, now=210) is None
    assert w.check({"bls": (2, 12), "pre": (0, 5)}, now=270) == \
        "model bls has held 2 pending requests and completed none for 60 s"


STALLED_BLS = textwrap.dedent("""
    # The BLS whose execute never returns: its requests pile up, as in Triton 2.51's python backend deadlock.
    import time

    from model_repo.triton_models import bls as base


    class TritonPythonModel(base.TritonPythonModel):
        def execute(self, requests):
            time.sleep(3600)
""")


def test_serve_exits_non_zero_when_a_model_stalls(tiny_engine, tmp_path):
    """`serve` on a deployment whose BLS hangs: readiness stays 200 (Triton cannot tell), so the
    watchdog must end it with a clear error instead of serving a silent hang."""
    from model_repo.generate import generate
    from model_repo.server import free_port

    repo = generate(tiny_engine, tmp_path / "repo")
    (repo / "tensorrt_llm_bls" / "1" / "model.py").write_text(STALLED_BLS)
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "model_repo", "serve", "--repo", str(repo), "--quiet",
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--stall-timeout", "10", "--drain-timeout", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{http}"), 180, "the server to be ready")
        for _ in range(3):  # the first blocks execute(); the others wait behind it
            threading.Thread(target=stream_call, args=(f"127.0.0.1:{grpc}", "tensorrt_llm_bls",
                                                       inputs("Hi", 4, True), 300), daemon=True).start()
        assert proc.wait(120) == 1
        err = proc.stderr.read()
        assert "tritonserver stalled: model tensorrt_llm_bls has held" in err and "\n" not in err.strip(), err
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-9", "-f", f"{repo}/"], check=False)  # the hung stub, if Triton left it


def _up(url: str) -> bool:
    try:
        return ready(url)
    except OSError:
        return False
