"""Soak: hold a served deployment under mixed load for a while and count what went wrong.

`concurrency` workers send requests back to back over gRPC (the project's AsyncClient), HTTP (its
blocking client) and the OpenAI frontend (the official `openai` client), picking each request's kind:
- greedy: a fixed prompt with a random max_tokens; its text must equal the prompt's solo run
  (the engine must be batch-invariant: accuracy level 1),
- stop: the same with a stop string taken from the solo text; the reply must be the text before it,
- early_close: closed after a few chunks; what arrived must be a prefix of the solo text,
- invalid: a request the server must refuse with a clear bad-request error.
Beside them, a client process is started every `vanish_every_s` and killed (SIGKILL) mid-stream.

Outcomes: ok, garbled (text differs from the solo run), lost (no final response within the
deadline), error:<class> (anything else). For every closed or killed gRPC stream, the tokens the
engine generated after the close come from the server's log ("request <id>#n cancelled after N
tokens") minus what the client had received. The server's RSS, open files and /dev/shm entries are
sampled every `sample_every_s`; readiness and one normal request are checked after the run.
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPTS = ["Name three colours.", "What is the capital of France?", "Write one sentence about the sea.",
           "Count from one to ten.", "Give me a short tip for sleeping well.", "What do bees make?",
           "Describe a cat in a few words.", "Say hello in three languages."]
MAX_TOKENS = (8, 16, 32, 64)
DEFAULT_MIX = {"greedy": 0.5, "stop": 0.15, "early_close": 0.2, "invalid": 0.15}
CANCELLED = re.compile(r"request (\S+)#\d+\S* cancelled after (\d+) tokens")  # the BLS's engine request ids

VANISHING_CLIENT = textwrap.dedent("""
    import sys
    from client import Client, Message
    with Client(sys.argv[1], retries=0) as c:
        for chunk in c.stream([Message("user", sys.argv[2])], max_tokens=64, min_tokens=64, request_id=sys.argv[3]):
            print(chunk.completion_tokens, flush=True)
