"""python -m benchmarks ceiling: the serving path's CPU cost per streamed token, process by process
(tritonserver, each python-backend stub, the OpenAI frontend), on each path into the engine (the BLS
model over gRPC, the ensemble over gRPC, the OpenAI frontend) across concurrencies, and the throughput
at which the path's busiest single-GIL process would fill its one core (the implied ceiling).

The repository is served here, with the frontend as a separate process so that its CPU is its own;
each run is benchmarks.runner.measure, so the records are the serve sweep's, plus the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.procstat import FRONTEND, OTHER_PREFIX, TRITONSERVER, ServerProcesses, base_name
from benchmarks.runner import Target, Workload, measure

# path -> (runner protocol, Triton model); the OpenAI path's model is the served model id.
PATHS = {"bls": ("grpc", "tensorrt_llm_bls"), "ensemble": ("grpc", "ensemble"), "openai": ("openai", None)}
# The ensemble's responses carry no token count: its streams are counted in non-empty chunks, which a
# token that ends mid-character leaves empty, so a short count there is no sign of a lost token.
CHUNK_COUNTED = {"ensemble"}
ENGINE_MODEL = "tensorrt_llm"
# The table's process columns (by model or process) and their labels.
PROCESS_COLUMNS = {TRITONSERVER: "tritonserver", "tensorrt_llm_bls": "tensorrt_llm_bls",
                   "postprocessing": "postprocessing", "preprocessing": "preprocessing",
                   ENGINE_MODEL: "engine stand-in", FRONTEND: "frontend"}
FRONTEND_START_S = 60.0


@dataclass(frozen=True)
class CeilingConfig:
    concurrencies: tuple[int, ...] = (1, 16, 64, 128)
    paths: tuple[str, ...] = tuple(PATHS)
    input_len: int = 64  # prompt tokens (ChatML included) with the repository's tokenizer
    output_len: int = 256  # fixed via min_tokens (Workload.sampling)
    num_prompts_per_stream: int = 2  # num_prompts = concurrency x this
    warmup: int = 1

    def __post_init__(self):
        unknown = [p for p in self.paths if p not in PATHS]
        assert not unknown, f"unknown path {unknown[0]!r}: paths are {', '.join(PATHS)}"
        assert self.concurrencies and min(self.concurrencies) >= 1, "concurrencies must be 1 or more"
        assert self.num_prompts_per_stream >= 1, "num_prompts_per_stream must be 1 or more"


def repo_tokenizer(repo: Path) -> str | None:
    """REPO/preprocessing/tokenizer when it is there and transformers can load it; else None (synthetic prompts)."""
    folder = Path(repo) / "preprocessing" / "tokenizer"
    try:
        import transformers  # noqa: F401  (not in [bench]: the [build] extra has it)
    except ImportError:
        return None
    return str(folder) if folder.is_dir() else None


def workload(cfg: CeilingConfig, concurrency: int, tokenizer: str | None) -> Workload:
    return Workload(num_prompts=concurrency * cfg.num_prompts_per_stream, output_len=cfg.output_len,
                    input_len=cfg.input_len if tokenizer else None, tokenizer=tokenizer, warmup=cfg.warmup)


@dataclass(frozen=True)
class Frontend:
    url: str  # http://127.0.0.1:PORT/v1
    pid: int


@contextlib.contextmanager
def frontend_process(triton_url: str, model_name: str, log_file: Path):
    """The OpenAI frontend (`python -m model_repo openai`) as a process of its own, on a free loopback
    port; yields a Frontend once its /v1/models answers, and stops it on leaving."""
    from build_engine import UserError
    from model_repo.server import free_port

    port = free_port()
    # Open on loopback to this benchmark alone: an API key in the environment would only lock it out.
    env = {k: v for k, v in os.environ.items() if k != "HERMES_API_KEY"}
    cmd = [sys.executable, "-m", "model_repo", "openai", "--triton", triton_url, "--host", "127.0.0.1",
           "--port", str(port), "--model-name", model_name]
    with open(log_file, "ab") as log:
        # A session of its own: a Ctrl-C reaches this process, whose `finally` stops the frontend.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + FRONTEND_START_S
        while not _answers(f"{url}/models"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the OpenAI frontend did not start (exit code {proc.poll()}); see {log_file}")
            time.sleep(0.2)
        yield Frontend(url, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful stop
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def serve_and_run(repo: Path, cfg: CeilingConfig, out: Path, progress=lambda line: print(line, flush=True),
                  on_run=lambda results: None) -> list[dict]:
    """Serve the repository (and its OpenAI frontend when that path is asked for) and run every path at
    every concurrency, with each server process's CPU measured over each timed window. `on_run` gets the
    results so far after each run (the command writes them: a run that hangs loses only itself)."""
    from model_repo.__main__ import served_model_name
    from model_repo.server import TritonServer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = repo_tokenizer(repo)
    results = []
    with TritonServer(repo, log_file=out / "server.log") as server, contextlib.ExitStack() as stack:
        name = served_model_name(repo)
        frontend = None
        if "openai" in cfg.paths:
            frontend = stack.enter_context(frontend_process(server.grpc_url, name, out / "frontend.log"))
        for path in cfg.paths:
            protocol, model = PATHS[path]
            if path == "openai":
                target = Target(frontend.url, name, protocol)
                processes, missing = ServerProcesses.find(server.grpc_url, frontend.url, server.proc.pid,
                                                          frontend.pid)
            else:
                target = Target(server.grpc_url, model, protocol)
                processes, missing = ServerProcesses.find(server.grpc_url, server_pid=server.proc.pid)
            for c in cfg.concurrencies:
                r = measure(target, workload(cfg, c, tokenizer), c, None, processes, missing, path=path)
                results.append(r)
                on_run(results)
                progress(f"{path} c={c}: {_fmt(r['metrics']['output_throughput'])} tok/s, {r['metrics']['failed']} "
                         f"failed, server CPU {_fmt(r.get('server_cpu_total_us_per_token'), 0)} µs/token")
    return results


def instances_us_per_token(r: dict, column: str) -> list[float | None] | None:
    """Each instance's CPU µs per token for one table column (a model's stubs, or one process); None when
    the run has no such process (not on its path, or server CPU not measured)."""
    cpu = r.get("server_cpu") or {}
    values = [v["us_per_token"] for name, v in cpu.items() if base_name(name) == column]
    return values or None


def single_gil(name: str) -> bool:
    """A process that runs Python on one GIL: a python-backend stub or the frontend. Not tritonserver
    (C++, many threads), nor the engine's stub: on a GPU the engine is the C++ TensorRT-LLM backend inside
    tritonserver, and here its cost is the stand-in's compute, not the serving path's."""
    base = base_name(name)
    return base not in (TRITONSERVER, ENGINE_MODEL) and not base.startswith(OTHER_PREFIX)


def implied_ceiling(r: dict) -> float | None:
    """Output tok/s at which the run's busiest single-GIL process would use a whole core:
    1e6 / its µs per token. Missing when any of them is."""
    values = [v["us_per_token"] for name, v in (r.get("server_cpu") or {}).items() if single_gil(name)]
    if not values or None in values or max(values) <= 0:
        return None
    return 1e6 / max(values)


def short_streams(r: dict) -> int | None:
    """Streams that ended without an error but with fewer tokens than the fixed output length (None where
    streams are counted in chunks, not tokens)."""
    if r.get("path") in CHUNK_COUNTED:
        return None
    want = r["workload"]["output_len"]
    return sum(1 for q in r["requests"] if q["success"] and q["output_tokens"] < want)


def _fmt(v, digits: int = 1) -> str:
    return "missing" if v is None else f"{v:,.{digits}f}"


def _cell(r: dict, column: str) -> str:
    if r.get("server_cpu") is None:
        return "missing"
    values = instances_us_per_token(r, column)
    return "–" if values is None else " + ".join(_fmt(v, 0) for v in values)


def table(results: list[dict]) -> str:
    """The markdown table: one row per path and concurrency."""
    head = ["path", "concurrency", "output tok/s", "median TTFT ms", "median ITL ms", "failed / short",
            *(f"{label} µs/token" for label in PROCESS_COLUMNS.values()), "implied single-GIL ceiling tok/s"]
    rows = []
    for r in results:
        m, short = r["metrics"], short_streams(r)
        rows.append([r.get("path", r["target"].get("model", "?")), str(r["concurrency"]),
                     _fmt(m["output_throughput"]), _fmt(m["median_ttft_ms"]), _fmt(m["median_itl_ms"], 2),
                     f"{m['failed']} / {'–' if short is None else short}", *(_cell(r, c) for c in PROCESS_COLUMNS),
                     _fmt(implied_ceiling(r), 0)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def notes(results: list[dict]) -> str:
    missing = sorted({f"{r.get('path')} c={r['concurrency']}: {r['server_cpu_missing']}"
                      for r in results if r.get("server_cpu_missing")})
    errors = {}
    for r in results:
        for q in r["requests"]:
            if not q["success"]:
                kind = (q["error"] or "error").split(":")[0]
                key = (r.get("path"), r["concurrency"], kind)
                errors[key] = errors.get(key, 0) + 1
    return "\n".join([
        "CPU µs per streamed token: each process's user + system CPU time over the timed window (not the "
        "warmup) / the output tokens of the run's successful streams. `a + b`: one value per model instance; "
        "`–`: not on this path. The implied ceiling is 1e6 / the largest µs per token among the single-GIL "
        "processes (python-backend stubs other than the engine stand-in, and the frontend): the output tok/s "
        "at which that process would fill one core. CPU time comes in clock ticks (10 ms): small values "
        "of short runs are coarse. short: streams that ended normally with fewer tokens than the fixed "
        "output length, as the server counts them (`–`: the ensemble, whose streams are counted in "
        "non-empty chunks; its µs per token are per counted chunk too).",
        *(f"- failed: {p} c={c}: {n} x {kind}" for (p, c, kind), n in sorted(errors.items())),
        *(f"- server CPU not measured: {m}" for m in missing)])


def plot(results: list[dict], path: Path) -> None:
    """Left: output tok/s (and the implied ceiling, dashed) vs concurrency per path. Right: CPU µs per token
    vs concurrency, one line per path (line style) and process (colour); idle processes left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    paths = list(dict.fromkeys(r.get("path") for r in results))
    styles = {p: ("-", "--", ":", "-.")[i % 4] for i, p in enumerate(paths)}
    names = list(dict.fromkeys(n for r in results for n in (r.get("server_cpu") or {})
                               if not n.startswith(OTHER_PREFIX)))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    for i, p in enumerate(paths):
        runs = sorted((r for r in results if r.get("path") == p), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in runs]
        a.plot(cs, [_nan(r["metrics"]["output_throughput"]) for r in runs], marker="o", color=f"C{i}", label=p)
        a.plot(cs, [_nan(implied_ceiling(r)) for r in runs], ls="--", color=f"C{i}", alpha=0.6,
               label=f"{p}: implied single-GIL ceiling")
        for n in names:
            ys = [((r.get("server_cpu") or {}).get(n) or {}).get("us_per_token") for r in runs]
            if any(y for y in ys):  # an idle process (0 on a log axis) says nothing here: the table has it
                b.plot(cs, [y if y else float("nan") for y in ys], marker="o", ls=styles[p], color=colors[n])
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in results}), [str(c) for c in
                                                                   sorted({r["concurrency"] for r in results})])
        ax.set_xlabel("concurrency")
    a.set_ylabel("output tok/s"), a.set_title("throughput"), a.legend(fontsize=7)
    b.set_yscale("log"), b.set_ylabel("CPU µs per streamed token (log)"), b.set_title("CPU per token")
    label = {n: PROCESS_COLUMNS.get(base_name(n), base_name(n)) + n[len(base_name(n)):] for n in names}
    by_process = b.legend([Line2D([], [], color=colors[n]) for n in names], [label[n] for n in names],
                          fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="process", title_fontsize=7)
    b.add_artist(by_process)
    by_path = b.legend([Line2D([], [], color="gray", ls=styles[p]) for p in paths], paths, fontsize=7, loc="lower left",
             bbox_to_anchor=(1.01, 0), title="path", title_fontsize=7)
    fig.tight_layout()
    # "tight", with the legends right of the axes named: savefig leaves an added legend out otherwise.
    fig.savefig(path, dpi=100, bbox_inches="tight", bbox_extra_artists=[by_process, by_path])
    plt.close(fig)


def _nan(v):
    return float("nan") if v is None else v


def write(results: list[dict], cfg: CeilingConfig, repo: Path, out: Path) -> Path:
    """ceiling.json (every run's full record), ceiling.md (the table), ceiling.png; returns the table's path."""
    from benchmarks.report import environment

    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps({"repo": str(repo), "config": asdict(cfg),
                                                  "environment": environment(), "runs": results}, indent=2))
    md = out / "ceiling.md"
    md.write_text(f"# Serving-path CPU per streamed token: {repo}\n\n{table(results)}\n\n{notes(results)}\n")
    plot(results, out / "ceiling.png")
    return md
