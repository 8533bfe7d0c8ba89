"""A newcomer's first hour (issue 32): a server that cannot start says why in one line and leaves nothing
running; the CLIs' errors name the fix."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from build_engine import UserError
from tests.test_reliability import processes_mentioning


@pytest.fixture(scope="module")
def tiny_repo(tiny_engine, tmp_path_factory) -> Path:
    from model_repo.generate import generate

    return generate(tiny_engine, tmp_path_factory.mktemp("first-hour") / "repo")


@contextlib.contextmanager
def listening_socket():
    """A port something already listens on (and never answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


class StubWatch:
    """Records, while it runs, the processes whose command line names `text` (the python backend stubs of a
    repository) and the /dev/shm regions they name."""

    def __init__(self, text: str):
        self.text, self.pids, self.regions = text, set(), set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._done.wait(0.1):
            for p in psutil.process_iter(["cmdline"]):
                args = p.info["cmdline"] or []
                if any(self.text in a for a in args):
                    self.pids.add(p.pid)
                    self.regions.update(a for a in args if a.startswith("triton_python_backend_shm_region_"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


# -- a failed start cleans up -------------------------------------------------------------------------

def test_a_triton_that_cannot_bind_its_port_names_it_and_leaves_no_stub_or_shm_region(tiny_repo):
    """Triton loads the models (their stubs start) before it binds gRPC; on a busy port it exits, and its
    stubs would live on under PID 1 holding their /dev/shm regions. start() must end them and say which
    port and which flag, in one line."""
    from model_repo.server import Ports, TritonServer, free_port

    with listening_socket() as busy, StubWatch(f"{tiny_repo}/") as watch:
        server = TritonServer(tiny_repo, ports=Ports(free_port(), busy, free_port()))
        with pytest.raises(UserError) as e:
            server.start(timeout_s=120)
    message = str(e.value)
    assert f"port {busy} " in message and "--grpc-port" in message and "\n" not in message, message
    assert watch.pids and watch.regions, "the stubs never started: the cleanup was not exercised"
    assert processes_mentioning(f"{tiny_repo}/") == []
    assert [r for r in watch.regions if (Path("/dev/shm") / r).exists()] == []


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port", "--openai-port"])
def test_serve_on_a_busy_port_fails_at_once_naming_the_port_and_its_flag(tiny_repo, flag, capsys):
    from model_repo.__main__ import main
    from model_repo.server import free_port

    ports = {f: str(free_port()) for f in ("--http-port", "--grpc-port", "--metrics-port", "--openai-port")}
    with listening_socket() as busy:
        ports[flag] = str(busy)
        code = main(["serve", "--repo", str(tiny_repo), "--quiet", *[x for kv in ports.items() for x in kv]])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: port {busy} on 127.0.0.1 is already in use") and flag in err, err
    assert err.count("\n") == 1
    assert processes_mentioning(f"{tiny_repo}/") == []


@pytest.mark.parametrize("line, port, flag", [
    ("E1208 00:29:41.663586 6888 main.cc:245] \"failed to start GRPC service: Unavailable - Socket "
     "'127.0.0.1:8001' already in use \"", 8001, "--grpc-port"),
    ("E1208 00:31:58.400853 8635 main.cc:293] \"failed to start Metrics service: Unavailable - Socket "
     "'127.0.0.1:8002' already in use \"", 8002, "--metrics-port"),
])
def test_tritons_bind_failure_is_read_as_the_port_and_the_flag_that_moves_it(line, port, flag):
    """The lines are Triton 2.51's own, seen with the port held."""
    from model_repo.server import Ports, busy_port_message

    message = busy_port_message(["I1208 something else", line], Ports(8000, 8001, 8002))
    assert message == (f"port {port} on 127.0.0.1 is already in use (another server?): stop what holds it or "
                       f"choose another with {flag} (make serve {flag[2:-5].upper()}_PORT=...)")