""")


@dataclass
class SoakConfig:
    concurrency: int = 16
    duration_s: float = 1800.0
    transports: tuple[str, ...] = ("grpc", "http", "openai")
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    vanish_every_s: float = 10.0
    deadline_s: float = 120.0
    sample_every_s: float = 1.0
    seed: int = 0


@dataclass
class Target:
    """A served deployment: Triton's gRPC and HTTP addresses, optionally the OpenAI frontend; the server
    object gives its process (for RSS) and its log (for cancellations)."""
    server: object  # model_repo.server.TritonServer
    openai_url: str | None = None
    openai_model: str | None = None


@dataclass
class Record:
    kind: str
    transport: str
    outcome: str
    started_s: float
    elapsed_s: float
    request_id: str | None = None
    tokens_received: int = 0
    detail: str = ""


class Soak:
    def __init__(self, target: Target, cfg: SoakConfig):
        self.t, self.cfg = target, cfg
        self.rng = random.Random(cfg.seed)
        self.records: list[Record] = []
        self.samples: list[dict] = []
        self.in_flight = 0
        self.solo: dict[tuple[str, int], str] = {}
        self.t0 = 0.0
        self._ids = 0
        # Engine tokens per cancelled request id, read off the server's log as it grows: the server keeps
        # only its last 5,000 lines, which a long soak outruns.
        self.freed: dict[str, int] = {}
        self._log_pos = target.server.log_mark()
        self.log_lines_missed = 0

    # -- references ---------------------------------------------------------------------------
    async def references(self, grpc) -> None:
        """Each prompt's greedy text at every max_tokens, one request at a time."""
        for p in PROMPTS:
            for m in MAX_TOKENS:
                self.solo[p, m] = (await grpc.complete(p, max_tokens=m)).text

    def stop_case(self, prompt: str) -> tuple[str, str] | None:
        """(stop string, expected reply) from the solo text: a word in its middle."""
        text = self.solo[prompt, 64]
        words = [w for w in re.findall(r"[A-Za-z]{4,}", text)]
        if len(words) < 3:
            return None
        stop = words[len(words) // 2]
        return stop, text[: text.find(stop)]

    # -- one request ----------------------------------------------------------------------------
    def _rid(self) -> str:
        self._ids += 1
        return f"soak-{self._ids}"

    async def one(self, clients: dict) -> Record:
        cfg = self.cfg
        kind = self.rng.choices(list(cfg.mix), weights=list(cfg.mix.values()))[0]
        transport = self.rng.choice(cfg.transports)
        prompt = self.rng.choice(PROMPTS)
        max_tokens = self.rng.choice(MAX_TOKENS)
        stop, expected = None, self.solo[prompt, max_tokens]
        if kind == "stop":
            case = self.stop_case(prompt)
            if case is None:
                kind = "greedy"
            else:
                (stop, expected), max_tokens = case, 64
        close_after = None
        if kind == "early_close":  # closed mid-generation: well before its last token
            close_after, max_tokens = self.rng.randint(1, 4), 64
            expected = self.solo[prompt, max_tokens]
        rid = self._rid()
        start = time.monotonic()
        rec = Record(kind, transport, "ok", start - self.t0, 0.0, rid if transport == "grpc" else None)
        self.in_flight += 1
        try:
            if kind == "invalid":
                await asyncio.wait_for(self.invalid(clients, transport), cfg.deadline_s)
            else:
                text, tokens = await asyncio.wait_for(
                    self.stream(clients, transport, prompt, max_tokens, stop, close_after, rid), cfg.deadline_s)
                rec.tokens_received = tokens
                ok = expected.startswith(text) if close_after else text == expected
                if not ok:
                    rec.outcome, rec.detail = "garbled", f"got {text[:80]!r}, expected {expected[:80]!r}"
        except asyncio.TimeoutError:
            rec.outcome = "lost"
        except Exception as e:  # noqa: BLE001 -- every other failure is counted by its class
            rec.outcome, rec.detail = f"error:{type(e).__name__}", str(e)[:300]
        finally:
            self.in_flight -= 1
        rec.elapsed_s = time.monotonic() - start
        return rec

    async def stream(self, clients, transport, prompt, max_tokens, stop, close_after, rid) -> tuple[str, int]:
        """The text received (all of it, or the first `close_after` chunks) and the tokens it carried."""
        from client import Message

        stops = (stop,) if stop else ()
        pieces, tokens = [], 0
        if transport == "grpc":
            it = clients["grpc"].stream([Message("user", prompt)], max_tokens=max_tokens, stop=stops, request_id=rid)
            try:
                async for c in it:
                    pieces.append(c.text)
                    tokens = c.completion_tokens or tokens
                    if close_after and len(pieces) >= close_after:
                        break
            finally:
                await it.aclose()
        elif transport == "http":
            def blocking():
                got, n = [], 0
                with clients["http"].stream([Message("user", prompt)], max_tokens=max_tokens, stop=stops) as s:
                    for c in s:
                        got.append(c.text)
                        n = c.completion_tokens or n
                        if close_after and len(got) >= close_after:
                            break
                return got, n
            pieces, tokens = await asyncio.to_thread(blocking)
        else:
            s = await clients["openai"].chat.completions.create(
                model=self.t.openai_model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                stop=list(stops) or None, stream=True)
            try:
                async for c in s:
                    if c.choices and c.choices[0].delta.content:
                        pieces.append(c.choices[0].delta.content)
                        if close_after and len(pieces) >= close_after:
                            break
            finally:
                await s.close()
        return "".join(pieces), tokens

    async def invalid(self, clients, transport) -> None:
        """A request the server must refuse as a bad request; raises if it does not."""
        import openai

        from client import BadRequestError
        from client.client import request_fields
        from client.types import SamplingParams

        case = self.rng.choice(["empty prompt", "max_tokens 0", "top_p 2", "over-long prompt"])
        fields = request_fields("x" * 40000 if case == "over-long prompt" else ("" if case == "empty prompt" else "hi"),
                                SamplingParams(max_tokens=4))
        if case == "max_tokens 0":
            fields["max_tokens"] = ("INT32", 0)
        if case == "top_p 2":
            fields["top_p"] = ("FP32", 2.0)
        if transport == "openai":
            body = {"max_tokens": 0} if case == "max_tokens 0" else {"top_p": 2} if case == "top_p 2" else {}
            content = "x " * 30000 if case == "over-long prompt" else "hi"
            messages = [] if case == "empty prompt" else [{"role": "user", "content": content}]
            try:
                await clients["openai"].chat.completions.create(
                    model=self.t.openai_model, messages=messages, **({"max_tokens": 4} | body))
            except openai.BadRequestError:
                return
            raise AssertionError(f"{case}: answered instead of refused")
        try:
            await asyncio.to_thread(_raw_call, self.t.server, transport, fields, self.cfg.deadline_s)
        except BadRequestError:
            return
        raise AssertionError(f"{case}: answered instead of refused")

    # -- background ---------------------------------------------------------------------------
    async def vanishing_clients(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            rid = self._rid()
            start = time.monotonic()
            rec = Record("vanish", "grpc", "ok", start - self.t0, 0.0, rid)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", VANISHING_CLIENT, self.t.server.grpc_url, self.rng.choice(PROMPTS), rid,
                stdout=subprocess.PIPE)
            want = self.rng.randint(2, 6)
            try:
                lines = 0
                while lines < want:
                    line = await asyncio.wait_for(proc.stdout.readline(), self.cfg.deadline_s)
                    if not line:
                        break
                    lines += 1
                    rec.tokens_received = int(line)
                if lines < want:
                    rec.outcome = "error:ClientExited"
            except asyncio.TimeoutError:
                rec.outcome = "lost"
            finally:
                if proc.returncode is None:
                    try:
                        proc.kill()
                    except ProcessLookupError:  # it ended on its own meanwhile
                        pass
                await proc.wait()
            rec.elapsed_s = time.monotonic() - start
            self.records.append(rec)
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.vanish_every_s)
            except asyncio.TimeoutError:
                pass

    def read_log(self) -> None:
        server = self.t.server
        end = server.log_mark()
        lines = server.logs_since(self._log_pos)
        self.log_lines_missed += (end - self._log_pos) - len(lines)
        self._log_pos = end
        self.freed.update((m.group(1), int(m.group(2))) for line in lines if (m := CANCELLED.search(line)))

    async def sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.read_log()
            self.samples.append({"t_s": round(time.monotonic() - self.t0, 2), "in_flight": self.in_flight,
                                 **server_usage(self.t.server)})
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.sample_every_s)
            except asyncio.TimeoutError:
                pass

    async def worker(self, clients, end: float) -> None:
        while time.monotonic() < end:
            self.records.append(await self.one(clients))

    async def main(self) -> dict:
        import openai

        from client import AsyncClient, Client

        deadline = self.cfg.deadline_s
        grpc = AsyncClient(self.t.server.grpc_url, retries=0, timeout_s=deadline)
        clients = {"grpc": grpc, "http": Client(self.t.server.http_url, protocol="http", retries=0, timeout_s=deadline)}
        if "openai" in self.cfg.transports:
            clients["openai"] = openai.AsyncOpenAI(base_url=self.t.openai_url, api_key="unused", max_retries=0,
                                                   timeout=self.cfg.deadline_s)
        await self.references(grpc)
        self.t0 = time.monotonic()
        stop = asyncio.Event()
        background = [asyncio.create_task(self.sampler(stop))]
        if self.cfg.vanish_every_s > 0:
            background.append(asyncio.create_task(self.vanishing_clients(stop)))
        end = self.t0 + self.cfg.duration_s
        await asyncio.gather(*(self.worker(clients, end) for _ in range(self.cfg.concurrency)))
        stop.set()
        await asyncio.gather(*background)
        wall = time.monotonic() - self.t0
        await asyncio.sleep(1.0)  # cancellations still landing in the log
        self.samples.append({"t_s": round(time.monotonic() - self.t0, 2), "in_flight": 0,
                             **server_usage(self.t.server)})
        ready = await grpc.ready()
        try:
            after = (await grpc.complete(PROMPTS[1], max_tokens=16)).text == self.solo[PROMPTS[1], 16]
        except Exception:  # noqa: BLE001 -- reported as not served
            after = False
        await grpc.close()
        return self.report(wall, ready, after)

    # -- report ---------------------------------------------------------------------------------
    def report(self, wall: float, ready: bool, served_after: bool, stuck: int = 0) -> dict:
        """`stuck`: requests still in flight when the run was cut off (counted as lost)."""
        self.read_log()
        freed = self.freed
        closed = [r for r in self.records if r.kind in ("early_close", "vanish") and r.request_id and r.outcome == "ok"]
        after = [freed[r.request_id] - r.tokens_received for r in closed if r.request_id in freed]
        outcomes = collections.Counter(r.outcome for r in self.records)
        by_kind = {k: dict(collections.Counter(r.outcome for r in self.records if r.kind == k))
                   for k in sorted({r.kind for r in self.records})}
        rss = [s["rss_mib"] for s in self.samples]
        return {
            "config": asdict(self.cfg), "wall_s": round(wall, 1), "requests": len(self.records),
            "completed": outcomes.get("ok", 0), "lost": outcomes.get("lost", 0) + stuck, "stuck": stuck,
            "garbled": outcomes.get("garbled", 0),
            "failed": {k: v for k, v in outcomes.items() if k.startswith("error:")},
            "by_kind": by_kind, "by_transport": dict(collections.Counter(r.transport for r in self.records)),
            "failures": [asdict(r) for r in self.records if r.outcome != "ok"][:50],
            "cancel_to_free_tokens": {
                "closed_streams": len(closed), "observed": len(after),
                "log_lines_missed": self.log_lines_missed,
                "median": statistics.median(after) if after else None,
                "p95": sorted(after)[int(0.95 * (len(after) - 1))] if after else None,
                "max": max(after) if after else None},
            "server": {"rss_mib_start": rss[0], "rss_mib_end": rss[-1], "rss_mib_max": max(rss),
                       "open_files_start": self.samples[0]["open_files"], "open_files_end": self.samples[-1]["open_files"],
                       "shm_start": self.samples[0]["shm"], "shm_end": self.samples[-1]["shm"]},
            "ready_after": ready, "served_after": served_after,
            "samples": self.samples,
        }


