"""The real Triton server hosting the CPU engine: ensemble, streaming BLS, HTTP, faults."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from build_engine import manifest
from client import Message, format_chatml
from tests.triton_util import (engine_metrics, http_post, inputs, llm_inputs, ready, stream_call, stream_results,
                               wait_engine_idle, wait_for)

QUESTION = [Message("user", "What is the capital of France?")]


@pytest.fixture(params=["smol", "tiny"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def chat_ids(tok_dir, msgs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return tok.apply_chat_template([m.__dict__ for m in msgs], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]


@pytest.mark.container_versions
def test_server_feeds_the_engine_the_chat_template_ids(server):
    """No double BOS: the ids equal apply_chat_template(tokenize=True), for the prompt as sent and
    for one that already carries BOS."""
    msgs = [Message("system", "Be brief."), Message("user", "Héllo — 東京?")]
    want = chat_ids(server.repo / "preprocessing" / "tokenizer", msgs)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(server.repo / "preprocessing" / "tokenizer").bos_token or ""
    prompts = [format_chatml(msgs)]
    if bos and not prompts[0].startswith(bos):  # Hermes: "<s>"; SmolLM2's BOS is <|im_start|> itself
        prompts.append(bos + prompts[0])
    for prompt in prompts:
        q = grpcclient.InferInput("QUERY", [1, 1], "BYTES")
        q.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
        n = grpcclient.InferInput("REQUEST_OUTPUT_LEN", [1, 1], "INT32")
        n.set_data_from_numpy(np.array([[8]], dtype=np.int32))
        ids = c.infer("preprocessing", [q, n]).as_numpy("INPUT_ID").reshape(-1).tolist()
        assert ids == want


@pytest.mark.container_versions
@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "ensemble"])
def test_streamed_deltas_concatenate_to_the_full_text(server, model):
    prompt = format_chatml([Message("user", "Write two sentences about the ocean, with an émoji 🌊.")])
    full, err = stream_call(server.grpc_url, model, inputs(prompt, 40, stream=False))
    assert err is None and len(full) == 1 and full[0]
    pieces, err = stream_call(server.grpc_url, model, inputs(prompt, 40, stream=True))
    assert err is None and len([p for p in pieces if p]) > 3
    assert "".join(pieces) == full[0]
    assert all("\ufffd" not in p for p in pieces)


def test_bls_deltas_carry_text_and_token_count_and_the_final_response_the_rest(smol_server):
    """A streamed delta is text_output and completion_tokens so far; finish_reason and prompt_tokens come on
    the final response, which counts what the non-streamed request counts."""
    prompt = format_chatml(QUESTION)
    whole, err = stream_results(smol_server.grpc_url, "tensorrt_llm_bls", inputs(prompt, 24, stream=False))
    assert err is None and len(whole) == 1
    results, err = stream_results(smol_server.grpc_url, "tensorrt_llm_bls", inputs(prompt, 24, stream=True))
    assert err is None and len(results) > 3
    names = [{o.name for o in r.get_response().outputs} for r in results]
    assert all(n == {"text_output", "completion_tokens"} for n in names[:-1]), names
    assert names[-1] == {"text_output", "completion_tokens", "finish_reason", "prompt_tokens"}
    counts = [int(r.as_numpy("completion_tokens")[0]) for r in results]
    assert counts == sorted(counts) and counts[0] >= 1
    for name in ("finish_reason", "prompt_tokens", "completion_tokens"):
        assert results[-1].as_numpy(name).tolist() == whole[0].as_numpy(name).tolist(), name


@pytest.mark.container_versions
def test_smollm2_answers_paris_over_grpc_and_http(smol_server):
    prompt = format_chatml(QUESTION)
    pieces, err = stream_call(smol_server.grpc_url, "tensorrt_llm_bls", inputs(prompt, 48, stream=True))
    assert err is None and "Paris" in "".join(pieces) and "<|im_end|>" not in "".join(pieces)
    status, body = http_post(smol_server.http_url, "/v2/models/tensorrt_llm_bls/generate",
                             {"text_input": prompt, "max_tokens": 48})
    assert status == 200 and json.loads(body)["text_output"] == "".join(pieces)
    assert json.loads(body)["finish_reason"] == "stop"
    status, body = http_post(smol_server.http_url, "/v2/models/ensemble/generate_stream",
                             {"text_input": prompt, "max_tokens": 48, "stream": True})
    events = [json.loads(line[5:]) for line in body.decode().splitlines() if line.startswith("data:")]
    assert status == 200 and len(events) > 3
    assert "".join(e["text_output"] for e in events) == "".join(pieces)


@pytest.mark.container_versions
def test_bls_chat_stops_at_im_end_well_before_max_tokens(smol_server):
    """TensorRT-LLM's backend has no default end id: the BLS must send the tokenizer's, or a reply runs
    to max_tokens past <|im_end|> (the CPU stand-in behaves the same way)."""
    status, body = http_post(smol_server.http_url, "/v2/models/tensorrt_llm_bls/generate",
                             {"text_input": format_chatml(QUESTION), "max_tokens": 200})
    reply = json.loads(body)
    assert status == 200 and reply["finish_reason"] == "stop", reply
    assert reply["completion_tokens"] < 100 and "Paris" in reply["text_output"]


@pytest.mark.container_versions
def test_tensorrt_llm_stops_only_on_the_end_id_it_is_sent(smol_server):
    """As the C++ backend: without end_id a request runs to request_output_len (end id -1); with the
    tokenizer's end id it stops at <|im_end|>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_server.repo / "preprocessing" / "tokenizer")
    ids = chat_ids(smol_server.repo / "preprocessing" / "tokenizer", QUESTION)

    def generated(**extra) -> int:
        results, err = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs(ids, 60, **extra))
        assert err is None
        return int(results[-1].as_numpy("sequence_length").reshape(-1)[0])

    assert generated() == 60
    assert generated(end_id=(tok.convert_tokens_to_ids("<|im_end|>"), "INT32")) < 30
    # Another end id: the engine's own end is no longer one, the id sent is.
    results, _ = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs(ids, 60))
    free_run = results[-1].as_numpy("output_ids").reshape(-1).tolist()
    stop_at = free_run[5]
    assert generated(end_id=(stop_at, "INT32")) <= free_run.index(stop_at) + 1


