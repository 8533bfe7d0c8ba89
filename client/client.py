"""Client and AsyncClient over Triton gRPC streaming (tritonclient), plus an HTTP `generate_stream`
(SSE) transport behind the same interface for environments without gRPC.

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

import numpy as np

from client.chatml import format_chatml
from client.errors import ClientError, UnavailableError, error_from_grpc
from client.types import Chunk, Completion, Message, SamplingParams

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


def _grpc_inputs(prompt: str, p: SamplingParams, stream: bool):
    import tritonclient.grpc as g

    def tensor(name, dtype, value):
        t = g.InferInput(name, [1, 1] if dtype != "BYTES" or name == "text_input" else [1, len(value)], dtype)
        arr = np.array([[value]], dtype=object if dtype == "BYTES" else None) if name == "text_input" else None
        if arr is None:
            np_dtype = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}.get(dtype)
            arr = (np.array([[s.encode() for s in value]], dtype=object) if dtype == "BYTES"
                   else np.array([[value]], dtype=np_dtype))
        t.set_data_from_numpy(arr)
        return t

    inputs = [tensor("text_input", "BYTES", prompt.encode("utf-8")), tensor("max_tokens", "INT32", p.max_tokens),
              tensor("stream", "BOOL", stream), tensor("temperature", "FP32", p.temperature),
              tensor("top_p", "FP32", p.top_p), tensor("top_k", "INT32", p.top_k),
              tensor("repetition_penalty", "FP32", p.repetition_penalty)]
    if p.presence_penalty:
        inputs.append(tensor("presence_penalty", "FP32", p.presence_penalty))
    if p.frequency_penalty:
        inputs.append(tensor("frequency_penalty", "FP32", p.frequency_penalty))
    if p.min_tokens:
        inputs.append(tensor("min_tokens", "INT32", p.min_tokens))
    if p.seed is not None:
        inputs.append(tensor("seed", "UINT64", p.seed))
    if p.stop:
        inputs.append(tensor("stop_words", "BYTES", list(p.stop)))
    return inputs


def parse_result(result) -> tuple[Chunk | None, bool]:
    """(chunk or None, is_final) from one Triton InferResult. Shared by every transport."""
    final = result.get_response().parameters["triton_final_response"].bool_param
    text = result.as_numpy("text_output")
    if text is None:
        return None, final
    return _chunk(text.reshape(-1)[0], _first(result.as_numpy("finish_reason")),
                  _first(result.as_numpy("prompt_tokens")), _first(result.as_numpy("completion_tokens")), final), final


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


class _ClosesOnExit:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Stream(_ClosesOnExit):
    """Iterator of Chunks for one request. Closing it early (close(), `with`, or break) cancels the
    request on the server."""

    def __init__(self, client: "Client", grpc_client, model, inputs, request_id, timeout_s, headers):
        self._client, self._g, self._q = client, grpc_client, queue.Queue()
        self.request_id = request_id
        self._closed = False
        self._g.start_stream(callback=self._on_response, stream_timeout=timeout_s, headers=headers)
        try:
            self._g.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        except Exception as e:  # a broken stream: its cause has been reported through the callback
            if self._q.empty():
                self._q.put((None, e))

    def _on_response(self, result, error):  # tritonclient calls back with these exact names
        self._q.put((result, error))

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                result, error = self._q.get()
                if error is not None:
                    raise error_from_grpc(getattr(error, "status", lambda: None)(), error.message())
                chunk, final = parse_result(result)
                if chunk is not None and (chunk.text or final):
                    yield chunk
                if final:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._g.stop_stream(cancel_requests=True)
            self._client._release(self._g)


class Client(_ClosesOnExit):
    """Synchronous client. Streams run on pooled gRPC connections (tritonclient allows one stream
    per connection), so a service can hold several streams at once without a connection per call."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = DEFAULT_MODEL, timeout_s: float | None = None,
                 ssl: bool = False, root_certificates: str | None = None, headers: dict[str, str] | None = None,
                 retries: int = 3, backoff_s: float = 0.2, protocol: str = "grpc"):
        if protocol not in ("grpc", "http"):
            raise ValueError("protocol must be 'grpc' or 'http'")
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.ssl, self.root_certificates, self.headers = ssl, root_certificates, dict(headers or {})
        self.retries, self.backoff_s, self.protocol = retries, backoff_s, protocol
        self._pool: list = []
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def _acquire(self):
        import tritonclient.grpc as g

        with self._lock:
            if self._pool:
                return self._pool.pop()
        return g.InferenceServerClient(self.url, ssl=self.ssl, root_certificates=self.root_certificates)

    def _release(self, grpc_client) -> None:
        with self._lock:
            self._pool.append(grpc_client)

    def _request_id(self) -> str:
        return f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"

    def stream(self, messages, params: SamplingParams | None = None, **overrides) -> Iterator[Chunk]:
        p = _params(params, overrides)
        prompt = _messages(messages)
        if self.protocol == "http":
            return _http_stream(self.url, self.model, prompt, p, True, self.timeout_s, self.headers)
        return self._with_retries(lambda: Stream(self, self._acquire(), self.model, _grpc_inputs(prompt, p, True),
                                                 self._request_id(), self.timeout_s, self.headers))

    def _with_retries(self, open_stream) -> Iterator[Chunk]:
        """Retry with backoff, but only while no token has been delivered and only on UNAVAILABLE."""
        for attempt in range(self.retries + 1):
            stream = open_stream()
            it = iter(stream)
            try:
                first = next(it)
            except StopIteration:
                return iter(())
            except UnavailableError:
                stream.close()
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
                continue
            return _Prefixed(first, it, stream)
        raise UnavailableError("unreachable")

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


