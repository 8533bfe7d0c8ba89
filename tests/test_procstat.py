"""benchmarks.procstat on real processes: a stand-in "server" that listens on a port and starts two
stand-in python-backend stubs of one model, which burn CPU when told to."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

SERVER = """
import socket, subprocess, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
stub, model_py = sys.argv[1], sys.argv[2]
# argv[0] as Triton starts a stub: .../triton_python_backend_stub <repo>/<model>/1/model.py ...
kids = [subprocess.Popen([stub, model_py, "shm_region", "1048576"], executable=sys.executable) for _ in range(2)]
print(s.getsockname()[1], " ".join(str(k.pid) for k in kids), flush=True)
time.sleep(60)
"""

BURNER = """
import os, sys, time
go = os.path.join(os.path.dirname(__file__), "go")
while not os.path.exists(go):
    time.sleep(0.01)
t0 = time.process_time()
while time.process_time() - t0 < 0.3:  # 0.3 s of CPU, however busy the machine is
    pass
open(go + f".{os.getpid()}", "w").close()
time.sleep(60)
"""


@pytest.fixture
def fake_server(tmp_path):
    """(port, server Popen, stub pids, the folder where `go` starts the burn)."""
    model_dir = tmp_path / "repo" / "burner" / "1"
    model_dir.mkdir(parents=True)
    (model_dir / "model.py").write_text(BURNER)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "triton_python_backend_stub"),
                               str(model_dir / "model.py")], stdout=subprocess.PIPE, text=True)
    stubs = []
    try:
        port, *stubs = (int(x) for x in server.stdout.readline().split())
        yield port, server, stubs, model_dir
    finally:
        import psutil

        for pid in stubs:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        server.kill()
        server.wait()


def test_each_process_cpu_over_a_window_is_measured_by_name(fake_server):
    from benchmarks.procstat import CpuWindow, ServerProcesses

    port, server, stubs, model_dir = fake_server
    found, why = ServerProcesses.find(f"127.0.0.1:{port}")
    assert why is None, why
    assert {n: p.pid for n, p in found.processes.items()} == {"tritonserver": server.pid, "burner#1": min(stubs),
                                                              "burner#2": max(stubs)}
    with CpuWindow(found) as window:
        (model_dir / "go").touch()
        deadline = time.monotonic() + 30
        while len(list(model_dir.glob("go.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    per = window.per_token(tokens=1000)
    for stub in ("burner#1", "burner#2"):
        assert 0.29 <= per[stub]["cpu_s"] < 0.6  # the burn (one clock tick of slack) and not much more
        assert per[stub]["us_per_token"] == pytest.approx(per[stub]["cpu_s"] * 1e3)
    assert per["tritonserver"]["cpu_s"] < 0.1  # asleep meanwhile


def test_a_frontend_is_found_by_its_port_or_pid_and_never_counted_twice(fake_server):
    from benchmarks.procstat import ServerProcesses

    port, server, _, _ = fake_server
    found, _ = ServerProcesses.find(None, f"http://localhost:{port}/v1")
    assert list(found.processes) == ["frontend"] and found.processes["frontend"].pid == server.pid
    found, _ = ServerProcesses.find(f"127.0.0.1:{port}", openai_pid=server.pid)
    assert "frontend" not in found.processes and found.missing == ["frontend: it is one of the server's own processes"]
