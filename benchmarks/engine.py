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


class EngineRunner:
    """The CPU engine loaded once, with the workload's prompts tokenized as the server would."""

    def __init__(self, engine_dir: Path, base: RunConfig):
        from build_engine.cpu import CpuEngine

        self.engine_dir, self.base = Path(engine_dir), base
        self.engine = CpuEngine(engine_dir)
        tok = self.engine.tokenizer
        self.prompts = [tok(format_chatml([Message("user", p)]))["input_ids"] for p in prompts_for(base)]

    def warm_up(self) -> None:
        for ids in self.prompts[: self.base.warmup]:
            one_request(self.engine, ids, self.base.output_len)

    def run(self, concurrency: int) -> tuple[list[RequestOutput], float]:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            outputs = list(pool.map(lambda ids: one_request(self.engine, ids, self.base.output_len), self.prompts))
        return outputs, time.perf_counter() - t0

    def config(self, concurrency: int) -> dict:
        return {**asdict(self.base), "concurrency": concurrency, "url": f"engine:{self.engine_dir}"}

    def close(self) -> None:
        self.engine.close()


def result(config: dict, outputs: list[RequestOutput], duration: float) -> dict:
    return {"config": config, "metrics": calculate_metrics(outputs, duration), "requests": [asdict(o) for o in outputs]}


def run_sweep(engine_dir: Path, base: RunConfig, concurrencies: list[int]) -> list[dict]:
    runner = EngineRunner(engine_dir, base)
    try:
        runner.warm_up()
        return [result(runner.config(c), *runner.run(c)) for c in concurrencies]
    finally:
        runner.close()
