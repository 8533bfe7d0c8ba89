"""The serving path's CPU cost: which local processes serve a deployment (tritonserver, its python-backend
stubs named by model, an OpenAI frontend), their CPU time (user + system) around a timed window, and the
CPU microseconds each spends per streamed token.

    found, why_not = ServerProcesses.find("127.0.0.1:8001", "http://127.0.0.1:9000/v1")
    with CpuWindow(found) as window:
        ...  # the timed requests
    window.per_token(tokens)  # {"tritonserver": {"cpu_s": 1.2, "us_per_token": 230.0}, ...}

CPU time, unlike wall-clock tok/s, does not depend on what else the machine runs, so a per-token cost
measured on a busy 2-core machine still says at what rate one process (one GIL) saturates.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

TRITONSERVER = "tritonserver"
FRONTEND = "frontend"
STUB_EXECUTABLE = "triton_python_backend_stub"
OTHER_PREFIX = "other:"  # a child of tritonserver that is not a python-backend stub


def host_port(url: str) -> tuple[str | None, int | None]:
    """Host and port of `host:port` (gRPC) or `http://host:port/...`; the scheme's port when none is given."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"//{url}")
    try:
        port = parts.port
    except ValueError:
        return parts.hostname, None
    return parts.hostname, port or {"http": 80, "https": 443}.get(parts.scheme)


def is_local_host(host: str) -> bool:
    """Whether `host` names this machine: loopback, a wildcard address, or one of its interfaces' addresses."""
    import psutil

    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    own = {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic}
    return any(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in ("0.0.0.0", "::") or a in own
               for a in addrs)


def listening_pid(port: int) -> tuple[int | None, str | None]:
    """The pid of the process listening on TCP `port` here, or None and why not."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None, "not permitted to list this machine's sockets (run as root, or pass the pid)"
    listeners = [c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    if not listeners:
        return None, f"nothing listens on port {port} here"
    pid = next((c.pid for c in listeners if c.pid), None)
    if pid is None:  # another user's or another namespace's socket: psutil sees it but not its owner
        return None, f"the process listening on port {port} is not visible here (pass the pid)"
    return pid, None


def stub_model(cmdline: list[str]) -> str | None:
    """The model a python-backend stub runs, from its command line
    `.../triton_python_backend_stub <repo>/<model>/<version>/model.py ...`; None for any other process."""
    if not cmdline or Path(cmdline[0]).name != STUB_EXECUTABLE:
        return None
    script = next((a for a in cmdline[1:] if a.endswith(".py")), None)
    return Path(script).parent.parent.name if script else None


def child_names(children: list[tuple[int, str, list[str]]]) -> dict[int, str]:
    """Names for tritonserver's children, given (pid, process name, command line) each: a stub by its
    model, `#1`, `#2`… (in pid order) when a model has several instances; anything else `other:<name>`."""
    base = {pid: stub_model(cmd) or f"{OTHER_PREFIX}{name}" for pid, name, cmd in children}
    names = {}
    for pid in sorted(base):
        same = sorted(p for p, b in base.items() if b == base[pid])
        names[pid] = base[pid] if len(same) == 1 else f"{base[pid]}#{same.index(pid) + 1}"
    return names


def base_name(name: str) -> str:
    """The model (or process) a measured process belongs to: `tensorrt_llm_bls#2` -> `tensorrt_llm_bls`."""
    return name.split("#", 1)[0]


@dataclass
class ServerProcesses:
    """The local processes of one deployment, by name (`tritonserver`, stub models, `frontend`).
    `missing` lists what was asked for and not found (a frontend that nothing serves), with why."""
    processes: dict  # name -> psutil.Process
    missing: list[str] = field(default_factory=list)

    @classmethod
    def find(cls, grpc_url: str | None, openai_url: str | None = None, server_pid: int | None = None,
             openai_pid: int | None = None) -> tuple[ServerProcesses | None, str | None]:
        """The tritonserver listening on `grpc_url`'s port (or `server_pid`) with all its children, and
        the OpenAI frontend listening on `openai_url`'s port (or `openai_pid`). Returns the processes and
        None, or None and why nothing could be measured (a remote host, a closed port, no permission)."""
        procs, missing = {}, []
        for name, url, pid in ((TRITONSERVER, grpc_url, server_pid), (FRONTEND, openai_url, openai_pid)):
            if url is None and pid is None:
                continue
            proc, why = _locate(url, pid)
            if proc is None:
                missing.append(f"{name}: {why}")
                continue
            procs[name] = proc
            if name == TRITONSERVER:
                procs.update(_children(proc))
        if not procs:
            return None, "; ".join(missing) or "no server address or pid given"
        if FRONTEND in procs and procs[FRONTEND] in [p for n, p in procs.items() if n != FRONTEND]:
            del procs[FRONTEND]  # counted once already: its CPU would be counted twice
            missing.append(f"{FRONTEND}: it is one of the server's own processes")
        return cls(procs, missing), None

    def snapshot(self) -> dict[str, float]:
        """CPU seconds (user + system) each process has used so far; a process that has gone is left out
        (its cost over a window is then missing, not 0)."""
        import psutil

        out = {}
        for name, proc in self.processes.items():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            out[name] = t.user + t.system
        return out


def _locate(url: str | None, pid: int | None):
    """(psutil.Process, None) for an explicit pid or the process listening on the URL's port, or (None, why)."""
    import psutil

    if pid is None:
        host, port = host_port(url)
        if host is None or port is None:
            return None, f"cannot tell host and port from {url!r}"
        if not is_local_host(host):
            return None, f"{host} is not this machine (CPU time is read from local processes only)"
        pid, why = listening_pid(port)
        if pid is None:
            return None, why
    try:
        return psutil.Process(pid), None
    except psutil.Error as e:
        return None, f"no process {pid} ({type(e).__name__})"


def _children(server) -> dict:
    """tritonserver's children (python-backend stubs, one per model instance), by name."""
    import psutil

    found = []
    for child in server.children(recursive=True):
        try:
            found.append((child, child.name(), child.cmdline()))
        except psutil.Error:  # gone between listing and reading
            continue
    names = child_names([(c.pid, name, cmd) for c, name, cmd in found])
    return {names[c.pid]: c for c, _, _ in found}


def cpu_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, dict]:
    """Each process's CPU seconds between two snapshots and CPU µs per streamed token. A process missing
    from either snapshot has cpu_s None; with no tokens streamed, us_per_token is None (missing, never 0)."""
    out = {}
    for name in [*before, *(n for n in after if n not in before)]:
        cpu_s = after[name] - before[name] if name in before and name in after else None
        us = cpu_s * 1e6 / tokens if cpu_s is not None and tokens > 0 else None
        out[name] = {"cpu_s": cpu_s, "us_per_token": us}
    return out


def total_us_per_token(per_process: dict[str, dict]) -> float | None:
    """The whole serving path's CPU µs per token; missing when any process's share is."""
    values = [v["us_per_token"] for v in per_process.values()]
    return sum(values) if values and None not in values else None


class CpuWindow:
    """Snapshots of the processes' CPU time when the block starts and when it ends."""

    def __init__(self, processes: ServerProcesses):
        self.processes = processes
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    def __enter__(self) -> CpuWindow:
        self.before = self.processes.snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.after = self.processes.snapshot()

    def per_token(self, tokens: int) -> dict[str, dict]:
        return cpu_per_token(self.before, self.after, tokens)
