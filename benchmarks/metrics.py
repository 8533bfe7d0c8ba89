"""Pure metric computation: RequestOutput records in, one flat dict of metrics out (no I/O).

TTFT = first non-empty chunk - send; ITL = every gap between chunks after the first;
TPOT = (E2E - TTFT) / (output_tokens - 1); output tok/s = sum(output tokens) / duration;
goodput = requests meeting every SLO / duration. An empty series is reported as None ("missing"),
never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestOutput:
    success: bool = False
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


class ChunkTimer:
    """Turns chunk arrival times into TTFT, ITL and E2E for one request (every transport uses it)."""

    def __init__(self, out: RequestOutput, t0: float):
        self.out, self.t0, self.last = out, t0, t0

    def observe(self, now: float, has_text: bool) -> None:
        if not has_text:
            return
        if self.out.ttft_s is None:
            self.out.ttft_s = now - self.t0
        else:
            self.out.itl_s.append(now - self.last)
        self.last = now

    def finish(self) -> None:
        self.out.latency_s = self.last - self.t0
        self.out.success = self.out.ttft_s is not None
        if not self.out.success and self.out.error is None:
            self.out.error = "no output"


class Recorder:
    """One request's RequestOutput from the chunks of its stream, however they arrive (async client,
    blocking client, OpenAI server, engine alone): one place counts tokens and times chunks. A chunk
    is anything with `text` and optional `prompt_tokens`/`completion_tokens`; a server's own token
    count wins over counting non-empty chunks."""

    def __init__(self, clock):
        self.clock, self.out = clock, RequestOutput()
        self.timer = ChunkTimer(self.out, clock())
        self.n_text_chunks = 0

    def chunk(self, chunk) -> None:
        self.timer.observe(self.clock(), bool(chunk.text))
        self.n_text_chunks += bool(chunk.text)
        completion = getattr(chunk, "completion_tokens", None)
        self.out.output_tokens = completion if completion is not None else self.n_text_chunks
        if getattr(chunk, "prompt_tokens", None) is not None:
            self.out.prompt_tokens = chunk.prompt_tokens

    def done(self) -> RequestOutput:
        self.timer.finish()
        return self.out

    def failed(self, e: Exception) -> RequestOutput:
        self.out.error = f"{type(e).__name__}: {e}"  # counted, never lost
        return self.out


def _stats(name: str, values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {f"mean_{name}_ms": None, f"std_{name}_ms": None,
                **{f"p{p}_{name}_ms" if p != 50 else f"median_{name}_ms": None for p in PERCENTILES}}
    ms = np.asarray(values_s) * 1000
    out = {f"mean_{name}_ms": float(ms.mean()), f"std_{name}_ms": float(ms.std())}
    for p in PERCENTILES:
        out[f"median_{name}_ms" if p == 50 else f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def calculate_metrics(outputs: list[RequestOutput], duration_s: float,
                      slo_ms: dict[str, float] | None = None) -> dict:
    ok = [o for o in outputs if o.success]
    out_tokens = sum(o.output_tokens for o in ok)
    metrics = {
        "completed": len(ok), "failed": len(outputs) - len(ok), "duration_s": duration_s,
        "total_input_tokens": sum(o.prompt_tokens for o in ok), "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else None,
        **_stats("ttft", [o.ttft_s for o in ok if o.ttft_s is not None]),
        **_stats("tpot", [t for o in ok if (t := o.tpot_s) is not None]),
        **_stats("itl", [g for o in ok for g in o.itl_s]),
        **_stats("e2el", [o.latency_s for o in ok if o.latency_s is not None]),
    }
    if slo_ms:
        good = 0
        for o in ok:
            have = {"ttft": o.ttft_s, "tpot": o.tpot_s, "e2el": o.latency_s}
            if all(have.get(k) is not None and have[k] * 1000 <= v for k, v in slo_ms.items()):
                good += 1
        metrics["goodput"] = good / duration_s if duration_s > 0 else None
    return metrics
