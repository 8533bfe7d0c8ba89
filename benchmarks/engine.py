"""The same workload on the CPU engine alone (no server, no gRPC), so that serving overhead =
served - engine-only is reported per token (ITL) and per request (TTFT)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from benchmarks.metrics import RequestOutput
from benchmarks.runner import Workload, prompts_for, record_sync, result
from client import Chunk, Message, format_chatml


def one_request(engine, ids: list[int], sampling: dict, clock=time.perf_counter) -> RequestOutput:
    from build_engine.cpu import Sampling

    def chunks():
        n_tokens = 0
        for step in engine.submit(ids, Sampling(**sampling)):
            if step.error:
                raise RuntimeError(step.error)
            n_tokens += step.token_id is not None
            yield Chunk(step.text, prompt_tokens=len(ids), completion_tokens=n_tokens)

    return record_sync(chunks(), clock)


class EngineRunner:
    """The CPU engine loaded once, with the workload's prompts tokenized as the server would."""

    def __init__(self, engine_dir: Path, workload: Workload):
        from build_engine.cpu import CpuEngine

        self.engine_dir, self.workload = Path(engine_dir), workload
        self.engine = CpuEngine(engine_dir)
        tok = self.engine.tokenizer
        self.prompts = [tok(format_chatml([Message("user", p)]))["input_ids"] for p in prompts_for(workload)]

    def warm_up(self) -> None:
        for ids in self.prompts[: self.workload.warmup]:
            one_request(self.engine, ids, self.workload.sampling())

    def run(self, concurrency: int) -> tuple[list[RequestOutput], float]:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            outputs = list(pool.map(lambda ids: one_request(self.engine, ids, self.workload.sampling()),
                                    self.prompts))
        return outputs, time.perf_counter() - t0

    def target(self) -> dict:
        return {"engine": str(self.engine_dir)}

    def close(self) -> None:
        self.engine.close()


def run_sweep(engine_dir: Path, workload: Workload, concurrencies: list[int]) -> list[dict]:
    runner = EngineRunner(engine_dir, workload)
    try:
        runner.warm_up()
        return [result(runner.target(), workload, c, *runner.run(c)) for c in concurrencies]
    finally:
        runner.close()


def served_vs_engine(repo: Path, engine_dir: Path, workload: Workload, concurrencies: list[int],
                     rounds: int) -> tuple[list[dict], list[dict]]:
    """The repository served by Triton (gRPC streaming, tensorrt_llm_bls) and its engine alone, on one
    workload, interleaved round by round (served c1, engine c1, served c4, ...) so that drift hits both
    alike: (served results, engine-only results), one per concurrency, each over all rounds."""
    import asyncio

    from benchmarks.runner import Target, run
    from model_repo.server import TritonServer

    measured = replace(workload, warmup=0)  # both are warmed up before the first round
    runs = {(kind, c): ([], 0.0) for kind in ("served", "engine") for c in concurrencies}
    alone = EngineRunner(engine_dir, workload)
    try:
        with TritonServer(repo) as server:
            target = Target(server.grpc_url)
            asyncio.run(run(target, replace(workload, num_prompts=1), 1))
            alone.warm_up()
            for _ in range(rounds):
                for c in concurrencies:
                    for kind, measure in (("served", lambda: asyncio.run(run(target, measured, c))),
                                          ("engine", lambda: alone.run(c))):
                        outputs, duration = measure()
                        prev = runs[kind, c]
                        runs[kind, c] = (prev[0] + outputs, prev[1] + duration)
    finally:
        alone.close()
    return ([result(target.describe(), measured, c, *runs["served", c], rounds=rounds) for c in concurrencies],
            [result(alone.target(), measured, c, *runs["engine", c], rounds=rounds) for c in concurrencies])
