"""OpenAI-compatible HTTP API in front of a Triton deployment of this repository layout (CPU or GPU):
`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, `/metrics` (Prometheus).

It talks to Triton's `tensorrt_llm_bls` model over gRPC through the project's AsyncClient (one
connection, many streams). Chat messages become ChatML here exactly as the client does it; the
server tokenizes. Responses are the `openai` package's own types. A client that disconnects
mid-stream cancels its Triton request.

    app = create_app(FrontendConfig(triton_url="127.0.0.1:8001", model_name="smollm2-135m-instruct"))
    uvicorn.run(app, host="127.0.0.1", port=9000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from client import (AsyncClient, BadRequestError, ClientError, Message, OverloadedError, SamplingParams,
                    UnavailableError)
from client.chatml import format_chatml
from common.request import SAMPLING


@dataclass(frozen=True)
class FrontendConfig:
    triton_url: str  # host:gRPC port of the Triton server
    model_name: str  # the id /v1/models reports and requests must name
    api_key: str | None = None
    default_max_tokens: int = 256
    triton_model: str = "tensorrt_llm_bls"
    max_body_bytes: int = 4 << 20  # larger request bodies are refused (413) before they are read whole


# -- requests: the OpenAI parameters this deployment honours; anything else is refused (400) --------

class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions that vLLM's server also accepts (benchmarks use min_tokens for a fixed output length).
    top_k: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_choice(self):
        if self.n not in (None, 1):
            raise ValueError("n must be 1: this deployment returns one choice per request")
        if isinstance(self.stop, list) and not all(self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        return self

    def sampling(self, max_tokens: int | None, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        given = {f.name: getattr(self, f.openai) for f in SAMPLING if f.openai}
        return SamplingParams(max_tokens=max_tokens or default_max_tokens, stop=tuple(s for s in stop if s),
                              **{k: v for k, v in given.items() if v is not None})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt(self) -> str:
        return format_chatml([Message("system" if m.role == "developer" else m.role, m.text())
                              for m in self.messages])


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)


_Sampling.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


# -- errors in OpenAI's shape -----------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: Exception) -> ApiError:
    """The OpenAI-shaped error for anything a request can fail with."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (BadRequestError, ValueError)):
        return ApiError(400, str(e), "invalid_request_error")
    if isinstance(e, OverloadedError):  # as TGI answers a full queue: retryable, with backoff
        return ApiError(429, f"the server is overloaded, retry later: {e}", "overloaded_error", code="overloaded")
    if isinstance(e, UnavailableError):
        return ApiError(503, f"the inference server is unavailable: {e}", "service_unavailable")
    return ApiError(500, f"{type(e).__name__}: {e}" if not isinstance(e, ClientError) else str(e), "server_error")


# -- metrics ----------------------------------------------------------------------------------------

