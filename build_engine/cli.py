"""CLI plumbing of build_engine, model_repo and benchmarks: the shared root (client.cli) and progress bars."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from build_engine import UserError
from client import cli


def entry(make_parser: Callable[[], argparse.ArgumentParser]) -> Callable[..., int]:
    """A package's `main(argv=None)` under the shared root (client.cli), with UserError as an error whose
    message says the fix."""
    return cli.entry(make_parser, self_explaining=(UserError,))


def quiet_progress() -> bool:
    """Progress bars only on a terminal (and never under --quiet / CI logs)."""
    return not sys.stderr.isatty() or bool(os.environ.get("HERMES_QUIET"))