@pytest.mark.parametrize("max_tokens,ends_on", [(6, "length"), (40, "end id")])
def test_tensorrt_llm_streams_new_tokens_and_its_final_response_carries_the_last(smol_server, max_tokens, ends_on):
    """As the C++ backend: each streamed response holds only new tokens, and the last one is the final response
    (after the end id it holds none: output_ids [1, 1, 0], sequence_length 0); they join to the non-streamed
    output."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_server.repo / "preprocessing" / "tokenizer")
    ids = chat_ids(smol_server.repo / "preprocessing" / "tokenizer", QUESTION)
    end = (tok.convert_tokens_to_ids("<|im_end|>"), "INT32")
    whole, err = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs(ids, max_tokens, end_id=end))
    assert err is None
    want = whole[-1].as_numpy("output_ids").reshape(-1).tolist()
    assert (len(want) == max_tokens) == (ends_on == "length")
    results, err = stream_results(smol_server.grpc_url, "tensorrt_llm",
                                  llm_inputs(ids, max_tokens, end_id=end, streaming=(True, "BOOL")))
    assert err is None and len(results) > 1
    assert [t for r in results for t in r.as_numpy("output_ids").reshape(-1).tolist()] == want
    final = results[-1]
    assert final.as_numpy("output_ids").shape[:2] == (1, 1)
    n_final = final.as_numpy("output_ids").shape[2]
    assert final.as_numpy("sequence_length").reshape(-1).tolist() == [n_final]
    assert (n_final == 0) == (ends_on == "end id")


def test_tensorrt_llm_stop_words_are_token_sequences_kept_in_the_output(smol_server):
    """As the C++ backend: stop_words_list [1, 2, L] holds id sequences; generation ends after the
    first one is completed, and its tokens are part of the output."""
    ids = chat_ids(smol_server.repo / "preprocessing" / "tokenizer", [Message("user", "Tell me a story.")])
    results, _ = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs(ids, 40))
    free_run = results[-1].as_numpy("output_ids").reshape(-1).tolist()
    word = free_run[6:8]
    words = grpcclient.InferInput("stop_words_list", [1, 2, 2], "INT32")
    words.set_data_from_numpy(np.array([[word, [2, -1]]], dtype=np.int32))
    results, err = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs(ids, 40) + [words])
    first_end = next(i for i in range(1, len(free_run)) if free_run[i - 1:i + 1] == word)
    assert err is None and results[-1].as_numpy("output_ids").reshape(-1).tolist() == free_run[:first_end + 1]


def test_tensorrt_llm_refuses_a_request_that_does_not_ask_for_its_outputs(smol_server):
    """The C++ backend fails a request whose requested outputs lack output_ids or sequence_length."""
    ids = chat_ids(smol_server.repo / "preprocessing" / "tokenizer", QUESTION)
    _, err = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs(ids, 4),
                            outputs=[grpcclient.InferRequestedOutput("output_ids")])
    assert err is not None and "sequence_length tensor must be present in list of output tensors" in err
    assert ready(smol_server.http_url)


def test_stop_without_a_request_id_is_refused_as_the_backend_does(smol_server):
    _, err = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs([1], 1, stop=(True, "BOOL")))
    assert err is not None and "request ID is not provided" in err
    assert ready(smol_server.http_url)


def test_cpu_stand_in_fails_to_load_a_config_the_backend_would_not_load(tiny_engine, tmp_path):
    """The C++ backend reads guided_decoding_backend without a default; so does the stand-in."""
    from build_engine import UserError
    from model_repo.config import parse
    from model_repo.generate import generate
    from model_repo.server import TritonServer

    repo = generate(tiny_engine, tmp_path / "repo")
    path = repo / "tensorrt_llm" / "config.pbtxt"
    cfg = parse(path.read_text())
    del cfg.parameters["guided_decoding_backend"]
    from google.protobuf import text_format

    path.write_text(text_format.MessageToString(cfg))
    with pytest.raises(UserError, match="'guided_decoding_backend' is missing"):
        TritonServer(repo).start(timeout_s=120)


def test_eight_concurrent_streams_match_their_solo_runs(smol_server):
    questions = [f"Name {w} thing that is blue." for w in ("one", "a small", "a big", "an old", "a new", "a soft",
                                                           "a hard", "a cold")]
    prompts = [format_chatml([Message("user", q)]) for q in questions]
    solo = ["".join(stream_call(smol_server.grpc_url, "tensorrt_llm_bls", inputs(p, 24, stream=True))[0])
            for p in prompts]
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, "".join(stream_call(
        smol_server.grpc_url, "tensorrt_llm_bls", inputs(prompts[i], 24, stream=True))[0]))) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [got[i] for i in range(8)] == solo


@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "tensorrt_llm_direct"])
def test_cancelled_stream_stops_generation_and_the_next_request_is_served(smol_server, model):
    c = grpcclient.InferenceServerClient(smol_server.grpc_url)

    def llm_requests() -> int:
        stats = c.get_inference_statistics("tensorrt_llm", as_json=True)["model_stats"][0]
        return sum(int(stats["inference_stats"][k].get("count", 0)) for k in ("success", "fail"))

    requests_before = llm_requests()
    got = []
    c.start_stream(callback=lambda result, error: got.append((result, error)))
    prompt = format_chatml([Message("user", "Tell me a very long story about dragons.")])
    if model == "tensorrt_llm_direct":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smol_server.repo / "preprocessing" / "tokenizer")
        ids = np.array([tok(prompt)["input_ids"]], dtype=np.int32)
        ins = []
        for name, arr, dt in (("input_ids", ids, "INT32"), ("input_lengths", np.array([[ids.shape[1]]], np.int32), "INT32"),
                              ("request_output_len", np.array([[1500]], np.int32), "INT32"),
                              ("streaming", np.array([[True]]), "BOOL")):
            x = grpcclient.InferInput(name, list(arr.shape), dt)
            x.set_data_from_numpy(arr)
            ins.append(x)
        c.async_stream_infer("tensorrt_llm", ins)
    else:
        c.async_stream_infer("tensorrt_llm_bls", inputs(prompt, 1500, stream=True))
    wait_for(lambda: len(got) >= 3, 60, "three chunks")
    steps = engine_metrics(smol_server)[("nv_trt_llm_general_metrics", "iteration_counter")]
    c.stop_stream(cancel_requests=True)
    # From the server's state: the engine empties, having run few steps (one token each) after the close.
    wait_engine_idle(smol_server, 20)
    after = engine_metrics(smol_server)[("nv_trt_llm_general_metrics", "iteration_counter")] - steps
    assert after < 200, f"{after} engine steps after the close"
    # Through the BLS on the CPU server, the cancellation goes by the cancel channel, not by a second
    # (stop) request to tensorrt_llm, which deadlocked Triton 2.51's python backend (common.cancel_address).
    assert llm_requests() == requests_before + 1
    pieces, err = stream_call(smol_server.grpc_url, "tensorrt_llm_bls", inputs(format_chatml(QUESTION), 32, True))
    assert err is None and "Paris" in "".join(pieces)


def test_a_temperature_alone_is_greedy_for_the_engine_and_sampled_through_the_bls(smol_server):
    """TensorRT-LLM's defaults (top-k 0, top-p 0: greedy) hold for the ensemble, which passes sampling values
    straight to tensorrt_llm, and the CPU stand-in follows them; the BLS means what the client means."""
    prompt = format_chatml([Message("user", "Write a short poem about the sea.")])

    def text(model, seed=None):
        extra = {} if seed is None else {"temperature": (1.0, "FP32"), "seed": (seed, "UINT64")}
        pieces, err = stream_call(smol_server.grpc_url, model, inputs(prompt, 24, False, **extra))
        assert err is None, err
        return "".join(pieces)

    greedy = text("ensemble")
    assert {text("ensemble", seed) for seed in (1, 2, 3)} == {greedy}
    assert len({text("tensorrt_llm_bls", seed) for seed in (1, 2, 3)}) > 1


def test_a_sampled_request_without_a_seed_is_seeded_with_0_by_the_engine_and_afresh_by_the_bls(smol_server):
    """TensorRT-LLM seeds a request that has no seed with 0: two like ones draw the same reply through the
    ensemble (and the CPU stand-in does the same); the BLS gives each its own seed."""
    prompt = format_chatml([Message("user", "Write a short poem about the sea.")])
    sampled = {"temperature": (1.0, "FP32"), "top_p": (1.0, "FP32")}

    def text(model):
        pieces, err = stream_call(smol_server.grpc_url, model, inputs(prompt, 24, False, **sampled))
        assert err is None, err
        return "".join(pieces)

    assert text("ensemble") == text("ensemble")
    assert len({text("tensorrt_llm_bls") for _ in range(3)}) > 1


BAD = [
    ("empty prompt", dict(prompt=""), "text_input is empty"),
    ("max_tokens zero", dict(max_tokens=0), "max_tokens must be an integer >= 1 (got 0)"),
    ("max_tokens too large", dict(max_tokens=10**6), "max_tokens must be at most 2047, the engine's output limit"),
    ("penalty out of range", dict(presence_penalty=(3.0, "FP32")), "presence_penalty must be in [-2, 2]"),
    ("bad top_p", dict(top_p=(1.5, "FP32")), "top_p must be in"),
    # No log-prob outputs are declared: the request is refused rather than silently ignored.
    ("log probs", dict(return_log_probs=(True, "BOOL")), "unexpected inference input 'return_log_probs'"),
]


@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "ensemble"])
@pytest.mark.parametrize("case,kw,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(smol_server, model, case, kw, message):
    kw = dict(kw)
    prompt = kw.pop("prompt", format_chatml(QUESTION))
    max_tokens = kw.pop("max_tokens", 16)
    pieces, err = stream_call(smol_server.grpc_url, model, inputs(prompt, max_tokens, True, **kw))
    assert err is not None and message in err, err
    assert ready(smol_server.http_url)


@pytest.mark.parametrize("max_tokens", [0, 10**6])
def test_an_out_of_range_max_tokens_gets_one_message_from_every_path(smol_server, max_tokens):
    """One limits function: the ensemble (preprocessing), the BLS and the client's pre-flight check agree."""
    from client import Client

    errors = [stream_call(smol_server.grpc_url, m, inputs(format_chatml(QUESTION), max_tokens, True))[1]
              for m in ("ensemble", "tensorrt_llm_bls")]
    messages = [e.split("invalid request: ", 1)[1] for e in errors]
    assert messages[0] == messages[1] and "max_tokens must be" in messages[0]
    if max_tokens == 0:
        with pytest.raises(ValueError) as e:
            Client(smol_server.grpc_url).stream(QUESTION, max_tokens=max_tokens)
        assert str(e.value) == messages[0]


