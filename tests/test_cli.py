"""The command-line root every package goes through (common.cli): examples that parse, one-line errors."""

from __future__ import annotations

import importlib
import shlex

import pytest

PACKAGES = ["build_engine", "model_repo", "benchmarks", "client"]


def commands(package: str):
    main = importlib.import_module(f"{package}.__main__")
    p = main.parser()
    (sub,) = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
    return p, sub.choices


@pytest.mark.parametrize("package", PACKAGES)
def test_every_command_has_an_example_that_parses(package):
    p, choices = commands(package)
    assert choices
    for name, s in choices.items():
        assert s.epilog and s.epilog.startswith("example:\n  "), f"{package} {name}: no example in --help"
        argv = shlex.split(s.epilog.split("\n", 1)[1])
        assert argv[:4] == ["python", "-m", package, name], s.epilog
        args = p.parse_args(argv[3:])
        assert args.handler is s.get_default("handler")


@pytest.mark.parametrize("debug", [False, True])
def test_an_error_is_one_line_with_the_hint_and_a_traceback_only_when_asked(debug, monkeypatch, capsys):
    from benchmarks.__main__ import main

    monkeypatch.setenv("HERMES_DEBUG", "1") if debug else monkeypatch.delenv("HERMES_DEBUG", raising=False)
    assert main(["roofline", "--preset", "tiny-hermes", "--gpu", "no-such-gpu"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no-such-gpu" in last
    assert ("Traceback" in err) == debug
    assert last.endswith("(HERMES_DEBUG=1 for a traceback)") != debug


def test_the_client_cli_goes_through_the_same_root_without_build_engine(capsys):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, client.__main__ as m; rc = m.main(['chat', '--prompt', "
                          "'hi', '--max-tokens', '0']); print(rc, 'build_engine' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "False"], out
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "max_tokens" in line
