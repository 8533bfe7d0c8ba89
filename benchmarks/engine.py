"""The same workload on the CPU engine alone (no server, no gRPC), so that serving overhead =
served - engine-only is reported per token (ITL) and per request (TTFT)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from benchmarks.metrics import RequestOutput, calculate_metrics
from benchmarks.runner import RunConfig, prompts_for, record_sync
from client import Chunk, Message, format_chatml


def one_request(engine, ids: list[int], output_len: int, clock=time.perf_counter) -> RequestOutput:
    from build_engine.cpu import Sampling

    def chunks():
        n_tokens = 0
        for step in engine.submit(ids, Sampling(max_tokens=output_len, min_tokens=output_len)):
            if step.error:
                raise RuntimeError(step.error)
            n_tokens += step.token_id is not None
            yield Chunk(step.text, prompt_tokens=len(ids), completion_tokens=n_tokens)

    return record_sync(chunks(), clock)


def run_sweep(engine_dir: Path, base: RunConfig, concurrencies: list[int]) -> list[dict]:
    from build_engine.cpu import CpuEngine

    engine = CpuEngine(engine_dir)
    tok = engine.tokenizer
    prompts = [tok(format_chatml([Message("user", p)]))["input_ids"]
               for p in prompts_for(base)]
    results = []
    try:
        for ids in prompts[: base.warmup]:
            one_request(engine, ids, base.output_len)
        for c in concurrencies:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                outputs = list(pool.map(lambda ids: one_request(engine, ids, base.output_len), prompts))
            duration = time.perf_counter() - t0
            cfg = {**asdict(base), "concurrency": c, "url": f"engine:{engine_dir}"}
            results.append({"config": cfg, "metrics": calculate_metrics(outputs, duration),
                            "requests": [asdict(o) for o in outputs]})
    finally:
        engine.close()
    return results
