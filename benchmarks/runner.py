"""Drive a deployment through the project's AsyncClient: one request function that never raises
(failures are recorded), a concurrency cap, optional Poisson arrivals."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass

from benchmarks.metrics import ChunkTimer, RequestOutput, calculate_metrics
from client import AsyncClient, Message


@dataclass(frozen=True)
class RunConfig:
    url: str
    model: str = "tensorrt_llm_bls"
    num_prompts: int = 16
    input_words: int = 32
    output_len: int = 64
    concurrency: int = 1
    request_rate: float | None = None  # requests/s, Poisson; None = all at once (capped by concurrency)
    warmup: int = 1
    seed: int = 0


def synthetic_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ["system", "latency", "token", "engine", "cache", "server", "stream", "model", "batch", "kernel"]
    return [f"Request {i}: " + " ".join(rng.choice(vocab) for _ in range(words)) + ". Continue the text."
            for i in range(n)]


async def one_request(client: AsyncClient, prompt: str, output_len: int, clock=time.perf_counter) -> RequestOutput:
    out = RequestOutput()
    timer = ChunkTimer(out, clock())
    try:
        async for chunk in client.stream([Message("user", prompt)], max_tokens=output_len, min_tokens=output_len):
            timer.observe(clock(), bool(chunk.text))
            if chunk.completion_tokens is not None:
                out.output_tokens = chunk.completion_tokens
            if chunk.prompt_tokens is not None:
                out.prompt_tokens = chunk.prompt_tokens
        timer.finish()
    except Exception as e:  # counted, never lost
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run(cfg: RunConfig) -> tuple[list[RequestOutput], float]:
    prompts = synthetic_prompts(cfg.num_prompts, cfg.input_words, cfg.seed)
    rng = random.Random(cfg.seed)
    async with AsyncClient(cfg.url, model=cfg.model) as client:
        for p in prompts[: cfg.warmup]:
            await one_request(client, p, cfg.output_len)
        sem = asyncio.Semaphore(cfg.concurrency)

        async def limited(p):
            async with sem:
                return await one_request(client, p, cfg.output_len)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if cfg.request_rate:
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        outputs = await asyncio.gather(*tasks)
        return list(outputs), time.perf_counter() - t0


def run_sweep(base: RunConfig, concurrencies: list[int], slo_ms: dict | None = None) -> list[dict]:
    results = []
    for c in concurrencies:
        cfg = RunConfig(**{**asdict(base), "concurrency": c})
        outputs, duration = asyncio.run(run(cfg))
        results.append({"config": asdict(cfg), "metrics": calculate_metrics(outputs, duration, slo_ms),
                        "requests": [asdict(o) for o in outputs]})
    return results
