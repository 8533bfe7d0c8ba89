"""Progress bars of build_engine, model_repo and benchmarks (the CLI root is common.cli)."""

from __future__ import annotations

import os
import sys


def quiet_progress() -> bool:
    """Progress bars only on a terminal (and never under --quiet / CI logs)."""
    return not sys.stderr.isatty() or bool(os.environ.get("HERMES_QUIET"))
