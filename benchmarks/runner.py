"""Drive a deployment through the project's AsyncClient: one request function that never raises
(failures are recorded), a concurrency cap, optional Poisson arrivals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.metrics import Recorder, RequestOutput, calculate_metrics
from benchmarks.procstat import CpuWindow, ServerProcesses, total_us_per_token
from build_engine import UserError
from build_engine.manifest import DEMO_ARTIFACTS
from client import AsyncClient, Chunk, Client, Message


@dataclass(frozen=True)
class Workload:
    """What is sent: the prompts, the output length, the arrival process. Independent of where it goes."""
    num_prompts: int = 16
    input_words: int = 32
    output_len: int = 64
    request_rate: float | None = None  # requests/s; None = all at once (capped by the concurrency)
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1 = Poisson
    dataset: str | None = None  # ShareGPT-format JSON: prompts from each conversation's first human turn
    input_len: int | None = None  # exact prompt length in tokens (ChatML included); needs tokenizer
    tokenizer: str | None = None  # the served model's tokenizer folder
    warmup: int = 1
    seed: int = 0
    temperature: float = 0.0  # 0: greedy; sampling costs the engine more per token than an arg-max

    def __post_init__(self):
        # A wrong path would otherwise reach transformers, which takes it for a hub id ("Repo id must be ...").
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise UserError(f"the tokenizer folder {self.tokenizer} does not exist: a deployment's tokenizer is "
                            f"REPO/preprocessing/tokenizer (make demo: {DEMO_ARTIFACTS}/model_repository/preprocessing/"
                            "tokenizer)")

    def sampling(self) -> dict:
        """Every request's generation parameters, built here once for every transport and the engine alone:
        the output length is fixed (EOS ignored via min_tokens)."""
        return {"max_tokens": self.output_len, "min_tokens": self.output_len, "temperature": self.temperature}


@dataclass(frozen=True)
class Target:
    """Where it goes: a served deployment. (The engine alone is benchmarks.engine.EngineRunner.)"""
    url: str
    model: str = "tensorrt_llm_bls"  # or "ensemble"; with protocol openai, the served model id
    protocol: str = "grpc"  # or "http" (generate_stream, SSE), or "openai" (any OpenAI-compatible server)
    api_key: str | None = field(default=None, repr=False)  # openai: the server's key, if it wants one

    def describe(self) -> dict:
        """For results files: never the key."""
        return {"url": self.url, "model": self.model, "protocol": self.protocol}


def check_ready(target: Target, timeout_s: float = 5.0) -> None:
    """Before a sweep: a target that does not answer fails here, in one line naming the fix, rather than as a
    results file of failed requests."""
    problem = (_openai_problem if target.protocol == "openai" else _triton_problem)(target, timeout_s)
    if problem:
        raise UserError(problem)


def _triton_problem(target: Target, timeout_s: float) -> str | None:
    where = {"grpc": "its gRPC port (8001 by default)", "http": "its HTTP port (8000 by default)"}[target.protocol]
    if "://" in target.url and not target.url.startswith("dns:"):
        return f"--url {target.url}: Triton's addresses are HOST:PORT, without a scheme (e.g. 127.0.0.1:8001 for gRPC)"
    try:
        if target.protocol == "http":
            import tritonclient.http as tc

            client = tc.InferenceServerClient(target.url, connection_timeout=timeout_s, network_timeout=timeout_s)
            server_ready = client.is_server_ready()
        else:
            import tritonclient.grpc as tc

            client = tc.InferenceServerClient(target.url)
            server_ready = client.is_server_ready(client_timeout=timeout_s)
        model_ready = server_ready and client.is_model_ready(target.model)
        client.close()
    except Exception:  # noqa: BLE001 -- refused, unresolvable, misformatted: all mean "not a server here"
        server_ready = model_ready = False
    if not server_ready:
        return (f"no Triton server is ready at {target.url} ({target.protocol}): start one (make serve) or point "
                f"--url at {where}")
    if not model_ready:
        return f"the Triton server at {target.url} has no ready model {target.model!r}: --model bls or ensemble"
    return None


def _openai_problem(target: Target, timeout_s: float) -> str | None:
    import urllib.error
    import urllib.request

    url = target.url.rstrip("/") + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {target.api_key or 'unused'}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            models = [m.get("id") for m in json.loads(r.read()).get("data", [])]
    except urllib.error.HTTPError as e:
        if e.code == 401:
            return f"the server at {target.url} wants an API key: --api-key KEY (or $OPENAI_API_KEY)"
        return f"GET {url} answered {e.code}: point --url at the API's base (http://HOST:PORT/v1)"
    except (OSError, ValueError, AttributeError):
        return (f"no OpenAI-compatible server answers GET {url}: start one (make serve OPENAI_PORT=9000) or point "
                "--url at its base (http://HOST:PORT/v1)")
    if models and target.model not in models:
        return f"the server at {target.url} serves {', '.join(map(str, models))}, not {target.model!r}: --model NAME"
    return None


def result(target: dict, workload: Workload, concurrency: int, outputs: list[RequestOutput], duration: float,
           slo_ms: dict | None = None, **extra) -> dict:
    """One run's results record, the same for a served target and the engine alone."""
    return {"target": target, "workload": asdict(workload), "concurrency": concurrency, **extra,
            "metrics": calculate_metrics(outputs, duration, slo_ms), "requests": [asdict(o) for o in outputs]}