def _raw_call(server, transport: str, fields: dict, timeout_s: float) -> None:
    """One request built from raw fields (past the client's own pre-flight checks) over gRPC or HTTP,
    read to its end; raises the client's error for a refusal."""
    from client import Client
    from client.client import Stream, _GrpcSource, _HttpSource

    c = Client(server.grpc_url if transport == "grpc" else server.http_url, protocol=transport, retries=0,
               timeout_s=timeout_s)
    source = _GrpcSource if transport == "grpc" else _HttpSource
    try:
        for _ in Stream(lambda: source(c, fields, "soak-invalid")):
            pass
    finally:
        c.close()


def server_usage(server) -> dict:
    """RSS and open files of the server's process tree (tritonserver and its model stubs), /dev/shm entries."""
    import psutil

    rss = files = 0
    try:
        root = psutil.Process(server.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
                files += p.num_fds()
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return {"rss_mib": round(rss / 2**20, 1), "open_files": files, "shm": len(list(Path("/dev/shm").iterdir())),
            "engine_active": engine_active(server)}


def engine_active(server) -> float | None:
    """Requests the engine holds (nv_trt_llm_request_metrics{request_type="active"}), None if not exposed."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{server.host}:{server.ports.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return next((s.value for fam in text_string_to_metric_families(text) if fam.name == "nv_trt_llm_request_metrics"
                 for s in fam.samples if s.labels.get("request_type") == "active"), None)


def run(target: Target, cfg: SoakConfig) -> dict:
    """The soak, bounded: a request that hangs past its deadline in a way the deadline cannot cut
    (a stuck cancellation) must not hang the harness too; the run then ends with what it has."""
    soak = Soak(target, cfg)

    async def bounded() -> dict:
        try:
            return await asyncio.wait_for(soak.main(), cfg.duration_s + 3 * cfg.deadline_s + 120)
        except asyncio.TimeoutError:
            result = soak.report(time.monotonic() - soak.t0, target.server.ready(), False, stuck=soak.in_flight)
            result["cut_off"] = True
            return result

    return asyncio.run(bounded())


def serve_and_run(repo: Path, cfg: SoakConfig, out: Path) -> dict:
    """Serve the repository (and, when the OpenAI transport is in the mix, the OpenAI frontend), with the
    server's log in `out`, and run the soak against it."""
    from model_repo.__main__ import served_model_name, start_frontend
    from model_repo.openai_api import FrontendConfig
    from model_repo.server import TritonServer, free_port

    out.mkdir(parents=True, exist_ok=True)
    with TritonServer(repo, log_file=out / "server.log") as server:
        frontend, target = None, Target(server)
        if "openai" in cfg.transports:
            port, name = free_port(), served_model_name(repo)
            frontend = start_frontend(FrontendConfig(server.grpc_url, name), "127.0.0.1", port)
            target = Target(server, f"http://127.0.0.1:{port}/v1", name)
        try:
            return run(target, cfg)
        finally:
            if frontend is not None:
                frontend.should_exit = True


def write(result: dict, out: Path) -> Path:
    import json

    out.mkdir(parents=True, exist_ok=True)
    path = out / "soak.json"
    path.write_text(json.dumps(result, indent=2))
    plot(result, out / "soak.png")
    return path


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    t = [x["t_s"] for x in s]
    fig, a = plt.subplots(figsize=(9, 4))
    a.plot(t, [x["rss_mib"] for x in s], color="tab:blue", label="server RSS (MiB)")
    a.set_xlabel("seconds"), a.set_ylabel("server RSS, MiB (tritonserver + stubs)")
    b = a.twinx()
    b.plot(t, [x["in_flight"] for x in s], color="tab:orange", alpha=0.7, label="streams in flight (clients)")
    b.plot(t, [x["engine_active"] or 0 for x in s], color="tab:green", alpha=0.7, label="requests in the engine")
    b.set_ylabel("streams / requests")
    fig.legend(loc="upper right")
    a.set_title(f"soak: {result['requests']} requests, {result['lost']} lost, {result['garbled']} garbled")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(r: dict) -> str:
    c = r["cancel_to_free_tokens"]
    srv = r["server"]
    return "\n".join([
        f"{r['requests']} requests in {r['wall_s']} s at concurrency {r['config']['concurrency']}: "
        f"{r['completed']} ok, {r['lost']} lost, {r['garbled']} garbled, failed {r['failed'] or 0}"
        + (f" (cut off with {r['stuck']} requests stuck)" if r.get("cut_off") else ""),
        "by kind: " + ", ".join(f"{k} {sum(v.values())}" for k, v in r["by_kind"].items()),
        f"tokens generated after a close (server side): median {c['median']}, p95 {c['p95']}, max {c['max']} "
        f"({c['observed']} of {c['closed_streams']} closed streams seen cancelled)",
        f"server RSS {srv['rss_mib_start']} -> {srv['rss_mib_end']} MiB (max {srv['rss_mib_max']}), open files "
        f"{srv['open_files_start']} -> {srv['open_files_end']}, /dev/shm entries {srv['shm_start']} -> {srv['shm_end']}",
        f"ready after: {r['ready_after']}, served after: {r['served_after']}",
    ])
