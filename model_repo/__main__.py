"""python -m model_repo: generate | serve | demo."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from build_engine import UserError, cli, container

EXAMPLES = """examples:
  python -m model_repo generate --engine artifacts/smol/engine-cpu --output artifacts/smol/model_repository
  python -m model_repo serve --repo artifacts/smol/model_repository --grpc-port 8001
"""


def _generate(args) -> int:
    from model_repo.generate import generate

    print(generate(Path(args.engine), Path(args.output), args.max_batch_size, args.instances, args.max_queue_size))
    return 0


def _serve(args) -> int:
    from build_engine import manifest
    from model_repo.server import Ports, TritonServer

    repo = Path(args.repo).resolve()
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    m = manifest.read(repo, "triton-repository")
    if m["target"] == "gpu":
        return _serve_gpu(repo, ports, args)
    server = TritonServer(repo, args.host, ports)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start(echo=not args.quiet)
    print(f"serving {repo.name}: gRPC {server.grpc_url}  HTTP {server.http_url}  "
          f"metrics http://{args.host}:{args.metrics_port}/metrics  (Ctrl-C stops)", flush=True)
    while not stop.wait(0.5):
        if server.proc.poll() is not None:
            raise UserError(f"tritonserver exited with code {server.proc.returncode}")
    server.stop()
    return 0


def _serve_gpu(repo: Path, ports, args) -> int:
    """A GPU repository: tritonserver with the TensorRT-LLM backend, in this project's serving image."""
    import shutil
    import subprocess

    from model_repo.server import gpu_command

    inside = shutil.which("tritonserver") is not None  # the serving image runs it directly
    cmd = gpu_command(repo, args.host, ports, args.image, inside_container=inside)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    if not inside and shutil.which("docker") is None:
        raise UserError(f"serving a GPU engine needs tritonserver (inside {args.image}, built from "
                        f"{container.DEFAULT_IMAGE} with `make gpu-image`) or docker with the NVIDIA container toolkit")
    return subprocess.call(cmd)


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
    p = argparse.ArgumentParser(prog="python -m model_repo", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="commands")
    s = sub.add_parser("generate", help="write a Triton model repository for an engine")
    s.add_argument("--engine", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--max-batch-size", type=int)
    s.add_argument("--instances", type=int, default=1, help="instances of the python pre/post/BLS models")
    s.add_argument("--max-queue-size", type=int,
                   help="requests waiting for tensorrt_llm before Triton refuses more (default: 4 x max batch size)")
    s.set_defaults(handler=_generate)

    s = sub.add_parser("serve", help="serve a repository with Triton (bundled server on CPU, container on GPU)")
    s.add_argument("--repo", required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--quiet", action="store_true", help="do not forward the server log")
    s.add_argument("--dry-run", action="store_true", help="GPU: print the docker command only")
    s.add_argument("--image", default=container.SERVING_IMAGE,
                   help="GPU: the serving image (default: %(default)s, built by `make gpu-image`)")
    s.set_defaults(handler=_serve)

    s = sub.add_parser("demo", help="serve, ask one question over gRPC streaming, stop")
    s.add_argument("--repo", required=True)
    s.add_argument("--prompt", default="What is the capital of France?")
    s.add_argument("--max-tokens", type=int, default=64)
    s.set_defaults(handler=_demo)
    return p


def main(argv=None) -> int:
    return cli.run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
