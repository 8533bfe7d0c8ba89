"""client/: ChatML formatting, validation, error mapping (offline) and streaming against the real server."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys

import pytest

from client import (AsyncClient, BadRequestError, Client, Conversation, DeadlineExceededError, Message,
                    OverloadedError, SamplingParams, ServerError, UnavailableError, error_from_grpc,
                    format_chatml)
from tests.triton_util import wait_engine_idle

PIECES = ["Hello", "naïve café", "東京タワー", "emoji 🚀🔥", " leading space", "trailing space ", "multi\nline",
          "<b>tags</b>", "quote \" and ' and \\", ""]


def random_conversation(rng: random.Random) -> list[Message]:
    msgs = [Message("system", rng.choice(PIECES))] if rng.random() < 0.5 else []
    for i in range(rng.randint(1, 4)):
        msgs.append(Message("user", " ".join(rng.sample(PIECES, 2))))
        if rng.random() < 0.7:
            msgs.append(Message("assistant", rng.choice(PIECES)))
    return msgs


def test_format_chatml_equals_the_model_template_text_and_ids(hermes_tokenizer):
    tok = hermes_tokenizer
    rng = random.Random(0)
    for _ in range(50):
        msgs = random_conversation(rng)
        dicts = [m.__dict__ for m in msgs]
        for gen in (True, False):
            want = tok.apply_chat_template(dicts, add_generation_prompt=gen, tokenize=False)
            assert tok.bos_token + format_chatml(msgs, add_generation_prompt=gen) == want
            ids = tok.apply_chat_template(dicts, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
            assert tok(format_chatml(msgs, add_generation_prompt=gen))["input_ids"] == ids


@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_k": -2}, "top_k must be an integer >= 0"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2]"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens must be in [0, max_tokens]"),
    ({"seed": -1}, "seed must be a uint64"),
    ({"stop": ["ok", ""]}, "stop sequences must be non-empty strings"),
])
def test_sampling_params_are_validated_before_any_call(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_prompt_and_max_tokens_must_fit_the_sequence_length_exactly():
    from common.limits import sampling_problems

    assert sampling_problems(max_tokens=48, prompt_tokens=2000, max_seq_len=2048) == []
    assert sampling_problems(max_tokens=49, prompt_tokens=2000, max_seq_len=2048) == [
        "the prompt (2000 tokens) + max_tokens (49) exceeds the engine's maximum sequence length 2048"]


def test_message_roles_are_validated():
    with pytest.raises(ValueError, match="role must be one of"):
        Message("robot", "hi")


@pytest.mark.parametrize("status,message,kind", [
    ("StatusCode.UNAVAILABLE", "connection refused", UnavailableError),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceededError),
    ("StatusCode.INVALID_ARGUMENT", "bad", BadRequestError),
    (None, "invalid request: text_input is empty", BadRequestError),
    (None, "in ensemble 'ensemble', invalid request: max_tokens must be >= 1 (got 0)", BadRequestError),
    (None, "[request id: <id_unknown>] unexpected inference input 'foo' for model 'tensorrt_llm_bls'",
     BadRequestError),
    (None, "engine exploded", ServerError),
    # A full queue (TensorRT-LLM's executor: INTERNAL; Triton's dynamic batcher: UNAVAILABLE) is retryable.
    ("StatusCode.INTERNAL", "Maximum queue size of 32 has been reached, please try again later", OverloadedError),
    ("StatusCode.UNAVAILABLE", "[request id: 7] Exceeds maximum queue size", OverloadedError),
    # A server shutting down: another replica can answer.
    (None, "Request for unknown model: 'tensorrt_llm_bls' has no available versions", UnavailableError),
    # Words in a message do not make a bad request: only the marker or Triton's own input checks do.
    (None, "generation failed: unexpected end of stream", ServerError),
    (None, "the value must be valid", ServerError),
])
def test_errors_map_from_grpc_status_and_in_band_messages(status, message, kind):
    err = error_from_grpc(status, message)
    assert type(err) is kind and str(err) == message


# -- against the real server ----------------------------------------------------------------

QUESTION = [Message("user", "What is the capital of France?")]


def test_sync_stream_and_complete_agree(smol_server):
    with Client(smol_server.grpc_url) as c:
        chunks = list(c.stream(QUESTION, max_tokens=48))
        done = c.complete(QUESTION, max_tokens=48)
    assert "".join(ch.text for ch in chunks) == done.text and "Paris" in done.text
    assert chunks[-1].finish_reason == "stop" and done.finish_reason == "stop"
    assert done.prompt_tokens > 5 and 0 < done.completion_tokens < 48 and 0 < done.ttft_s <= done.latency_s


def test_http_transport_gives_the_same_text(smol_server):
    with Client(smol_server.grpc_url) as g:
        want = g.complete(QUESTION, max_tokens=32).text
    h = Client(smol_server.http_url, protocol="http")
    assert h.complete(QUESTION, max_tokens=32).text == want


def test_early_close_cancels_on_the_server_and_the_client_keeps_working(smol_server):

    with Client(smol_server.grpc_url) as c:
        with c.stream([Message("user", "Tell me a very long story.")], max_tokens=1000, min_tokens=1000) as s:
            for i, _ in enumerate(s):
                if i == 2:
                    break
        wait_engine_idle(smol_server, 3)  # 1000 tokens would take over 10 s
        assert "Paris" in c.complete(QUESTION, max_tokens=32).text


def test_deadline_expiry_raises_the_timeout_error(smol_server):
    with Client(smol_server.grpc_url, timeout_s=0.05) as c:
        with pytest.raises(DeadlineExceededError):
            c.complete([Message("user", "Tell me a very long story.")], max_tokens=1000)


def test_server_down_raises_unavailable_after_retries():
    from model_repo.server import free_port

    with Client(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as c:
        with pytest.raises(UnavailableError):
            c.complete(QUESTION, max_tokens=8)


SERVER_REFUSALS = [  # every way the deployment refuses a request the client lets through
    ("empty prompt", lambda c: c.stream_text("", max_tokens=8), "text_input is empty"),
    ("max_tokens over the engine", lambda c: c.stream(QUESTION, max_tokens=10**6), "max_tokens must be at most"),
    ("over-long prompt", lambda c: c.stream([Message("user", "word " * 5000)], max_tokens=8), "accepts at most"),
    ("unknown model", lambda c: Client(c.url, model="nope", protocol=c.protocol).stream(QUESTION, max_tokens=8),
     "nope"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case,call,message", SERVER_REFUSALS, ids=[r[0] for r in SERVER_REFUSALS])
def test_each_server_refusal_is_a_bad_request_error_on_every_transport(smol_server, protocol, case, call, message):
    url = smol_server.grpc_url if protocol == "grpc" else smol_server.http_url
    with Client(url, protocol=protocol, retries=0) as c:
        with pytest.raises(BadRequestError, match=message):
            list(call(c))
        assert "Paris" in c.complete(QUESTION, max_tokens=32).text


def test_http_stream_is_the_same_closable_stream(smol_server):
    h = Client(smol_server.http_url, protocol="http")
    with h.stream(QUESTION, max_tokens=32) as s:
        text = "".join(chunk.text for chunk in s)
    assert "Paris" in text and type(s) is type(Client(smol_server.grpc_url).stream(QUESTION))


def test_every_sampling_field_reaches_both_transports_alike():
    from client.client import grpc_inputs, http_body, request_fields

    p = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.9, top_k=3, repetition_penalty=1.1,
                       presence_penalty=0.2, frequency_penalty=0.3, min_tokens=2, seed=7, stop=("a", "b"))
    fields = request_fields("hi", p)
    assert set(fields) == {"text_input", "max_tokens", "stream", "temperature", "top_p", "top_k",
                           "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "seed",
                           "stop_words"}
    assert set(http_body(fields)) == {i.name() for i in grpc_inputs(fields)} == set(fields)
    assert http_body(fields)["seed"] == 7 and http_body(fields)["stop_words"] == ["a", "b"]


def test_bad_request_surfaces_as_bad_request_error(smol_server):
    with Client(smol_server.grpc_url) as c:
        with pytest.raises(BadRequestError, match="max_tokens must be at most"):
            c.complete(QUESTION, max_tokens=10**6)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_seeded_sampling_with_penalties_reproduces_through_the_server(smol_server, protocol):
    url = smol_server.grpc_url if protocol == "grpc" else smol_server.http_url
    poem = [Message("user", "Write a short poem about the sea.")]
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95, seed=11, repetition_penalty=1.1, presence_penalty=0.5,
              frequency_penalty=0.3)
    with Client(url, protocol=protocol) as c:
        first, again = c.complete(poem, **kw).text, c.complete(poem, **kw).text
        other = c.complete(poem, **{**kw, "seed": 12}).text
    assert first and first == again and other != first


def test_sixteen_concurrent_async_streams_complete(smol_server):
    async def main():
        async with AsyncClient(smol_server.grpc_url) as c:
            return await asyncio.gather(*[c.complete([Message("user", f"Count to {i % 4 + 2}.")], max_tokens=24)
                                          for i in range(16)])

    results = asyncio.run(main())
    assert len(results) == 16 and all(r.text and r.finish_reason in ("stop", "length") for r in results)


def test_async_early_close_cancels(smol_server):
    async def main():
        async with AsyncClient(smol_server.grpc_url) as c:
            stream = c.stream([Message("user", "Tell me a very long story.")], max_tokens=1000, min_tokens=1000)
            n = 0
            async for _ in stream:
                n += 1
                if n == 2:
                    break
            await stream.aclose()
            # From the server's state: the engine empties (1000 tokens would take over 10 s).
            await asyncio.to_thread(wait_engine_idle, smol_server, 3)
            return await c.complete(QUESTION, max_tokens=32)

    assert "Paris" in asyncio.run(main()).text


def test_conversation_keeps_history(smol_server):
    with Client(smol_server.grpc_url) as c:
        conv = Conversation(c, system="You are a helpful assistant.")
        reply = conv.say("What is the capital of France?", max_tokens=32)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.messages[-1].content == reply.text


def test_chat_cli_one_shot_json(smol_server):
    out = subprocess.run([sys.executable, "-m", "client", "chat", "--url", smol_server.grpc_url, "--prompt",
                          "What is the capital of France?", "--json", "--max-tokens", "32"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in json.loads(out.stdout)["text"]


def test_client_does_not_import_torch_or_transformers():
    code = "import sys, client; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False False"


def test_chat_repl_streams_and_survives_ctrl_c_mid_answer(smol_server):
    """The interactive chat in a real pseudo-terminal: Ctrl-C cancels the answer, not the program."""
    import pexpect

    # A Ctrl-C is SIGINT, and a process started with SIGINT ignored (a job sent to the background by a
    # non-interactive shell, as `make test &` is) passes that on through exec: Python then never raises
    # KeyboardInterrupt. The chat gets the default disposition, as from an interactive terminal.
    child = pexpect.spawn(sys.executable, ["-m", "client", "chat", "--url", smol_server.grpc_url,
                                           "--max-tokens", "600"], encoding="utf-8", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect_exact("you> ")
        child.sendline("Tell me a very long story about a dragon and a knight.")
        child.expect_exact("model> ")
        child.expect(r"\w+ \w+ \w+")  # tokens are streaming
        child.sendintr()
        child.expect_exact("[cancelled]")
        child.expect_exact("you> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("Paris")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_a_stop_sequence_frees_the_engine_instead_of_generating_on(smol_server):
    """"ragon" is not a token sequence the engine's id-level stop words can match (as on
    TensorRT-LLM), so the BLS finds it in the text, cuts the reply and stops the engine request."""
    with Client(smol_server.grpc_url) as c:
        r = c.complete([Message("user", "Tell me a very long story about a dragon.")], max_tokens=1500,
                       min_tokens=1500, stop=("ragon",))
    assert r.finish_reason == "stop" and "ragon" not in r.text
    wait_engine_idle(smol_server, 3)  # the BLS stopped the inner request; it did not run on to 1500 tokens


class ScriptedSource:
    """A transport that plays a script: (chunk, final) events, or an exception to raise at that point.
    Records whether the Stream finished (request ended) or cancelled it."""

    def __init__(self, script, log):
        self.script, self.log, self.request_id = script, log, f"r{len(log)}"
        log.append(self)
        self.ended = None

    def events(self):
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item

    def finish(self):
        self.ended = "finished"

    def cancel(self):
        self.ended = "cancelled"


def scripted_stream(*scripts, retries=3, retry_on=(UnavailableError,)):
    from client.client import Retry, Stream

    log, queue = [], list(scripts)
    return Stream(lambda: ScriptedSource(queue.pop(0), log), Retry(retries, backoff_s=0, on=retry_on)), log


def test_stream_retries_only_before_the_first_chunk_and_finishes_without_cancelling():
    from client import Chunk

    down = UnavailableError("connection refused")
    ok = [(Chunk("Hel"), False), (Chunk("lo", "stop"), True)]
    s, log = scripted_stream([down], [down], ok)
    assert "".join(c.text for c in s) == "Hello"
    assert [src.ended for src in log] == ["cancelled", "cancelled", "finished"]  # an ended request: no cancel

    s, log = scripted_stream([(Chunk("Hel"), False), down], ok)  # lost after a chunk: never replayed
    with pytest.raises(UnavailableError):
        list(s)
    assert len(log) == 1 and log[0].ended == "cancelled"

    s, log = scripted_stream([down], [down], retries=1)  # retries run out
    with pytest.raises(UnavailableError):
        list(s)
    assert len(log) == 2


def test_stream_does_not_retry_a_refusal_and_an_early_close_cancels():
    from client import BadRequestError, Chunk

    s, log = scripted_stream([BadRequestError("max_tokens must be an integer >= 1 (got 0)")], [])
    with pytest.raises(BadRequestError):
        list(s)
    assert len(log) == 1

    s, log = scripted_stream([(Chunk("a"), False), (Chunk("b"), False), (Chunk("c", "length"), True)])
    with s:
        assert next(iter(s)).text == "a"
    assert log[0].ended == "cancelled" and s.request_id is None


def test_one_retry_rule_for_both_clients():
    """client.Retry is the rule the sync Stream and the async client both ask: only the listed errors,
    only before the first chunk, at most `retries` times, with exponential backoff."""
    from client.client import Retry
    from client.errors import BadRequestError, ServerError, UnavailableError

    r = Retry(retries=2, backoff_s=0.5, on=(UnavailableError,))
    assert [r.delay(a, UnavailableError("x"), delivered=False) for a in range(3)] == [0.5, 1.0, None]
    assert r.delay(0, UnavailableError("x"), delivered=True) is None
    assert r.delay(0, BadRequestError("x"), delivered=False) is None
    assert r.delay(0, ServerError("x"), delivered=False) is None
    assert Retry(1, 0.5, on=(UnavailableError, ServerError)).delay(0, ServerError("x"), delivered=False) == 0.5
