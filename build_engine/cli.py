"""Shared CLI plumbing: one-line errors with exit code 1, HERMES_DEBUG=1 for a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from build_engine import UserError


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except (UserError, ValueError, KeyError, OSError) as e:
        if os.environ.get("HERMES_DEBUG"):
            traceback.print_exc()
        hint = "" if os.environ.get("HERMES_DEBUG") or isinstance(e, UserError) else " (HERMES_DEBUG=1 for a traceback)"
        print(f"error: {str(e).strip(chr(39)) if isinstance(e, KeyError) else e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def quiet_progress() -> bool:
    """Progress bars only on a terminal (and never under --quiet / CI logs)."""
    return not sys.stderr.isatty() or bool(os.environ.get("HERMES_QUIET"))