class Metrics:
    """The frontend's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self):
        import prometheus_client as p

        self.registry = p.CollectorRegistry()
        self.requests = p.Counter("hermes_openai_requests", "Requests by endpoint and HTTP status",
                                  ["endpoint", "status"], registry=self.registry)
        self.in_flight = p.Gauge("hermes_openai_requests_in_flight", "Requests being answered",
                                 registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = p.Histogram("hermes_openai_time_to_first_token_seconds", "Time to first token",
                                buckets=buckets, registry=self.registry)
        self.itl = p.Histogram("hermes_openai_inter_token_latency_seconds", "Gap between streamed chunks",
                               buckets=buckets, registry=self.registry)
        self.prompt_tokens = p.Counter("hermes_openai_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.completion_tokens = p.Counter("hermes_openai_completion_tokens", "Completion tokens",
                                           registry=self.registry)

    def render(self) -> bytes:
        import prometheus_client as p

        return p.generate_latest(self.registry)


# -- the app ----------------------------------------------------------------------------------------

@dataclass
class _Answer:
    """What a generation produced, as the stream went (for usage and metrics)."""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def create_app(cfg: FrontendConfig) -> FastAPI:
    metrics = Metrics()
    state: dict = {}

    async def lifespan(app):
        state["client"] = AsyncClient(cfg.triton_url, model=cfg.triton_model, retries=1, backoff_s=0.1)
        yield
        await state["client"].close()

    app = FastAPI(title="hermes-trtllm OpenAI-compatible API", lifespan=lifespan)
    app.state.metrics = metrics
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        if first.get("type") == "extra_forbidden":
            message = f"unsupported parameter: {param}"
        return JSONResponse(ApiError(400, message, "invalid_request_error", param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(request: Request, e: StarletteHTTPException):
        # What the web framework refuses itself (an unknown path, a wrong method, a body it cannot parse):
        # OpenAI's shape too, which the SDKs read to raise the right exception.
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return JSONResponse(ApiError(e.status_code, detail, error_type(e.status_code)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        err = api_error(e)
        return JSONResponse(err.body(), status_code=err.status)

    # Outermost (added last): the API key and the request count see every request, refused ones included.
    app.add_middleware(_Gate, api_key=cfg.api_key, metrics=metrics)

    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {cfg.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")

    async def chunks(prompt: str, params: SamplingParams, answer: _Answer):
        """Text deltas from Triton, recording the answer and the latency metrics as they arrive."""
        t0 = last = time.perf_counter()
        first = True
        metrics.in_flight.inc()
        stream = state["client"].stream_text(prompt, params)
        try:
            async for c in stream:
                now = time.perf_counter()
                if c.text:
                    (metrics.ttft if first else metrics.itl).observe(now - (t0 if first else last))
                    first, last = False, now
                answer.text += c.text
                answer.finish_reason = c.finish_reason or answer.finish_reason
                if c.prompt_tokens is not None:
                    answer.prompt_tokens = c.prompt_tokens
                if c.completion_tokens is not None:
                    answer.completion_tokens = c.completion_tokens
                if c.text:
                    yield c.text
        finally:
            await stream.aclose()  # closes the gRPC call: Triton cancels the request
            metrics.in_flight.dec()
            metrics.prompt_tokens.inc(answer.prompt_tokens)
            metrics.completion_tokens.inc(answer.completion_tokens)

    async def generate(request: Request, body: _Sampling, prompt: str, max_tokens: int | None, render):
        """Run one request; `render(kind, ...)` turns deltas and the end into the endpoint's objects."""
        check_model(body.model)
        try:
            params = body.sampling(max_tokens, cfg.default_max_tokens)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error") from None
        rid, created, answer = f"{uuid.uuid4().hex}", int(time.time()), _Answer()
        deltas = chunks(prompt, params, answer)
        if not body.stream:
            try:
                async for _ in _until_disconnected(request, deltas):
                    pass
            except Exception as e:
                raise api_error(e) from None
            return JSONResponse(render("whole", rid, created, answer))
        # Read the first delta before answering, so that a refused request gets its HTTP status.
        try:
            first = await anext(deltas, None)
        except Exception as e:
            await deltas.aclose()
            raise api_error(e) from None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def event(kind: str, text: str = "") -> list[str]:
            obj = render(kind, rid, created, answer, text)
            return [] if obj is None else [_sse(obj)]

        async def events():
            try:
                for ev in event("start") + (event("delta", first) if first is not None else []):
                    yield ev
                async for text in deltas:
                    for ev in event("delta", text):
                        yield ev
                for ev in event("end") + (event("usage") if include_usage else []):
                    yield ev
            except Exception as e:  # after the headers: the error travels in-band
                yield _sse(api_error(e).body())
            finally:
                await deltas.aclose()  # a vanished client cancels the Triton request here
            yield "data: [DONE]\n\n"

        return _ClosingStreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    streams = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                     "description": "the completion, or with stream=true its server-sent events"}}

    @app.post("/v1/chat/completions", responses=streams)
    async def chat_completions(request: Request, body: ChatRequest):
        return await generate(request, body, body.prompt(), body.max_completion_tokens or body.max_tokens,
                              lambda *a: _render_chat(cfg.model_name, *a))

    @app.post("/v1/completions", responses=streams)
    async def completions(request: Request, body: CompletionRequest):
        return await generate(request, body, body.prompt, body.max_tokens,
                              lambda *a: _render_completion(cfg.model_name, *a))

    @app.get("/v1/models")
    async def models():
        from openai.types import Model

        listing = [Model(id=cfg.model_name, created=0, object="model", owned_by="hermes-trtllm").model_dump()]
        return {"object": "list", "data": listing}

    @app.get("/health")
    async def health():
        ready = await state["client"].ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 429: "overloaded_error",
            503: "service_unavailable"}.get(status, "server_error" if status >= 500 else "invalid_request_error")


