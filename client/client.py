"""Client and AsyncClient over Triton gRPC streaming (tritonclient), plus an HTTP `generate_stream`
(SSE) transport behind the same interface for environments without gRPC. A request is built once
(`request_fields`) for every transport, and every transport returns the same `Stream`.

    with Client("127.0.0.1:8001") as c:
        with c.stream([Message("user", "Hi")], max_tokens=32) as s:
            for chunk in s:
                print(chunk.text, end="")
        print(c.complete([Message("user", "Hi")]).text)

    async with AsyncClient("127.0.0.1:8001") as c:
        async for chunk in c.stream([Message("user", "Hi")]):
            ...
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from client.balancing import channel_args, endpoints, grpc_target
from client.chatml import format_chatml
from client.errors import ClientError, DeadlineExceededError, ServerError, UnavailableError, error_from_grpc
from client.types import Chunk, Completion, Message, SamplingParams
from common.request import MAX_TOKENS, PROMPT, SAMPLING, STOP, STREAM

DEFAULT_MODEL = "tensorrt_llm_bls"


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    base = params or SamplingParams()
    if overrides:
        base = SamplingParams(**{**base.__dict__, **overrides})
    return base


def _messages(messages: Iterable[Message | dict] | str) -> str:
    if isinstance(messages, str):
        messages = [Message("user", messages)]
    return format_chatml(messages, add_generation_prompt=True)


def request_fields(prompt: str, p: SamplingParams, stream: bool = True) -> dict[str, tuple[str, object]]:
    """The request, once for every transport: input name -> (Triton datatype, value). Optional fields
    are sent only when they differ from the model's neutral default."""
    fields: dict[str, tuple[str, object]] = {
        PROMPT.name: (PROMPT.wire, prompt), STREAM.name: (STREAM.wire, stream),
        MAX_TOKENS.name: (MAX_TOKENS.wire, p.max_tokens)}
    for f in SAMPLING:
        value = getattr(p, f.name)
        if f.always or (value is not None and value != f.default):
            fields[f.name] = (f.wire, value)
    if p.stop:
        fields[STOP.name] = (STOP.wire, list(p.stop))
    return fields


_NP = {"INT32": "int32", "FP32": "float32", "UINT64": "uint64", "BOOL": "bool"}  # numpy dtypes by Triton's names


def grpc_inputs(fields: dict[str, tuple[str, object]], grpc_module=None) -> list:
    """tritonclient InferInputs ([1, 1], or [1, n] for a list of strings) from `request_fields`."""
    import numpy as np  # with tritonclient, not at import: `import client` (and its CLI's checks) work without

    if grpc_module is None:
        import tritonclient.grpc as grpc_module

    inputs = []
    for name, (dtype, value) in fields.items():
        values = value if isinstance(value, list) else [value]
        arr = (np.array([[v.encode("utf-8") for v in values]], dtype=object) if dtype == "BYTES"
               else np.array([values], dtype=_NP[dtype]))
        t = grpc_module.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def http_body(fields: dict[str, tuple[str, object]]) -> dict:
    """The same request as a /generate_stream JSON body."""
    return {name: value for name, (_, value) in fields.items()}


def parse_result(result) -> tuple[Chunk | None, bool]:
    """(chunk or None, is_final) from one Triton InferResult (gRPC)."""
    final = result.get_response().parameters["triton_final_response"].bool_param
    text = result.as_numpy("text_output")
    if text is None:
        return None, final
    return _chunk(text.reshape(-1)[0], _first(result.as_numpy("finish_reason")),
                  _first(result.as_numpy("prompt_tokens")), _first(result.as_numpy("completion_tokens")), final), final


def parse_event(data: dict) -> tuple[Chunk, bool]:
    """(chunk, is_final) from one generate_stream server-sent event (HTTP)."""
    if "error" in data:
        raise error_from_grpc(None, data["error"])
    final = bool(data.get("finish_reason"))
    return _chunk(data.get("text_output", ""), data.get("finish_reason"), data.get("prompt_tokens"),
                  data.get("completion_tokens"), final), final


def _first(a):
    return None if a is None else a.reshape(-1)[0]


def _chunk(text, finish, prompt_tokens, completion_tokens, final) -> Chunk:
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    finish = finish.decode() if isinstance(finish, bytes) else finish
    return Chunk(text=text, finish_reason=(finish or None) if final else None,
                 prompt_tokens=None if prompt_tokens is None else int(prompt_tokens),
                 completion_tokens=None if completion_tokens is None else int(completion_tokens))


