"""python -m client chat: stream answers from the deployed model (Ctrl-C cancels the answer)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from client import Client, Conversation
from common import cli
from common.cli import example, program

EXAMPLES = """examples:
  python -m client chat --url 127.0.0.1:8001
  python -m client chat --prompt "What is the capital of France?" --json
"""


# What `pip install .` from a checkout installs (the client alone: pyproject's base dependencies).
CLIENT_INSTALL = "pip install 'tritonclient[grpc,http]' numpy (or pip install . in a checkout)"


QUIT = ("/exit", "/quit")


def check_url(url: str) -> None:
    """gRPC addresses are HOST:PORT (or dns:///name:port); a URL with http:// reaches gRPC's name resolver as
    a `Misformatted domain name`, so say it here."""
    if "://" in url and not url.startswith("dns:"):
        raise cli.UsageError(f"--url {url}: the chat speaks gRPC to HOST:PORT without a scheme, Triton's gRPC port "
                             "(e.g. 127.0.0.1:8001; not the HTTP port 8000 or the OpenAI port)")


def chat(args) -> int:
    cli.require("numpy", "tritonclient.grpc", install=CLIENT_INSTALL)
    check_url(args.url)
    c = Client(args.url, model=args.model, timeout_s=args.timeout)
    conv = Conversation(c, system=args.system)
    if args.prompt is not None:
        reply = conv.say(args.prompt, max_tokens=args.max_tokens) if args.json else None
        if args.json:
            print(json.dumps({"text": reply.text, "finish_reason": reply.finish_reason,
                              "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                              "ttft_s": reply.ttft_s}))
        else:
            for chunk in conv.stream(args.prompt, max_tokens=args.max_tokens):
                print(chunk.text, end="", flush=True)
            print()
        return 0
    print(f"chat with the model at {args.url}; Ctrl-C cancels an answer; Ctrl-C at the prompt, Ctrl-D or /exit "
          "quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in QUIT:
            return 0
        if not line.strip():
            continue
        stream = conv.stream(line, max_tokens=args.max_tokens)
        print("model> ", end="", flush=True)
        try:
            for chunk in stream:
                print(chunk.text, end="", flush=True)
            print()
        except KeyboardInterrupt:
            stream.close()
            print(" [cancelled]")


def parser() -> argparse.ArgumentParser:
    p, sub = program("client", __doc__, EXAMPLES)
    s = sub.add_parser("chat", help="interactive chat (or one-shot with --prompt)",
                       **example('python -m client chat --url 127.0.0.1:8001 --prompt "What is 2 + 2?"'))
    s.add_argument("--url", default=os.environ.get("HERMES_URL", "127.0.0.1:8001"),
                   help="Triton's gRPC address, HOST:PORT (default: $HERMES_URL or 127.0.0.1:8001)")
    s.add_argument("--model", default="tensorrt_llm_bls",
                   help="the Triton model: tensorrt_llm_bls or ensemble (default: %(default)s)")
    s.add_argument("--system", help="a system message that starts the conversation")
    s.add_argument("--prompt", help="ask once and exit")
    s.add_argument("--json", action="store_true", help="with --prompt: print one JSON object")
    s.add_argument("--max-tokens", type=int, default=256, help="per answer (default: %(default)s)")
    s.add_argument("--timeout", type=float, help="deadline per answer, seconds (default: none)")
    s.set_defaults(handler=chat)
    return p


main = cli.entry(parser)


if __name__ == "__main__":
    sys.exit(main())