class _Gate:
    """The API key check and the request count by endpoint and status, as plain ASGI: a function middleware
    (Starlette's BaseHTTPMiddleware) would hide the client's disconnect from the endpoint, and a
    non-streaming request whose client left would then run to its end."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.api_key:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}"):
                e = ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                             code="invalid_api_key")
                self.metrics.requests.labels(path, "401").inc()
                return await JSONResponse(e.body(), status_code=401)(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


class _BodyLimit:
    """Refuse a request body over `max_bytes` with 413: by its Content-Length before reading it, or,
    without one, while reading it (at most `max_bytes` are held). uvicorn itself sets no limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(scope, send)
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send):
        e = ApiError(413, f"the request body is larger than {self.max_bytes} bytes", "invalid_request_error")
        await JSONResponse(e.body(), status_code=413)(scope, None, send)


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its event generator however the response ends. Under ASGI spec 2.4 Starlette stops at a
    failed send and leaves the generator to the garbage collector, and with it the Triton request."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _until_disconnected(request: Request, items):
    """Iterate `items`, stopping (and so cancelling it) as soon as the HTTP client goes away. The body has
    been read, so the next ASGI message is the disconnect: waiting for it sees a client leave at once
    (uvicorn's zero-timeout `Request.is_disconnected()` polls never saw it under load)."""
    it = items.__aiter__()
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        while True:
            nxt = asyncio.ensure_future(anext(it))
            await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
                raise ApiError(499, "the client disconnected", "cancelled")
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    finally:
        gone.cancel()
        await items.aclose()


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(obj) -> str:
    # exclude_unset: fields set to null on purpose (a chunk's finish_reason) stay, as OpenAI sends them.
    data = obj if isinstance(obj, dict) else obj.model_dump(exclude_unset=True)
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(answer: _Answer):
    from openai.types import CompletionUsage

    return CompletionUsage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                           total_tokens=answer.prompt_tokens + answer.completion_tokens)


def _render_chat(model: str, kind: str, rid: str, created: int, answer: _Answer, text: str = ""):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice
    from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta

    cid = f"chatcmpl-{rid}"
    if kind == "whole":
        msg = ChatCompletionMessage(role="assistant", content=answer.text)
        return ChatCompletion(id=cid, created=created, model=model, object="chat.completion", usage=_usage(answer),
                              choices=[Choice(index=0, message=msg, finish_reason=answer.finish_reason or "stop")]
                              ).model_dump(exclude_none=True)

    def chunk(delta: ChoiceDelta | None, finish=None, usage=None):
        choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(id=cid, created=created, model=model, object="chat.completion.chunk",
                                   choices=choices, usage=usage)

    if kind == "start":
        return chunk(ChoiceDelta(role="assistant", content=""))
    if kind == "delta":
        return chunk(ChoiceDelta(content=text))
    if kind == "end":
        return chunk(ChoiceDelta(), finish=answer.finish_reason or "stop")
    return chunk(None, usage=_usage(answer))


def _render_completion(model: str, kind: str, rid: str, created: int, answer: _Answer, text: str = ""):
    from openai.types import Completion, CompletionChoice

    if kind == "whole":
        choice = CompletionChoice(index=0, text=answer.text, finish_reason=answer.finish_reason or "stop")
        return Completion(id=f"cmpl-{rid}", created=created, model=model, object="text_completion",
                          choices=[choice], usage=_usage(answer)).model_dump(exclude_none=True)
    if kind == "start":
        return None  # completions streams have no role chunk
    # Stream chunks carry finish_reason null until the last one, which the SDK's response type (meant
    # for whole completions) does not allow: the same fields, written out.
    chunk = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model}
    if kind == "usage":
        return {**chunk, "choices": [], "usage": _usage(answer).model_dump()}
    finish = (answer.finish_reason or "stop") if kind == "end" else None
    return {**chunk, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