class _Collector:
    """Accumulates a stream's chunks into a Completion (shared by Client and AsyncClient)."""

    def __init__(self):
        self.t0, self.ttft, self.chunks = time.perf_counter(), None, []

    def add(self, c: Chunk) -> None:
        if self.ttft is None and c.text:
            self.ttft = time.perf_counter() - self.t0
        self.chunks.append(c)

    def result(self) -> Completion:
        last = self.chunks[-1] if self.chunks else Chunk("")
        return Completion("".join(c.text for c in self.chunks), last.finish_reason, last.prompt_tokens,
                          last.completion_tokens, self.ttft, time.perf_counter() - self.t0, self.chunks)


class _GrpcSource:
    """One gRPC streaming call: events are (chunk, final) pairs; cancel() stops it on the server."""

    def __init__(self, client: "Client", fields, request_id: str):
        self._client, self._g, self._q = client, client._acquire(), queue.Queue()
        self.request_id = request_id
        self._g.start_stream(callback=self._on_response, stream_timeout=client.timeout_s, headers=client.headers)
        try:
            self._g.async_stream_infer(client.model, grpc_inputs(fields), request_id=request_id,
                                       enable_empty_final_response=True)
        except Exception as e:  # a broken stream: its cause has been reported through the callback
            if self._q.empty():
                self._q.put((None, e))

    def _on_response(self, result, error):  # tritonclient calls back with these exact names
        self._q.put((result, error))

    def events(self) -> Iterator[tuple[Chunk | None, bool]]:
        while True:
            result, error = self._q.get()
            if error is not None:
                raise error_from_grpc(getattr(error, "status", lambda: None)(), error.message())
            yield parse_result(result)

    def cancel(self) -> None:
        self._g.stop_stream(cancel_requests=True)
        self._client._release(self._g)

    def finish(self) -> None:
        self._g.stop_stream(cancel_requests=False)
        self._client._release(self._g)


class _HttpSource:
    """One POST /v2/models/<m>/generate_stream call, read as server-sent events."""

    def __init__(self, client: "Client", fields, request_id: str):
        self.request_id = request_id
        base = client.url if client.url.startswith("http") else f"http://{client.url}"
        body = http_body(fields)
        req = urllib.request.Request(f"{base}/v2/models/{client.model}/generate_stream",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **client.headers})
        self._resp = None
        try:
            self._resp = urllib.request.urlopen(req, timeout=client.timeout_s)
        except urllib.error.HTTPError as e:
            raise error_from_grpc(_HTTP_STATUS.get(e.code), _http_error_message(e)) from None
        except (urllib.error.URLError, OSError) as e:
            if "timed out" in str(e):
                raise DeadlineExceededError(f"{base}: {e}") from None
            raise UnavailableError(f"cannot reach {base}: {e}") from None

    def events(self) -> Iterator[tuple[Chunk | None, bool]]:
        for raw in self._resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                yield parse_event(json.loads(line[5:].strip()))

    def cancel(self) -> None:
        if self._resp is not None:
            self._resp.close()  # closing the connection cancels the request in Triton

    finish = cancel  # after the final event the response is complete: closing it cancels nothing


def _http_error_message(e: urllib.error.HTTPError) -> str:
    """Triton answers a refused generate_stream with one event (`data: {"error": ...}`), others with JSON."""
    body = (e.read() or b"").decode("utf-8", "replace").strip()
    body = body.removeprefix("data:").strip()
    try:
        return json.loads(body).get("error", body)
    except ValueError:
        return body or str(e)


_HTTP_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


