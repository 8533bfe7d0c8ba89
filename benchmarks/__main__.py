"""python -m benchmarks: serve (sweep a deployment) | roofline | suite (make bench) | cpu-engine | soak | ceiling."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import cli
from common.cli import example, program


def _serve(args) -> int:
    from benchmarks import report
    from benchmarks.procstat import ServerProcesses
    from benchmarks.runner import Target, check_ready, run_sweep

    slo = dict((k.replace("_ms", ""), float(v)) for k, v in (p.split(":") for p in args.goodput.split(","))) \
        if args.goodput else None
    protocol = "openai" if args.backend == "openai" else args.protocol
    model = args.model if args.backend == "openai" else {"bls": "tensorrt_llm_bls"}.get(args.model, args.model)
    target = Target(args.url, model, protocol, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    workload = _workload(args)
    check_ready(target)
    # The server's CPU per streamed token, when its processes are on this machine: Triton behind --url
    # (or --triton-url behind an OpenAI frontend), and the frontend itself.
    triton_url, openai_url = (args.url, None) if args.backend == "triton" else (args.triton_url, args.url)
    processes, missing = ServerProcesses.find(triton_url, openai_url, args.server_pid, args.openai_pid)
    results = run_sweep(target, workload, [int(c) for c in args.concurrency.split(",")], slo, processes, missing)
    report.write_results(results, Path(args.out))
    print(report.summary(results))
    return 0


def _compare(args) -> int:
    from benchmarks.report import compare

    print(compare(json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())))
    return 0


def _roofline(args) -> int:
    from benchmarks import roofline

    b, tp, arch = roofline.inputs(Path(args.checkpoint) if args.checkpoint else None, args.preset, args.tp)
    r = roofline.roofline(b, args.gpu, args.batch, tp=tp, arch=arch)
    print(roofline.format_roofline(r, roofline.load_result(Path(args.result)) if args.result else None))
    return 0


def _engine(args) -> int:
    from benchmarks import engine, report

    results = engine.run_sweep(Path(args.engine), _workload(args), [int(c) for c in args.concurrency.split(",")])
    report.write_results(results, Path(args.out), prefix="engine")
    print(report.summary(results))
    return 0


def _suite(args) -> int:
    """make bench: the CPU demo deployment served by Triton and its engine alone at concurrency 1, 4, 8,
    interleaved round by round; the serving overhead is their difference."""
    from benchmarks import engine, report
    from build_engine import manifest

    repo, out = Path(args.repo), Path(args.out)
    engine_dir = Path(args.engine or manifest.read(repo, "triton-repository")["engine"]["path"])
    workload = _workload(args, tokenizer=str(repo / "preprocessing" / "tokenizer"))
    served, alone = engine.served_vs_engine(repo, engine_dir, workload, [1, 4, 8], args.rounds)
    report.write_results(served, out)
    report.write_results(alone, out, prefix="engine")
    ov = report.overhead(served, alone)
    (out / "overhead.json").write_text(json.dumps(ov, indent=2))
    print("served (Triton, gRPC streaming, tensorrt_llm_bls):")
    print(report.summary(served))
    print("engine alone (no server):")
    print(report.summary(alone))
    print(report.format_overhead(ov, args.rounds))
    print(f"results in {out}/ (JSON per run, summary CSVs, plots, overhead.json)")
    return 0


def _cpu_engine(args) -> int:
    from benchmarks import cpu_engine

    peers = tuple(n for n in (args.peer or "").split(",") if n)
    result = cpu_engine.run(Path(args.checkpoint), Path(args.out), args.prompt_tokens, args.new_tokens, args.rounds,
                            peers=peers, harness=Path(args.peers_harness))
    print(cpu_engine.table(result))
    print(f"results in {args.out}/cpu_engine.json")
    return 0


def _soak(args) -> int:
    """Serve the repository (and the OpenAI frontend), hold it under the soak's mixed load, report."""
    from benchmarks import soak
    from build_engine import UserError, manifest

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
    result = soak.serve_and_run(repo, cfg, out)
    path = soak.write(result, out)
    print(soak.summary(result))
    print(f"results in {path} and {path.with_suffix('.png')}")
    return 0 if result["lost"] == result["garbled"] == 0 and not result["failed"] and result["ready_after"] else 1