def sharegpt_prompts(path: str, n: int, seed: int) -> list[str]:
    data = json.loads(Path(path).read_text())
    prompts = []
    for item in data:
        turns = item.get("conversations") or []
        first = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        if first:
            prompts.append(first)
    if not prompts:
        raise ValueError(f"{path} has no ShareGPT conversations with a human turn")
    random.Random(seed).shuffle(prompts)
    return (prompts * (n // len(prompts) + 1))[:n]


def synthetic_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ["system", "latency", "token", "engine", "cache", "server", "stream", "model", "batch", "kernel"]
    return [f"Request {i}: " + " ".join(rng.choice(vocab) for _ in range(words)) + ". Continue the text."
            for i in range(n)]


async def record(chunks, clock=time.perf_counter) -> RequestOutput:
    """One request's RequestOutput from its async stream of chunks; never raises (failures are counted)."""
    rec = Recorder(clock)
    try:
        async for chunk in chunks:
            rec.chunk(chunk)
        return rec.done()
    except Exception as e:
        return rec.failed(e)


def record_sync(chunks, clock=time.perf_counter) -> RequestOutput:
    """The same for a blocking iterator of chunks (the HTTP transport, the engine alone)."""
    rec = Recorder(clock)
    try:
        for chunk in chunks:
            rec.chunk(chunk)
        return rec.done()
    except Exception as e:
        return rec.failed(e)


async def one_request(client: AsyncClient, prompt: str, sampling: dict, clock=time.perf_counter) -> RequestOutput:
    return await record(client.stream([Message("user", prompt)], **sampling), clock)


async def openai_chunks(client, model: str, prompt: str, sampling: dict):
    """An OpenAI-compatible server's chat stream as Chunks; token counts from `usage` when it is sent.
    `min_tokens` (vLLM's and this project's extension) fixes the output length."""
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=sampling["max_tokens"],
        temperature=sampling["temperature"], stream=True, stream_options={"include_usage": True},
        extra_body={"min_tokens": sampling["min_tokens"]})
    async for c in stream:
        for choice in c.choices:
            yield Chunk(choice.delta.content or "", choice.finish_reason)
        if c.usage is not None:
            yield Chunk("", None, c.usage.prompt_tokens, c.usage.completion_tokens)


def one_request_sync(client: Client, prompt: str, sampling: dict, clock=time.perf_counter) -> RequestOutput:
    """The same over the blocking client (the HTTP transport)."""
    return record_sync(client.stream([Message("user", prompt)], **sampling), clock)


def _gaps(w: Workload, rng: random.Random):
    """Inter-arrival times: gamma(shape=burstiness, mean=1/rate); burstiness 1 is a Poisson process."""
    while True:
        yield rng.gammavariate(w.burstiness, 1.0 / (w.request_rate * w.burstiness)) if w.request_rate else 0.0


def exact_length_prompts(tokenizer, n: int, input_len: int, seed: int) -> list[str]:
    """User messages whose ChatML prompt (as the server tokenizes it) is exactly `input_len` tokens."""
    from client import format_chatml

    def length(words):
        return len(tokenizer(format_chatml([Message("user", " ".join(words))]))["input_ids"])

    rng = random.Random(seed)
    vocab = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away"]
    out = []
    for i in range(n):
        words = [str(i)]
        while length(words) < input_len:
            words.append(rng.choice(vocab))
        while length(words) > input_len and len(words) > 1:
            words.pop()
        if length(words) != input_len:
            raise ValueError(f"cannot build a prompt of exactly {input_len} tokens (template alone is longer?)")
        out.append(" ".join(words))
    return out


def prompts_for(w: Workload) -> list[str]:
    if w.dataset:
        return sharegpt_prompts(w.dataset, w.num_prompts, w.seed)
    if w.input_len:
        if not w.tokenizer:
            raise ValueError("--input-len needs --tokenizer (the served model's tokenizer folder)")
        try:
            from transformers import AutoTokenizer  # not in [bench]: the [build] extra has it
        except ImportError:
            raise ValueError("--input-len needs transformers: pip install 'hermes-trtllm[build]'") from None

        return exact_length_prompts(AutoTokenizer.from_pretrained(w.tokenizer), w.num_prompts, w.input_len, w.seed)
    return synthetic_prompts(w.num_prompts, w.input_words, w.seed)


async def run(target: Target, w: Workload, concurrency: int,
              window: contextlib.AbstractContextManager | None = None) -> tuple[list[RequestOutput], float]:
    """The workload's requests (after its warmup) and the timed window's length; `window` (e.g. a
    procstat.CpuWindow) is entered around the timed window only."""
    prompts = prompts_for(w)
    gaps = _gaps(w, random.Random(w.seed))
    sem = asyncio.Semaphore(concurrency)
    if target.protocol == "http":
        sync = Client(target.url, model=target.model, protocol="http")
        call = lambda p: asyncio.to_thread(one_request_sync, sync, p, w.sampling())  # noqa: E731
        client = None
    elif target.protocol == "openai":
        import openai

        client = openai.AsyncOpenAI(base_url=target.url, api_key=target.api_key or "unused", max_retries=0)
        call = lambda p: record(openai_chunks(client, target.model, p, w.sampling()))  # noqa: E731
    else:
        client = AsyncClient(target.url, model=target.model)
        call = lambda p: one_request(client, p, w.sampling())  # noqa: E731
    try:
        for p in prompts[: w.warmup]:
            await call(p)

        async def limited(p):
            async with sem:
                return await call(p)

        with window or contextlib.nullcontext():
            t0 = time.perf_counter()
            tasks = []
            for p in prompts:
                tasks.append(asyncio.create_task(limited(p)))
                await asyncio.sleep(next(gaps))
            outputs = await asyncio.gather(*tasks)
            duration_s = time.perf_counter() - t0
        return list(outputs), duration_s
    finally:
        if client is not None:
            await client.close()


def measure(target: Target, w: Workload, concurrency: int, slo_ms: dict | None = None,
            processes: ServerProcesses | None = None, missing: str | None = None, **extra) -> dict:
    """One run's results record with the server's CPU cost per streamed token over its timed window:
    `server_cpu` per process (procstat.cpu_per_token) and `server_cpu_total_us_per_token`, or
    `server_cpu` None and `server_cpu_missing` (why) when there are no local server processes to read."""
    window = CpuWindow(processes) if processes is not None else None
    outputs, duration_s = asyncio.run(run(target, w, concurrency, window))
    r = result(target.describe(), w, concurrency, outputs, duration_s, slo_ms, **extra)
    if window is None:
        cpu = {"server_cpu": None, "server_cpu_missing": missing or "no server processes given"}
    else:
        per = window.per_token(r["metrics"]["total_output_tokens"])
        cpu = {"server_cpu": per, "server_cpu_total_us_per_token": total_us_per_token(per)}
        if processes.missing:  # found in part (a frontend that nothing serves): say what is not counted
            cpu["server_cpu_missing"] = "; ".join(processes.missing)
    requests = r.pop("requests")  # kept last: the raw per-request arrays are the bulk of the file
    return {**r, **cpu, "requests": requests}


def run_sweep(target: Target, w: Workload, concurrencies: list[int], slo_ms: dict | None = None,
              processes: ServerProcesses | None = None, missing: str | None = None) -> list[dict]:
    return [measure(target, w, c, slo_ms, processes, missing) for c in concurrencies]