class _Prefixed(_ClosesOnExit):
    """An iterator that yields an already-read first chunk, then the rest; closable."""

    def __init__(self, first, rest, stream):
        self._first, self._rest, self._stream = first, rest, stream

    def __iter__(self):
        try:
            yield self._first
            yield from self._rest
        finally:
            self.close()

    def close(self):
        self._stream.close()


class AsyncClient:
    """asyncio client over tritonclient.grpc.aio: many concurrent streams on one connection."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = DEFAULT_MODEL, timeout_s: float | None = None,
                 ssl: bool = False, root_certificates: str | None = None, headers: dict[str, str] | None = None,
                 retries: int = 3, backoff_s: float = 0.2):
        import tritonclient.grpc.aio as ga

        self.model, self.timeout_s, self.headers = model, timeout_s, dict(headers or {})
        self.retries, self.backoff_s = retries, backoff_s
        self._g = ga.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)
        self._ids = itertools.count()

    async def stream(self, messages, params: SamplingParams | None = None, **overrides):
        import asyncio

        p = _params(params, overrides)
        inputs = _grpc_inputs(_messages(messages), p, True)
        for attempt in range(self.retries + 1):
            delivered = False

            async def requests():
                yield {"model_name": self.model, "inputs": inputs, "request_id": f"a{next(self._ids)}",
                       "enable_empty_final_response": True}

            responses = self._g.stream_infer(requests(), stream_timeout=self.timeout_s, headers=self.headers)
            try:
                async for result, error in responses:
                    if error is not None:
                        raise error_from_grpc(getattr(error, "status", lambda: None)(), error.message())
                    chunk, final = parse_result(result)
                    if chunk is not None and (chunk.text or final):
                        delivered = True
                        yield chunk
                    if final:
                        return
                return
            except UnavailableError:
                if delivered or attempt == self.retries:
                    raise
                await asyncio.sleep(self.backoff_s * 2**attempt)
            except Exception as e:
                if isinstance(e, ClientError):
                    raise
                raise error_from_grpc(_status_of(e), str(e)) from e
            finally:
                responses.cancel()

    async def complete(self, messages, params: SamplingParams | None = None, **overrides) -> Completion:
        acc = _Collector()
        async for c in self.stream(messages, params, **overrides):
            acc.add(c)
        return acc.result()

    async def close(self) -> None:
        await self._g.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def _status_of(e: Exception) -> str | None:
    code = getattr(e, "code", None)
    return str(code()) if callable(code) else None


def _http_stream(url: str, model: str, prompt: str, p: SamplingParams, stream: bool, timeout_s, headers):
    """POST /v2/models/<m>/generate_stream and parse its server-sent events."""
    body = {"text_input": prompt, "max_tokens": p.max_tokens, "stream": True, "temperature": p.temperature,
            "top_p": p.top_p, "top_k": p.top_k, "repetition_penalty": p.repetition_penalty}
    if p.min_tokens:
        body["min_tokens"] = p.min_tokens
    if p.stop:
        body["stop_words"] = list(p.stop)
    base = url if url.startswith("http") else f"http://{url}"
    req = urllib.request.Request(f"{base}/v2/models/{model}/generate_stream", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers}, method="POST")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        raise error_from_grpc(None, json.loads(e.read() or b"{}").get("error", str(e))) from None
    except (urllib.error.URLError, OSError) as e:
        raise UnavailableError(f"cannot reach {base}: {e}") from None

    def events():
        with resp:
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                data = json.loads(line[5:].strip())
                if "error" in data:
                    raise error_from_grpc(None, data["error"])
                yield _chunk(data.get("text_output", ""), data.get("finish_reason"), data.get("prompt_tokens"),
                             data.get("completion_tokens"), bool(data.get("finish_reason")))
    return events()


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