def _ceiling(args) -> int:
    """Serve the repository and its OpenAI frontend; CPU per streamed token of every server process, per path
    and concurrency."""
    from benchmarks import ceiling
    from build_engine import UserError

    repo, out = Path(args.repo).resolve(), Path(args.out)
    paths = tuple(args.paths.split(","))
    unknown = [p for p in paths if p not in ceiling.PATHS]
    if unknown:
        raise UserError(f"--paths: unknown path {unknown[0]!r}; paths: {', '.join(ceiling.PATHS)}")
    cfg = ceiling.CeilingConfig(concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
                                paths=paths, output_len=args.output_len,
                                input_len=args.input_len, num_prompts_per_stream=args.num_prompts_per_stream)
    results = ceiling.serve_and_run(repo, cfg, out, on_run=lambda so_far: ceiling.write(so_far, cfg, repo, out))
    md = ceiling.write(results, cfg, repo, out)
    print(ceiling.table(results))
    print(f"results in {md}, {out / 'ceiling.json'} and {out / 'ceiling.png'}")
    return 0


# The workload options, declared once: each command takes the ones it uses, and _workload() builds the
# benchmarks.runner.Workload from whichever a command has.
WORKLOAD_OPTIONS = {
    "num_prompts": dict(type=int, default=16),
    "input_words": dict(type=int, default=32, help="synthetic prompt size without a tokenizer"),
    "input_len": dict(type=int, help="exact prompt tokens (ChatML included); needs a tokenizer"),
    "tokenizer": dict(help="the served model's tokenizer folder (REPO/preprocessing/tokenizer)"),
    "output_len": dict(type=int, default=64, help="fixed output length (EOS ignored via min_tokens)"),
    "request_rate": dict(type=float, help="arrivals per second (Poisson, or gamma with --burstiness)"),
    "burstiness": dict(type=float, default=1.0),
    "dataset": dict(help="ShareGPT-format JSON file of conversations"),
    "warmup": dict(type=int, default=1),
    "temperature": dict(type=float, default=0.0, help="0: greedy (default); above 0: sampled, as chat clients ask"),
}


def _workload_options(s: argparse.ArgumentParser, *names: str, **defaults) -> None:
    for name in names:
        s.add_argument("--" + name.replace("_", "-"), **{**WORKLOAD_OPTIONS[name], **defaults.get(name, {})})


def _workload(args, **fixed):
    from dataclasses import fields

    from benchmarks.runner import Workload

    given = {f.name: getattr(args, f.name) for f in fields(Workload) if hasattr(args, f.name)}
    return Workload(**{**given, **fixed})