@dataclass(frozen=True)
class Retry:
    """The one retry rule of both clients: an error of a kind in `on` is retried only before the first
    chunk (a retry must not repeat text already delivered), at most `retries` times, after
    backoff_s * 2**attempt seconds."""

    retries: int = 0
    backoff_s: float = 0.2
    on: tuple[type[ClientError], ...] = (UnavailableError,)

    def delay(self, attempt: int, error: BaseException, delivered: bool) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None: give up and raise `error`."""
        if not isinstance(error, self.on) or delivered or attempt >= self.retries:
            return None
        return self.backoff_s * 2**attempt


class Stream:
    """Iterator of Chunks for one request, the same for every transport. Closing it early (close(),
    `with`, or leaving a loop) cancels the request on the server; in-band errors become exceptions;
    it retries (with backoff) only on UNAVAILABLE and only before the first chunk.

        with client.stream(messages, max_tokens=64) as s:
            for chunk in s:
                print(chunk.text, end="")
    """

    def __init__(self, open_source, retry: Retry = Retry()):
        self._open, self._retry = open_source, retry
        self._source = None
        self._closed = False

    @property
    def request_id(self) -> str | None:
        return self._source.request_id if self._source is not None else None

    def _events(self):
        for attempt in itertools.count():
            delivered = False
            try:
                self._source = self._open()
                for chunk, final in self._source.events():
                    if final:  # before the last yield: a consumer may stop there
                        self._finish_source()
                    if _worth_yielding(chunk, final):
                        delivered = True
                        yield chunk
                    if final:
                        return
                return
            except ClientError as e:
                self._cancel_source()
                delay = self._retry.delay(attempt, e, delivered)
                if delay is None:
                    raise
                time.sleep(delay)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            yield from self._events()
        finally:
            self.close()

    def _cancel_source(self) -> None:
        if self._source is not None:
            source, self._source = self._source, None
            source.cancel()

    def _finish_source(self) -> None:
        """After the final response: close without cancelling. (Cancelling a request that has ended is
        legal, but Triton 2.51's python backend can corrupt its memory on it: see RELIABILITY.md.)"""
        if self._source is not None:
            source, self._source = self._source, None
            source.finish()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel_source()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    """Synchronous client over gRPC (default) or HTTP. gRPC streams run on pooled connections
    (tritonclient allows one stream per connection), so a service can hold several at once. Over gRPC,
    `url` may name several replicas (a list of ip:port, or one dns:///name:port target): calls go
    round robin to the replicas that are up (client/balancing.py)."""

    def __init__(self, url: str | list[str] = "127.0.0.1:8001", model: str = DEFAULT_MODEL,
                 timeout_s: float | None = None, ssl: bool = False, root_certificates: str | None = None,
                 headers: dict[str, str] | None = None, retries: int = 3, backoff_s: float = 0.2,
                 protocol: str = "grpc"):
        if protocol not in ("grpc", "http"):
            raise ValueError("protocol must be 'grpc' or 'http'")
        if protocol == "http" and len(endpoints(url)) > 1:
            raise ValueError("the HTTP transport takes one endpoint; several replicas are for gRPC")
        # gRPC: one endpoint, several, or a dns:/// target, balanced round robin (client/balancing.py).
        self.url = grpc_target(url) if protocol == "grpc" else endpoints(url)[0]
        self.model, self.timeout_s = model, timeout_s
        self.ssl, self.root_certificates, self.headers = ssl, root_certificates, dict(headers or {})
        self.protocol = protocol
        self._retry = Retry(retries, backoff_s, _retry_on(self.url))
        self._pool: list = []
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def _acquire(self):
        import tritonclient.grpc as g

        with self._lock:
            if self._pool:
                return self._pool.pop()
        return g.InferenceServerClient(self.url, ssl=self.ssl, root_certificates=self.root_certificates,
                                       channel_args=channel_args())

    def _release(self, grpc_client) -> None:
        with self._lock:
            self._pool.append(grpc_client)

    def _request_id(self) -> str:
        return f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"

    def stream(self, messages, params: SamplingParams | None = None, request_id: str | None = None,
               **overrides) -> Stream:
        """Stream the reply to ChatML `messages` (a list of Message or dicts, or one user string)."""
        return self.stream_text(_messages(messages), params, request_id, **overrides)

    def stream_text(self, prompt: str, params: SamplingParams | None = None, request_id: str | None = None,
                    **overrides) -> Stream:
        """Stream the continuation of a raw prompt (no chat template)."""
        fields = request_fields(prompt, _params(params, overrides))
        source = _HttpSource if self.protocol == "http" else _GrpcSource
        rid = request_id or self._request_id()
        return Stream(lambda: source(self, fields, rid), self._retry)

    def complete(self, messages, params: SamplingParams | None = None, **overrides) -> Completion:
        acc = _Collector()
        for c in self.stream(messages, params, **overrides):
            acc.add(c)
        return acc.result()

    def ready(self) -> bool:
        g = self._acquire()
        try:
            return g.is_server_ready(headers=self.headers)
        except Exception:
            return False
        finally:
            self._release(g)

    def close(self) -> None:
        with self._lock:
            for g in self._pool:
                g.close()
            self._pool.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client over tritonclient.grpc.aio: many concurrent streams on one connection.
    `stream()` is an async generator; leaving it early (break, aclose, task cancellation) cancels the
    request on the server.

        async with AsyncClient("127.0.0.1:8001") as c:
            async for chunk in c.stream([Message("user", "Hi")], max_tokens=32):
                print(chunk.text, end="")
    """

    def __init__(self, url: str | list[str] = "127.0.0.1:8001", model: str = DEFAULT_MODEL,
                 timeout_s: float | None = None, ssl: bool = False, root_certificates: str | None = None,
                 headers: dict[str, str] | None = None, retries: int = 3, backoff_s: float = 0.2):
        import tritonclient.grpc.aio as ga

        self.model, self.timeout_s, self.headers = model, timeout_s, dict(headers or {})
        target = grpc_target(url)
        self._retry = Retry(retries, backoff_s, _retry_on(target))
        self._g = ga.InferenceServerClient(target, ssl=ssl, root_certificates=root_certificates,
                                           channel_args=channel_args())
        self._ids = itertools.count()

    def stream(self, messages, params: SamplingParams | None = None, **overrides):
        return self.stream_text(_messages(messages), params, **overrides)

    async def stream_text(self, prompt: str, params: SamplingParams | None = None, request_id: str | None = None,
                          **overrides):
        import asyncio

        inputs = grpc_inputs(request_fields(prompt, _params(params, overrides)))
        rid = request_id or f"a{uuid.uuid4().hex[:8]}-{next(self._ids)}"
        for attempt in itertools.count():
            delivered = False

            async def requests():
                yield {"model_name": self.model, "inputs": inputs, "request_id": rid,
                       "enable_empty_final_response": True}

            responses = self._g.stream_infer(requests(), stream_timeout=self.timeout_s, headers=self.headers)
            finished = False
            try:
                async for result, error in responses:
                    if error is not None:
                        raise error_from_grpc(getattr(error, "status", lambda: None)(), error.message())
                    chunk, finished = parse_result(result)
                    if _worth_yielding(chunk, finished):
                        delivered = True
                        yield chunk
                    if finished:
                        return
                return
            except Exception as e:
                err = e if isinstance(e, ClientError) else error_from_grpc(_status_of(e), str(e))
                delay = self._retry.delay(attempt, err, delivered)
                if delay is None:
                    if err is e:
                        raise
                    raise err from e
                await asyncio.sleep(delay)
            finally:
                # Cancel only a request that has not ended (see Stream._finish_source): once the request
                # stream is exhausted the call half-closes and Triton ends it after the final response.
                if not finished:
                    responses.cancel()

    async def complete(self, messages, params: SamplingParams | None = None, **overrides) -> Completion:
        acc = _Collector()
        async for c in self.stream(messages, params, **overrides):
            acc.add(c)
        return acc.result()

    async def ready(self) -> bool:
        try:
            return await self._g.is_server_ready(headers=self.headers)
        except Exception:
            return False

    async def close(self) -> None:
        await self._g.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def _retry_on(target: str) -> tuple[type[ClientError], ...]:
    """What is retried before the first chunk: UNAVAILABLE always; with several replicas (a list or a
    dns:/// target) a server error too, on the next replica: a replica killed at the moment a call
    reaches it can fail the call with INTERNAL rather than UNAVAILABLE, and nothing has been generated."""
    several = target.startswith(("ipv4:", "ipv6:", "dns:"))
    return (UnavailableError, ServerError) if several else (UnavailableError,)


def _worth_yielding(chunk: Chunk | None, final: bool) -> bool:
    """A chunk with text, or the final one (it carries the finish reason and usage): both clients' rule."""
    return chunk is not None and bool(chunk.text or final)


def _status_of(e: Exception) -> str | None:
    code = getattr(e, "code", None)
    return str(code()) if callable(code) else None


class Conversation:
    """Keeps the history and appends each reply.

        conv = Conversation(client, system="Be brief.")
        print(conv.say("Hi").text)
    """

    def __init__(self, client: Client, system: str | None = None):
        self.client = client
        self.messages: list[Message] = [Message("system", system)] if system else []

    def say(self, text: str, **params) -> Completion:
        self.messages.append(Message("user", text))
        reply = self.client.complete(self.messages, **params)
        self.messages.append(Message("assistant", reply.text))
        return reply

    def stream(self, text: str, **params) -> Iterator[Chunk]:
        self.messages.append(Message("user", text))
        parts = []
        try:
            for c in self.client.stream(self.messages, **params):
                parts.append(c.text)
                yield c
        finally:
            self.messages.append(Message("assistant", "".join(parts)))
