"""python -m model_repo: generate | serve | openai | demo."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from build_engine import UserError, container
from common import cli
from common.cli import example, program
from model_repo.server import DRAIN_TIMEOUT_S, StallWatchdog, check_serving_image, stop_signal

EXAMPLES = """examples:
  python -m model_repo generate --engine artifacts/smollm2-135m-instruct/engine-cpu \\
      --output artifacts/smollm2-135m-instruct/model_repository
  python -m model_repo serve --repo artifacts/smollm2-135m-instruct/model_repository --grpc-port 8001
"""


def _generate(args) -> int:
    from model_repo.generate import generate

    counts = {name: getattr(args, f"{name}_instances") or args.instances
              for name in ("bls", "preprocessing", "postprocessing")}
    print(generate(Path(args.engine), Path(args.output), args.max_batch_size, counts, args.max_queue_size))
    return 0


def _serve(args) -> int:
    from build_engine import manifest
    from model_repo.server import Ports, StartCancelled, TritonServer, check_ports_free

    repo = Path(args.repo).resolve()
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    m = manifest.read(repo, "triton-repository")
    if m["target"] == "gpu":
        return _serve_gpu(repo, ports, args)
    check_ports_free(args.host, {"--http-port": ports.http, "--grpc-port": ports.grpc,
                                 "--metrics-port": ports.metrics,
                                 **({"--openai-port": args.openai_port} if args.openai_port else {})})
    server = TritonServer(repo, args.host, ports, drain_timeout_s=args.drain_timeout)
    # A stop signal during the load cancels start(), which stops what it started; once serving, it ends
    # the watch loop below and the server drains. Either way serve exits 0: a stop asked for.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start(echo=not args.quiet, cancel=stop, echo_all=args.verbose)
    except StartCancelled:
        return 0
    frontend = None
    try:
        if args.openai_port:
            frontend = start_frontend(_frontend_config(args, server.grpc_url), args.host, args.openai_port)
        print(f"serving {repo.name}: gRPC {server.grpc_url}  HTTP {server.http_url}  "
              f"metrics http://{args.host}:{args.metrics_port}/metrics"
              + (f"  OpenAI http://{args.host}:{args.openai_port}/v1" if frontend else "") + "  (Ctrl-C stops)",
              flush=True)
        _watch(server, stop, args)
    finally:
        if frontend is not None:
            frontend.should_exit = True
        server.stop()
    return 0


def _watch(server, stop: threading.Event, args) -> None:
    """Until `stop`: fail when tritonserver exits or a model stalls."""
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    watchdog = StallWatchdog(f"http://{local}:{args.metrics_port}/metrics", args.stall_timeout)
    next_check = time.monotonic() + 5
    while not stop.wait(0.5):
        if server.proc.poll() is not None:
            raise UserError(server.exit_message())
        if args.stall_timeout and time.monotonic() >= next_check:
            next_check = time.monotonic() + 5
            stalled = watchdog.poll()
            if stalled:
                raise UserError(f"tritonserver stalled: {stalled} (Triton 2.51's python backend can deadlock "
                                "under load, RELIABILITY.md); stopped it so that a supervisor restarts it")


def _serve_gpu(repo: Path, ports, args) -> int:
    """A GPU repository: tritonserver with the TensorRT-LLM backend, in this project's serving image."""
    import shutil
    import subprocess

    from model_repo.server import gpu_command

    inside = shutil.which("tritonserver") is not None  # the serving image runs it directly
    cmd = gpu_command(repo, args.host, ports, args.image, inside_container=inside, drain_timeout_s=args.drain_timeout)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    # In a session of its own, the server gets the terminal's Ctrl-C from this process only (stop_signal
    # says why mpirun must not get it at all). The relay is in place before the server starts, so that
    # no stop signal can end this process and leave the server running unsupervised.
    with _forwarding_signals() as relay:  # SIGTERM (a pod stopping) and Ctrl-C reach tritonserver: it drains
        if not inside:
            if shutil.which("docker") is None:
                raise UserError(f"serving a GPU engine needs tritonserver (inside {args.image}, built from "
                                f"{container.DEFAULT_IMAGE} with `make gpu-image`) or docker with the NVIDIA "
                                "container toolkit")
            warning = check_serving_image(args.image, allow_mismatch=args.allow_image_mismatch)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        if relay.pending is not None:
            return 0  # told to stop before the server started
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            relay.attach(proc)
            if not args.openai_port:
                return proc.wait()
            # With the OpenAI frontend: Triton (host networking either way) plus the frontend in this process.
            frontend = start_frontend(_frontend_config(args, f"{args.host}:{ports.grpc}"), args.host,
                                      args.openai_port)
            print(f"OpenAI http://{args.host}:{args.openai_port}/v1 (Ctrl-C stops)", flush=True)
            try:
                return proc.wait()
            finally:
                frontend.should_exit = True
        finally:
            if proc.poll() is None:  # serve is leaving early (an error): the server, in its own session, goes too
                stop_signal(proc, signal.SIGTERM)
                proc.wait()


