"""python -m benchmarks: serve (sweep a deployment) | roofline | suite (make bench) | cpu-engine | soak."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from pathlib import Path

KEYS = ("completed", "failed", "total_input_tokens", "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
        "median_itl_ms", "p99_itl_ms", "median_tpot_ms", "median_e2el_ms")


def write_results(results: list[dict], out: Path, prefix: str = "serve") -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    for r in results:
        c = r["config"]["concurrency"]
        (out / f"{prefix}_c{c}.json").write_text(json.dumps({**r, "environment": env}, indent=2))
    with open(out / f"{prefix}_summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concurrency", *KEYS])
        for r in results:
            w.writerow([r["config"]["concurrency"], *[r["metrics"].get(k) for k in KEYS]])
    plot(results, out / f"{prefix}_latency_vs_concurrency.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["config"]["concurrency"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms"):
        a.plot(cs, [r["metrics"][key] for r in results], marker="o", label=key)
    a.set_xlabel("concurrency"), a.set_ylabel("ms (log)"), a.set_xscale("log", base=2), a.set_yscale("log")
    a.legend()
    b.plot([r["metrics"]["median_ttft_ms"] for r in results], [r["metrics"]["output_throughput"] for r in results],
           marker="o")
    for c, r in zip(cs, results):
        b.annotate(f"c={c}", (r["metrics"]["median_ttft_ms"], r["metrics"]["output_throughput"]))
    b.set_xlabel("median TTFT (ms)"), b.set_ylabel("output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        reqs = [q for q in r["requests"] if q["success"]]
        label = f"c={r['config']['concurrency']}"
        a.hist([1000 * q["ttft_s"] for q in reqs], bins=20, alpha=0.5, label=label)
        b.hist([1000 * g for q in reqs for g in q["itl_s"]], bins=40, alpha=0.5, label=label)
    a.set_xlabel("TTFT (ms)"), b.set_xlabel("ITL (ms)"), a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path.with_name(path.name.replace("latency_vs_concurrency", "distributions")), dpi=100)
    plt.close(fig)


def summary(results: list[dict]) -> str:
    def fmt(v):
        return "missing" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    rows = [["concurrency", *KEYS]] + [[str(r["config"]["concurrency"]), *[fmt(r["metrics"].get(k)) for k in KEYS]]
                                       for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _serve(args) -> int:
    from benchmarks.runner import RunConfig, run_sweep

    slo = dict((k.replace("_ms", ""), float(v)) for k, v in (p.split(":") for p in args.goodput.split(","))) \
        if args.goodput else None
    protocol = "openai" if args.backend == "openai" else args.protocol
    model = args.model if args.backend == "openai" else {"bls": "tensorrt_llm_bls"}.get(args.model, args.model)
    base = RunConfig(args.url, model, protocol,
                     args.num_prompts, args.input_words, args.output_len, request_rate=args.request_rate,
                     burstiness=args.burstiness, dataset=args.dataset, input_len=args.input_len,
                     tokenizer=args.tokenizer, warmup=args.warmup,
                     api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    results = run_sweep(base, [int(c) for c in args.concurrency.split(",")], slo)
    write_results(results, Path(args.out))
    print(summary(results))
    return 0


def compare(a: dict, b: dict) -> str:
    """Ratios B / A for every numeric metric both runs report."""
    rows = []
    for k, va in a["metrics"].items():
        vb = b["metrics"].get(k)
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va:
            rows.append(f"{k:<24} {va:>12.3f} {vb:>12.3f} {vb / va:>8.3f}x")
        elif va is None or vb is None:
            rows.append(f"{k:<24} {'missing' if va is None else f'{va:.3f}':>12} "
                        f"{'missing' if vb is None else f'{vb:.3f}':>12}")
    return f"{'metric':<24} {'A':>12} {'B':>12} {'B/A':>9}\n" + "\n".join(rows)


def _compare(args) -> int:
    print(compare(json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())))
    return 0


def _roofline(args) -> int:
    from benchmarks import roofline

    if args.checkpoint:
        from build_engine import checkpoint

        cfg = checkpoint.read_config(Path(args.checkpoint))
        b, tp = roofline.bytes_from_checkpoint(Path(args.checkpoint)), args.tp or cfg["mapping"]["tp_size"]
        arch = {"hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_hidden_layers"],
                "vocab_size": cfg["vocab_size"]}
    else:
        from build_engine import presets

        b, tp, arch = roofline.preset_bytes(args.preset), args.tp or 1, presets.load(args.preset).architecture
    r = roofline.roofline(b, args.gpu, args.batch, tp=tp, arch=arch)
    print(roofline.format_roofline(r, roofline.load_result(Path(args.result)) if args.result else None))
    return 0


def _engine(args) -> int:
    from benchmarks import engine
    from benchmarks.runner import RunConfig

    base = RunConfig("engine", num_prompts=args.num_prompts, input_words=args.input_words, output_len=args.output_len)
    results = engine.run_sweep(Path(args.engine), base, [int(c) for c in args.concurrency.split(",")])
    write_results(results, Path(args.out), prefix="engine")
    print(summary(results))
    return 0


def overhead(served: list[dict], engine_only: list[dict]) -> dict:
    """Serving overhead at each concurrency: served minus engine-only, per token and per request."""
    out = {}
    for s, e in zip(served, engine_only):
        sm, em = s["metrics"], e["metrics"]
        diff = lambda k: None if sm.get(k) is None or em.get(k) is None else sm[k] - em[k]  # noqa: E731
        out[s["config"]["concurrency"]] = {"median_itl_ms": diff("median_itl_ms"),
                                           "median_ttft_ms": diff("median_ttft_ms"),
                                           "median_e2el_ms": diff("median_e2el_ms")}
    return out


def _suite(args) -> int:
    """make bench: the CPU demo deployment served by Triton, and its engine alone, at concurrency
    1, 4, 8, interleaved round by round (served c1, engine c1, served c4, ...), so that drift hits
    both alike and the overhead (served - engine) is not noise."""
    import asyncio
    from dataclasses import asdict

    from benchmarks import engine
    from benchmarks.runner import RunConfig, run
    from build_engine import manifest
    from model_repo.server import TritonServer

    repo, out = Path(args.repo), Path(args.out)
    engine_dir = Path(args.engine or manifest.read(repo, "triton-repository")["engine"]["path"])
    concurrencies = [1, 4, 8]
    workload = dict(num_prompts=args.num_prompts, output_len=args.output_len, input_len=args.input_len,
                    tokenizer=str(repo / "preprocessing" / "tokenizer"))
    runs = {(kind, c): ([], 0.0) for kind in ("served", "engine") for c in concurrencies}
    alone = engine.EngineRunner(engine_dir, RunConfig("engine", **workload))
    try:
        with TritonServer(repo) as server:
            cfgs = {c: RunConfig(server.grpc_url, **{**workload, "concurrency": c, "warmup": 0}) for c in concurrencies}
            asyncio.run(run(RunConfig(server.grpc_url, **{**workload, "num_prompts": 1})))  # warm-up
            alone.warm_up()
            for _ in range(args.rounds):
                for c in concurrencies:
                    for kind, measured in (("served", lambda: asyncio.run(run(cfgs[c]))), ("engine", lambda: alone.run(c))):
                        outputs, duration = measured()
                        prev = runs[kind, c]
                        runs[kind, c] = (prev[0] + outputs, prev[1] + duration)
    finally:
        alone.close()
    served = [engine.result({**asdict(cfgs[c]), "rounds": args.rounds}, *runs["served", c]) for c in concurrencies]
    alone_results = [engine.result({**alone.config(c), "rounds": args.rounds}, *runs["engine", c])
                     for c in concurrencies]
    write_results(served, out)
    write_results(alone_results, out, prefix="engine")
    ov = overhead(served, alone_results)
    (out / "overhead.json").write_text(json.dumps(ov, indent=2))
    print("served (Triton, gRPC streaming, tensorrt_llm_bls):")
    print(summary(served))
    print("engine alone (no server):")
    print(summary(alone_results))
    print(f"serving overhead (served - engine, {args.rounds} interleaved rounds), ms:")
    for c, v in ov.items():
        print(f"  c={c}: per token (median ITL) {v['median_itl_ms']:+.3f}, per request (median TTFT) "
              f"{v['median_ttft_ms']:+.2f}, E2E {v['median_e2el_ms']:+.2f}")
    print(f"results in {out}/ (JSON per run, summary CSVs, plots, overhead.json)")
    return 0


def _cpu_engine(args) -> int:
    from benchmarks import cpu_engine

    result = cpu_engine.run(Path(args.checkpoint), Path(args.out), args.prompt_tokens, args.new_tokens, args.rounds)
    print(cpu_engine.table(result))
    print(f"results in {args.out}/cpu_engine.json")
    return 0


def _soak(args) -> int:
    """Serve the repository (and the OpenAI frontend), hold it under the soak's mixed load, report."""
    from benchmarks import soak
    from build_engine import UserError, manifest
    from model_repo.__main__ import served_model_name, start_frontend
    from model_repo.openai_api import FrontendConfig
    from model_repo.server import TritonServer, free_port

    repo, out = Path(args.repo).resolve(), Path(args.out)
    engine = manifest.read(Path(manifest.read(repo, "triton-repository")["engine"]["path"]))
    if engine["kind"] == "cpu-engine" and engine["settings"]["accuracy_level"] != 1:
        raise UserError("the soak compares replies with solo runs, which needs a batch-invariant engine: build the "
                        "CPU engine with --accuracy-level 1 and generate its repository")
    transports = tuple(args.transports.split(","))
    mix = dict(soak.DEFAULT_MIX)
    if args.mix:
        pairs = [item.partition("=") for item in args.mix.split(",")]
        unknown = sorted({k for k, _, _ in pairs} - set(soak.DEFAULT_MIX))
        if unknown:
            raise UserError(f"--mix: unknown kind {unknown[0]!r}; kinds: {', '.join(soak.DEFAULT_MIX)}")
        mix = {k: float(v) for k, _, v in pairs}
    cfg = soak.SoakConfig(concurrency=args.concurrency, duration_s=args.duration, transports=transports,
                          mix=mix, vanish_every_s=args.vanish_every, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    with TritonServer(repo, log_file=out / "server.log") as server:
        frontend, target = None, soak.Target(server)
        if "openai" in transports:
            port = free_port()
            name = served_model_name(repo)
            frontend = start_frontend(FrontendConfig(server.grpc_url, name), "127.0.0.1", port)
            target = soak.Target(server, f"http://127.0.0.1:{port}/v1", name)
        try:
            result = soak.run(target, cfg)
        finally:
            if frontend is not None:
                frontend.should_exit = True
    path = soak.write(result, out)
    print(soak.summary(result))
    print(f"results in {path} and {path.with_suffix('.png')}")
    return 0 if result["lost"] == result["garbled"] == 0 and not result["failed"] and result["ready_after"] else 1


def parser() -> argparse.ArgumentParser:
    from benchmarks import soak  # standard library only at import: the default mix for --help
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(title="commands")
    s = sub.add_parser("serve", help="sweep a running deployment over gRPC streaming")
    s.add_argument("--url", required=True)
    s.add_argument("--backend", choices=("triton", "openai"), default="triton",
                   help="triton: this deployment's Triton models; openai: any OpenAI-compatible server "
                        "(--url http://host:port/v1 --model NAME), e.g. this project's frontend, vLLM, trtllm-serve")
    s.add_argument("--model", default="bls", help="triton: bls (tensorrt_llm_bls) | ensemble; openai: the model id")
    s.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="triton: the transport")
    s.add_argument("--api-key", help="openai: the server's API key (default: $OPENAI_API_KEY)")
    s.add_argument("--concurrency", default="1,2,4,8", help="comma-separated caps; one run each")
    s.add_argument("--request-rate", type=float, help="arrivals per second (Poisson, or gamma with --burstiness)")
    s.add_argument("--burstiness", type=float, default=1.0)
    s.add_argument("--dataset", help="ShareGPT-format JSON file of conversations")
    s.add_argument("--num-prompts", type=int, default=16)
    s.add_argument("--input-words", type=int, default=32, help="synthetic prompt size without a tokenizer")
    s.add_argument("--input-len", type=int, help="exact prompt tokens (ChatML included); needs --tokenizer")
    s.add_argument("--tokenizer", help="the served model's tokenizer folder (REPO/preprocessing/tokenizer)")
    s.add_argument("--output-len", type=int, default=64, help="fixed output length (EOS ignored via min_tokens)")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--goodput", help="SLOs, e.g. ttft_ms:500,tpot_ms:50")
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_serve)
    s = sub.add_parser("compare", help="ratios between two result JSON files")
    s.add_argument("a")
    s.add_argument("b")
    s.set_defaults(handler=_compare)
    s = sub.add_parser("roofline", help="decode upper bound from bytes read per step")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint")
    g.add_argument("--preset")
    s.add_argument("--gpu", default="h100")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--tp", type=int, choices=(1, 2, 4, 8),
                   help="tensor parallelism: bytes per GPU and all-reduce traffic (default: the checkpoint's, else 1)")
    s.add_argument("--result", help="a serve_c1.json to compare against")
    s.set_defaults(handler=_roofline)
    s = sub.add_parser("engine", help="the same workload on the CPU engine alone (no server)")
    s.add_argument("--engine", required=True)
    s.add_argument("--concurrency", default="1,4,8")
    s.add_argument("--num-prompts", type=int, default=16)
    s.add_argument("--input-words", type=int, default=32)
    s.add_argument("--output-len", type=int, default=64)
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_engine)
    s = sub.add_parser("suite", help="make bench: CPU demo deployment, concurrency 1/4/8")
    s.add_argument("--repo", required=True)
    s.add_argument("--engine")
    s.add_argument("--num-prompts", type=int, default=16)
    s.add_argument("--input-len", type=int, default=64)
    s.add_argument("--output-len", type=int, default=64)
    s.add_argument("--rounds", type=int, default=2, help="interleaved rounds of served and engine-only runs")
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_suite)
    s = sub.add_parser("cpu-engine", help="CPU engine prefill, decode and batch 4/8 throughput under its scheduler, "
                                          "interleaved with onnxruntime-genai's own builder")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt-tokens", type=int, default=40)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_cpu_engine)
    s = sub.add_parser("soak", help="mixed load, early closes, killed clients and bad requests for a while; "
                                    "counts lost, garbled and failed streams, samples the server's memory",
                       epilog="example:\n  python -m benchmarks soak --repo artifacts/smol/model_repository-a1 "
                              "--duration 1800 --out results/soak",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--repo", required=True, help="a repository of a batch-invariant engine (accuracy level 1)")
    s.add_argument("--duration", type=float, default=1800.0, help="seconds of load (default: %(default)s)")
    s.add_argument("--concurrency", type=int, default=16)
    s.add_argument("--transports", default="grpc,http,openai")
    s.add_argument("--vanish-every", type=float, default=10.0,
                   help="seconds between killed client processes (0: none)")
    s.add_argument("--mix", help="request kinds and their weights, e.g. greedy=0.85,invalid=0.15 (default: "
                                 + ",".join(f"{k}={v}" for k, v in soak.DEFAULT_MIX.items()) + ")")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/soak")
    s.set_defaults(handler=_soak)
    return p


def main(argv=None) -> int:
    """The shared CLI root: one-line errors with the fix, HERMES_DEBUG=1 for a traceback."""
    from build_engine import cli

    return cli.run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
