"""The command-line root of every package (`python -m build_engine | model_repo | benchmarks | client`):
one-line errors with exit code 1, HERMES_DEBUG=1 for a traceback, 130 on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from common.errors import HermesError, UserError

DEBUG_HINT = " (HERMES_DEBUG=1 for a traceback)"


class UsageError(UserError):
    """A command-line mistake; its message names the fix (printed as it is, in one line)."""


class MissingDependency(UsageError, ImportError):
    """A package a command needs is not importable by this Python. Its message says how to install it."""


def require(*modules: str, install: str) -> None:
    """Import `modules` now, so that a command fails before it starts (not at its first request) when this
    Python lacks one; `install` is the pip command that provides them."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MissingDependency(f"{sys.executable} cannot import {e.name or name}: use the Python of the "
                                    f"environment the project is installed in (make: .venv/bin/python), or "
                                    f"install it here: {install}") from None


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, call the command's handler, turn an error into one line. A UserError's message already says
    the fix: it is printed without the traceback hint."""
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    debug = bool(os.environ.get("HERMES_DEBUG"))
    try:
        return int(handler(args) or 0)
    except (HermesError, ValueError, KeyError, OSError) as e:
        if debug:
            traceback.print_exc()
        message = str(e).strip("'") if isinstance(e, KeyError) else str(e)
        if isinstance(e, HermesError) and not isinstance(e, UserError):  # the class tells: UnavailableError ...
            message = f"{type(e).__name__}: {message}"
        hint = "" if debug or isinstance(e, UserError) else DEBUG_HINT
        print(f"error: {message}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry(make_parser: Callable[[], argparse.ArgumentParser]) -> Callable[..., int]:
    """A package's `main(argv=None)`: its parser under this root (`main = cli.entry(parser)`)."""
    def main(argv: Sequence[str] | None = None) -> int:
        return run(make_parser(), argv)

    return main


def example(command_line: str) -> dict:
    """A subcommand's `--help` ends with an example: `sub.add_parser(name, help=..., **example("python -m ..."))`."""
    return {"epilog": f"example:\n  {command_line}", "formatter_class": argparse.RawDescriptionHelpFormatter}


def program(name: str, doc: str | None, examples: str | None = None):
    """`python -m <name>`'s parser and its subcommands: (parser, subparsers)."""
    p = argparse.ArgumentParser(prog=f"python -m {name}", description=doc, epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, p.add_subparsers(title="commands")