class _SignalRelay:
    """Passes SIGINT, SIGTERM and SIGHUP (as SIGTERM: a hangup, the terminal or ssh session closing,
    stops the server rather than leaving it running in its own session) on to the server `proc` runs
    (server.stop_signal). One that arrives before there is a server is kept in `pending`."""

    RELAY = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}

    def __init__(self):
        self.proc = None
        self.pending: signal.Signals | None = None

    def __call__(self, sig, _frame) -> None:
        if self.proc is None:
            self.pending = self.RELAY[sig]
        else:
            stop_signal(self.proc, self.RELAY[sig])

    def attach(self, proc) -> None:
        self.proc = proc
        if self.pending is not None:
            stop_signal(proc, self.pending)


@contextlib.contextmanager
def _forwarding_signals():
    """A _SignalRelay handling the stop signals while the block runs (in the main thread, where Python
    handles them; elsewhere it relays nothing)."""
    relay = _SignalRelay()
    if threading.current_thread() is not threading.main_thread():
        yield relay
        return
    previous = {sig: signal.signal(sig, relay) for sig in relay.RELAY}
    try:
        yield relay
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def served_model_name(repo: Path) -> str:
    """The model id the OpenAI frontend serves: the source model's name from the repository manifest."""
    from build_engine import manifest

    m = manifest.read(repo, "triton-repository")
    return m["model"].get("name") or m.get("preset") or "hermes-trtllm"


def _frontend_config(args, triton_url: str):
    from model_repo.openai_api import FrontendConfig

    name = args.model_name or (served_model_name(Path(args.repo).resolve()) if args.repo else "hermes-trtllm")
    return FrontendConfig(triton_url=triton_url, model_name=name,
                          api_key=args.api_key or os.environ.get("HERMES_API_KEY") or None,
                          default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_bytes)