def parser() -> argparse.ArgumentParser:
    from benchmarks import soak  # standard library only at import: the default mix for --help
    p, sub = program("benchmarks", __doc__)
    s = sub.add_parser("serve", help="sweep a running deployment over gRPC streaming",
                       **example("python -m benchmarks serve --url 127.0.0.1:8001 --concurrency 1,4,8"))
    s.add_argument("--url", required=True)
    s.add_argument("--backend", choices=("triton", "openai"), default="triton",
                   help="triton: this deployment's Triton models; openai: any OpenAI-compatible server "
                        "(--url http://host:port/v1 --model NAME), e.g. this project's frontend, vLLM, trtllm-serve")
    s.add_argument("--model", default="bls", help="triton: bls (tensorrt_llm_bls) | ensemble; openai: the model id")
    s.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="triton: the transport")
    s.add_argument("--api-key", help="openai: the server's API key (default: $OPENAI_API_KEY)")
    s.add_argument("--concurrency", default="1,2,4,8", help="comma-separated caps; one run each")
    _workload_options(s, *WORKLOAD_OPTIONS)
    s.add_argument("--goodput", help="SLOs, e.g. ttft_ms:500,tpot_ms:50")
    s.add_argument("--server-pid", type=int, help="tritonserver's pid, for its CPU per token (default: the process "
                                                  "listening on the Triton URL's port, when it is on this machine)")
    s.add_argument("--triton-url", help="openai: the gRPC address of the Triton behind the frontend, to measure its "
                                        "CPU too")
    s.add_argument("--openai-pid", type=int, help="the OpenAI frontend's pid (default: with --backend openai, the "
                                                  "process listening on --url's port)")
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_serve)
    s = sub.add_parser("compare", help="ratios between two result JSON files",
                       **example("python -m benchmarks compare results/before/serve_c1.json "
                                 "results/after/serve_c1.json"))
    s.add_argument("a")
    s.add_argument("b")
    s.set_defaults(handler=_compare)
    s = sub.add_parser("roofline", help="decode upper bound from bytes read per step",
                       **example("python -m benchmarks roofline --preset nous-hermes-2-mistral-7b-dpo --tp 2"))
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint")
    g.add_argument("--preset")
    s.add_argument("--gpu", default="h100")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--tp", type=int, choices=(1, 2, 4, 8),
                   help="tensor parallelism: bytes per GPU and all-reduce traffic (default: the checkpoint's, else 1)")
    s.add_argument("--result", help="a serve_c1.json to compare against")
    s.set_defaults(handler=_roofline)
    s = sub.add_parser("engine", help="the same workload on the CPU engine alone (no server)",
                       **example("python -m benchmarks engine --engine artifacts/smollm2-135m-instruct/engine-cpu "
                                 "--concurrency 1,4,8"))
    s.add_argument("--engine", required=True)
    s.add_argument("--concurrency", default="1,4,8")
    _workload_options(s, "num_prompts", "input_words", "output_len", "temperature")
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_engine)
    s = sub.add_parser("suite", help="make bench: CPU demo deployment, concurrency 1/4/8",
                       **example("python -m benchmarks suite --repo artifacts/smollm2-135m-instruct/model_repository "
                                 "--out results"))
    s.add_argument("--repo", required=True)
    s.add_argument("--engine", help="the engine to time alone (default: the repository manifest's)")
    _workload_options(s, "num_prompts", "input_len", "output_len", "temperature", input_len={"default": 64})
    s.add_argument("--rounds", type=int, default=2, help="interleaved rounds of served and engine-only runs")
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_suite)
    s = sub.add_parser("cpu-engine", help="CPU engine prefill, decode and batch 4/8 throughput under its scheduler, "
                                          "interleaved with onnxruntime-genai's own builder",
                       **example("python -m benchmarks cpu-engine --checkpoint "
                                 "artifacts/smollm2-135m-instruct/checkpoint"))
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt-tokens", type=int, default=40)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    s.add_argument("--peer", help="the peers harness's engines to time in the same rounds, e.g. openvino,llama.cpp "
                                  "(made by its setup.sh in $PEERS_WORK)")
    s.add_argument("--peers-harness", default="../shared/peers", help="the peers harness folder (default: %(default)s)")
    s.add_argument("--out", default="results")
    s.set_defaults(handler=_cpu_engine)
    s = sub.add_parser("soak", help="mixed load, early closes, killed clients and bad requests for a while; "
                                    "counts lost, garbled and failed streams, samples the server's memory",
                       **example("python -m benchmarks soak --repo artifacts/smollm2-135m-instruct/model_repository-a1 "
                                 "--duration 1800 --out results/soak"))
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
    s = sub.add_parser("ceiling", help="serve a repository; CPU microseconds per streamed token of tritonserver, each "
                                       "python stub and the OpenAI frontend, per path and concurrency, and the "
                                       "throughput at which one GIL saturates",
                       **example("python -m benchmarks ceiling --repo artifacts/smollm2-135m-instruct/model_repository "
                                 "--out results/ceiling --concurrency 1,16,64"))
    s.add_argument("--repo", required=True)
    s.add_argument("--out", default="results/ceiling")
    s.add_argument("--concurrency", default="1,16,64,128", help="comma-separated caps; one run each per path")
    s.add_argument("--paths", default="bls,ensemble,openai",
                   help="bls: tensorrt_llm_bls over gRPC; ensemble: the ensemble over gRPC; openai: the OpenAI "
                        "frontend (a separate process) (default: %(default)s)")
    s.add_argument("--output-len", type=int, default=256, help="fixed output length (EOS ignored via min_tokens)")
    s.add_argument("--input-len", type=int, default=64,
                   help="prompt tokens with the repository's tokenizer (synthetic prompts without transformers)")
    s.add_argument("--num-prompts-per-stream", type=int, default=2, help="requests per run = concurrency x this")
    s.set_defaults(handler=_ceiling)
    return p


main = cli.entry(parser)


if __name__ == "__main__":
    sys.exit(main())