def test_a_prompt_and_max_tokens_over_the_sequence_length_get_one_message_from_every_path(smol_server):
    """TensorRT-LLM would cut max_tokens to fit max_seq_len and only log it: the deployment refuses instead,
    with one message from the ensemble, the BLS and the CPU tensorrt_llm."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_server.repo / "preprocessing" / "tokenizer")
    prompt = format_chatml([Message("user", "word " * 1000)])
    n = len(tok(prompt)["input_ids"])
    errors = [stream_call(smol_server.grpc_url, m, inputs(prompt, 2048 - n + 1, True))[1]
              for m in ("ensemble", "tensorrt_llm_bls")]
    _, direct = stream_results(smol_server.grpc_url, "tensorrt_llm", llm_inputs(tok(prompt)["input_ids"], 2048 - n + 1))
    want = f"the prompt ({n} tokens) + max_tokens ({2048 - n + 1}) exceeds the engine's maximum sequence length 2048"
    assert all(e is not None and want in e for e in (*errors, direct)), (errors, direct)


@pytest.mark.parametrize("prompt, message", [
    (format_chatml([Message("user", "word " * 5000)]), "the engine accepts at most"),
    ("", "text_input is empty"),
])
def test_a_refused_prompt_gets_one_message_from_every_path(smol_server, prompt, message):
    """One prompt rule (common.PromptEncoder): the ensemble's preprocessing and the BLS, which tokenizes in
    process, refuse the same prompt with the same words."""
    errors = [stream_call(smol_server.grpc_url, model, inputs(prompt, 16, True))[1]
              for model in ("tensorrt_llm_bls", "ensemble")]
    assert all(e is not None and message in e for e in errors), errors
    assert errors[0].split("invalid request: ", 1)[1] == errors[1].split("invalid request: ", 1)[1]
    assert ready(smol_server.http_url)


def test_wrong_type_and_unknown_parameter_are_refused(smol_server):
    x = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[16.0]], dtype=np.float32))
    _, err = stream_call(smol_server.grpc_url, "tensorrt_llm_bls", [inputs(format_chatml(QUESTION))[0], x])
    assert err is not None and "type" in err.lower(), err
    status, body = http_post(smol_server.http_url, "/v2/models/tensorrt_llm_bls/generate",
                             {"text_input": "hi", "max_tokens": 8, "no_such_parameter": 1})
    assert status == 400 and b"no_such_parameter" in body
    assert ready(smol_server.http_url)


def test_generated_configs_parse_as_model_config(smol_server):
    from model_repo.config import parse

    for name in ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls"):
        cfg = parse((smol_server.repo / name / "config.pbtxt").read_text())
        assert cfg.name == name
    llm = parse((smol_server.repo / "tensorrt_llm" / "config.pbtxt").read_text())
    assert llm.model_transaction_policy.decoupled
    assert {i.name for i in llm.input} >= {"input_ids", "input_lengths", "request_output_len", "end_id",
                                           "streaming", "stop_words_list", "runtime_top_k", "seed"}


def test_metrics_endpoint_reports_inference_counts(smol_server):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{smol_server.ports.metrics}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert 'nv_inference_request_success{model="tensorrt_llm_bls"' in body


def test_server_binds_loopback_and_leaves_no_shared_memory_behind(tiny_engine, tmp_path):
    from pathlib import Path

    from model_repo.generate import generate
    from model_repo.server import TritonServer

    shm = lambda: {p.name for p in Path("/dev/shm").glob("*")}  # noqa: E731
    before = shm()
    server = TritonServer(generate(tiny_engine, tmp_path / "repo"))
    addresses = {a.split("=")[0]: a.split("=")[1] for a in server.command(Path("/b")) if "-address=" in a}
    assert addresses == {"--http-address": "127.0.0.1", "--grpc-address": "127.0.0.1", "--metrics-address": "127.0.0.1"}
    server.start()
    assert server.ready()
    assert server.stop() == 0
    assert shm() - before == set()


def test_serve_command_forwards_logs_and_stops_cleanly_on_sigterm(tiny_engine, tmp_path):
    import signal
    import subprocess
    import sys

    from model_repo.generate import generate
    from model_repo.server import free_port
    from tests.triton_util import ready as is_ready

    repo = generate(tiny_engine, tmp_path / "repo")
    http, grpc, metrics, oa = free_port(), free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "model_repo", "serve", "--repo", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port", str(oa)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if is_ready(f"http://127.0.0.1:{http}"):
                    break
            except OSError:
                time.sleep(0.5)
        assert is_ready(f"http://127.0.0.1:{http}")
        import urllib.request

        deadline = time.time() + 30
        while time.time() < deadline:  # the OpenAI frontend comes up beside Triton, on loopback
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{oa}/v1/models", timeout=5) as r:
                    assert json.loads(r.read())["data"][0]["id"] == "tiny-hermes"
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("the OpenAI frontend never answered")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err
    assert f"gRPC 127.0.0.1:{grpc}" in out and f"OpenAI http://127.0.0.1:{oa}/v1" in out
    assert "successfully loaded 'tensorrt_llm_bls'" in err  # the server's own log, forwarded
    # ... without what newcomers read as failures on a CPU machine, or the tables (serve --verbose has them)
    assert "CudaDriverHelper" not in err and "CUDA driver version" not in err and "| tensorrt_llm_bls" not in err


def test_the_engines_padded_vocabulary_is_sampled_by_tensorrt_llm_and_banned_by_the_text_models(tiny_server,
                                                                                                tiny_engine):
    """ModelOpt pads tiny-hermes' vocabulary (32002 ids, as Nous-Hermes-2-Mistral's) to 32064 with zero rows,
    and TensorRT-LLM samples over the whole padded width: logit 0 for every id the tokenizer lacks. The CPU
    engine does the same, so a sampled request to tensorrt_llm itself draws such ids, as on the GPU; the
    ensemble and the BLS ban them (common.padding_ids), so the same requests through them all succeed,
    their ids all the tokenizer's (postprocessing refuses any other; the BLS fails the request)."""
    from build_engine.cpu.decoder import Decoder

    m = manifest.read(tiny_engine, "cpu-engine")
    real, padded = m["model"]["vocab_size"], m["engine_vocab_size"]
    assert (real, padded) == (32002, 32064)
    dec = Decoder(tiny_engine, rows=1, capacity=16)
    logits = dec.forward(0, np.array([[1, 2, 3]], dtype=np.int64), [3])
    assert logits.shape[-1] == padded and not logits[..., real:].any() and logits[..., :real].any()

    prompt = format_chatml(QUESTION)
    ids = chat_ids(tiny_server.repo / "preprocessing" / "tokenizer", QUESTION)
    n, seeds = 400, range(4)
    sampled = {"temperature": (1.0, "FP32"), "runtime_top_p": (1.0, "FP32")}
    drawn = []
    for seed in seeds:
        results, err = stream_results(tiny_server.grpc_url, "tensorrt_llm",
                                      llm_inputs(ids, n, **sampled, seed=(seed, "UINT64")))
        assert err is None, err
        drawn += results[-1].as_numpy("output_ids").reshape(-1).tolist()
    assert len(drawn) == n * len(seeds) and any(i >= real for i in drawn)  # the hazard is real here too
    for model in ("ensemble", "tensorrt_llm_bls"):
        for seed in seeds:
            results, err = stream_results(tiny_server.grpc_url, model, inputs(
                prompt, n, False, temperature=(1.0, "FP32"), top_p=(1.0, "FP32"), seed=(seed, "UINT64")))
            assert err is None, f"{model}, seed {seed}: {err}"