def start_frontend(cfg, host: str, port: int):
    """Run the OpenAI frontend (uvicorn) in a background thread; returns the uvicorn server."""
    import time

    import uvicorn

    from model_repo.openai_api import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(cfg), host=host, port=port, log_level="warning",
                                           access_log=False))
    threading.Thread(target=server.run, name="openai-frontend", daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or (server.should_exit and not server.started):
            raise UserError(f"the OpenAI frontend could not start on {host}:{port}")
        time.sleep(0.05)
    return server


def _openai(args) -> int:
    """The OpenAI-compatible frontend alone, in front of a running Triton."""
    import uvicorn

    from model_repo.openai_api import create_app

    cfg = _frontend_config(args, args.triton)
    print(f"OpenAI API for {cfg.model_name!r} on http://{args.host}:{args.port}/v1 -> Triton gRPC {args.triton}",
          flush=True)
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _demo(args) -> int:
    """Serve the repository, ask one ChatML question over gRPC streaming, print the answer, stop."""
    from client import Client, Message
    from model_repo.server import TritonServer

    with TritonServer(Path(args.repo)) as server:
        with Client(server.grpc_url) as c:
            print(f"user: {args.prompt}\nassistant: ", end="", flush=True)
            for chunk in c.stream([Message("user", args.prompt)], max_tokens=args.max_tokens):
                print(chunk.text, end="", flush=True)
            print()
    return 0


def parser() -> argparse.ArgumentParser:
    p, sub = program("model_repo", __doc__, EXAMPLES)
    s = sub.add_parser("generate", help="write a Triton model repository for an engine",
                       **example("python -m model_repo generate --engine artifacts/smollm2-135m-instruct/engine-cpu "
                                 "--output artifacts/smollm2-135m-instruct/model_repository"))
    s.add_argument("--engine", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--max-batch-size", type=int)
    s.add_argument("--instances", type=int,
                   help="instances of each python model (default: the target's; CPU 1, GPU BLS 4, pre 2, post 4)")
    for name in ("bls", "preprocessing", "postprocessing"):
        s.add_argument(f"--{name}-instances", type=int, help=f"instances of {name} (default: --instances)")
    s.add_argument("--max-queue-size", type=int,
                   help="requests waiting for tensorrt_llm before Triton refuses more (default: 4 x max batch size)")
    s.set_defaults(handler=_generate)

    s = sub.add_parser("serve", help="serve a repository with Triton (bundled server on CPU, container on GPU)",
                       **example("python -m model_repo serve --repo artifacts/smollm2-135m-instruct/model_repository "
                                 "--grpc-port 8001"))
    s.add_argument("--repo", required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--quiet", action="store_true", help="do not forward the server log")
    s.add_argument("--verbose", action="store_true",
                   help="CPU: forward the whole server log (by default its tables and the harmless CUDA lines of a "
                        "machine without a GPU are left out)")
    s.add_argument("--drain-timeout", type=int, default=DRAIN_TIMEOUT_S,
                   help="on SIGTERM/Ctrl-C, seconds that requests in flight may take to finish (default: %(default)s)")
    s.add_argument("--stall-timeout", type=float, default=60,
                   help="CPU: stop and exit non-zero when a model holds pending requests and completes none for "
                        "this many seconds (0: never; default: %(default)s)")
    s.add_argument("--dry-run", action="store_true", help="GPU: print the docker command only")
    s.add_argument("--image", default=container.SERVING_IMAGE,
                   help="GPU: the serving image (default: %(default)s, built by `make gpu-image`)")
    s.add_argument("--allow-image-mismatch", action="store_true",
                   help="GPU, outside the image: serve with an image built from other code than this checkout")
    s.add_argument("--openai-port", type=int, help="also serve the OpenAI-compatible API on this port")
    _frontend_options(s, with_repo=False)
    s.set_defaults(handler=_serve)

    s = sub.add_parser("openai", help="the OpenAI-compatible API in front of a running Triton (CPU or GPU)",
                       **example("python -m model_repo openai --triton 127.0.0.1:8001 --port 9000 --repo "
                                 "artifacts/smollm2-135m-instruct/model_repository"))
    s.add_argument("--triton", default="127.0.0.1:8001", help="Triton's gRPC address (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=9000)
    _frontend_options(s, with_repo=True)
    s.set_defaults(handler=_openai)

    s = sub.add_parser("demo", help="serve, ask one question over gRPC streaming, stop",
                       **example("python -m model_repo demo --repo artifacts/smollm2-135m-instruct/model_repository"))
    s.add_argument("--repo", required=True)
    s.add_argument("--prompt", default="What is the capital of France?")
    s.add_argument("--max-tokens", type=int, default=64)
    s.set_defaults(handler=_demo)
    return p


def _frontend_options(s, with_repo: bool) -> None:
    if with_repo:
        s.add_argument("--repo", help="the served repository (its manifest names the model)")
    s.add_argument("--model-name", help="the model id clients send (default: the repository's source model)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` (or set HERMES_API_KEY)")
    s.add_argument("--default-max-tokens", type=int, default=256, help="when a request names none")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="larger request bodies are refused with 413 (default: %(default)s)")


main = cli.entry(parser)


if __name__ == "__main__":
    sys.exit(main())
