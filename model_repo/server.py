"""Launch the real `tritonserver` that the nvidia-pytriton wheel carries (Triton 2.51, python
backend), on loopback by default; wait for readiness; stop cleanly.

    with TritonServer(repo) as server:
        print(server.grpc_url)
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from build_engine import UserError


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


DRAIN_TIMEOUT_S = 30  # Triton's own default for --exit-timeout-secs


def tritonserver_args(repo: Path, host: str, ports: Ports, drain_timeout_s: int = DRAIN_TIMEOUT_S) -> list[str]:
    """The serving flags every launch shares (CPU, GPU container, inside the container): HTTP, gRPC
    and metrics all bound to `host` (loopback unless the user says otherwise); on SIGINT/SIGTERM
    Triton refuses new requests and lets those in flight (streams included) finish for up to
    `drain_timeout_s` before it exits anyway. No model-control API: Triton's default mode, "none"."""
    return [
        f"--model-repository={repo}",
        f"--http-address={host}", f"--http-port={ports.http}",
        f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}", f"--metrics-port={ports.metrics}",
        f"--exit-timeout-secs={drain_timeout_s}",
    ]


PORT_FLAGS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port"}

# Triton's log line when a listener cannot bind, e.g.
# `failed to start GRPC service: Unavailable - Socket '127.0.0.1:8001' already in use`
BUSY_SOCKET = re.compile(r"Socket '(?P<host>[^']*):(?P<port>\d+)' already in use")


MAKE_VARIABLES = {"--http-port": "HTTP_PORT", "--grpc-port": "GRPC_PORT", "--metrics-port": "METRICS_PORT",
                  "--openai-port": "OPENAI_PORT"}  # the Makefile's names for serve's port flags


def port_in_use(host: str, port: int, flag: str) -> str:
    make = f" (make serve {MAKE_VARIABLES[flag]}=...)" if flag in MAKE_VARIABLES else ""
    return (f"port {port} on {host} is already in use (another server?): stop what holds it or choose another "
            f"with {flag}{make}")


def busy_port_message(log_lines: list[str], ports: Ports) -> str | None:
    """One line naming the port that Triton could not bind and the flag that moves it, or None."""
    for line in log_lines:
        m = BUSY_SOCKET.search(line)
        if m:
            port = int(m["port"])
            flags = [flag for name, flag in PORT_FLAGS.items() if getattr(ports, name) == port]
            return port_in_use(m["host"], port, flags[0] if flags else "--http-port/--grpc-port/--metrics-port")
    return None


def check_ports_free(host: str, flags: dict[str, int]) -> None:
    """Refuse up front a port that something already listens on ({flag: port}), rather than after Triton has
    spent its load time. SO_REUSEADDR as the servers set it: a port in TIME_WAIT is free for them too."""
    for flag, port in flags.items():
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UserError(port_in_use(host, port, flag)) from None
                raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): choose another with {flag}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise UserError("the CPU server needs nvidia-pytriton==0.7.0 (pip install 'hermes-trtllm[serve]')") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise UserError(f"{root} has no bin/tritonserver: reinstall nvidia-pytriton")
    return root


def python_env() -> dict[str, str]:
    """Environment in which the python-backend stub finds this Python's libpython and packages."""
    root = pytriton_root()
    libs = [sysconfig.get_config_var("LIBDIR"), str(root.parent.parent / "nvidia_pytriton.libs")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    # The stub runs models with the first python3 on PATH: make it this interpreter's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def backend_dir(cache: Path) -> Path:
    """backends/ with the python backend and the stub for this Python version."""
    root = pytriton_root()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no python backend stub for Python {ver}")
    dest = cache / f"triton-backends-py{ver}"
    if not (dest / "python" / "triton_python_backend_stub").is_file():
        from build_engine import manifest

        with manifest.staging(dest) as tmp:
            shutil.copytree(root / "backends", tmp, dirs_exist_ok=True)
            shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
    return dest


def check_stub(backends: Path, env: dict[str, str]) -> None:
    """A stub that cannot load its libpython makes tritonserver hang in model load: refuse early."""
    stub = backends / "python" / "triton_python_backend_stub"
    out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        raise UserError(f"the python backend stub cannot load {', '.join(missing)}; "
                        f"install a shared-library build of Python {sys.version_info.major}.{sys.version_info.minor}")


# Lines of the CPU server's log that are harmless and that newcomers read as failures: Triton built for CUDA
# says so on a machine without a GPU (errors that change nothing here), and python-backend models keep their
# tokenizer folder beside the version folder. Forwarded with serve --verbose, always kept in the log itself.
HARMLESS = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient",
            "ignore version directory 'tokenizer'")
EMPTY_LOG_LINE = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ?$")  # the header line of a table


def is_log_noise(line: str) -> bool:
    """A harmless CUDA line, or part of the tables Triton prints once loaded (backends, models, options:
    a header line with no message, rows starting with + or |, and the blank line after them)."""
    line = line.rstrip("\n")
    return (not line.strip() or line[:1] in "+|" or bool(EMPTY_LOG_LINE.match(line))
            or any(text in line for text in HARMLESS))


SHM_DIR = Path("/dev/shm")
STUB_GRACE_S = 2.0  # stubs of a server that stopped cleanly are gone by then; the others are killed


def session_processes(sid: int) -> list:
    """The processes of session `sid` other than its leader. tritonserver runs in a session of its own
    (start_new_session), so its python backend stubs are there, and stay there once reparented to PID 1."""
    import psutil

    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if p.pid != sid and os.getsid(p.pid) == sid:
                found.append(p)
    return found


def stub_shm_regions(procs) -> set[str]:
    """The /dev/shm regions that python backend stubs name on their command lines."""
    import psutil

    regions = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            regions.update(a for a in p.cmdline() if "shm_region" in a and "/" not in a)
    return regions


def reap_session(sid: int, known_regions: set[str] = frozenset(), grace_s: float = STUB_GRACE_S) -> None:
    """After tritonserver (the leader of session `sid`) has exited: a stub still running would live on under
    PID 1, ignoring SIGTERM and holding its memory and /dev/shm region (seen when Triton exits during load,
    e.g. on a busy port). Give stragglers `grace_s` to leave, SIGKILL the rest, then remove the regions that
    the server's stubs named and that nobody removed."""
    import psutil

    left = session_processes(sid)
    regions = set(known_regions) | stub_shm_regions(left)
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    for name in regions:
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()


class StartCancelled(Exception):
    """start() was told to stop before the server was ready; the server is stopped."""


class TritonServer:
    def __init__(self, repo: Path, host: str = "127.0.0.1", ports: Ports | None = None,
                 log_file: Path | None = None, log_verbose: int = 0, cache: Path | None = None,
                 drain_timeout_s: int = DRAIN_TIMEOUT_S):
        from build_engine.sources import cache_dir

        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise UserError(f"model repository {repo} does not exist (run: python -m model_repo generate)")
        self.host = host
        self.ports = ports or Ports(free_port(), free_port(), free_port())
        self.log_file, self.log_verbose = log_file, log_verbose
        self.drain_timeout_s = int(drain_timeout_s)
        self.cache = cache or cache_dir()
        self.proc: subprocess.Popen | None = None
        self._log_thread: threading.Thread | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=5000)
        self._log_total = 0  # lines seen since start (the deque keeps the last 5000)
        self._shm_regions: set[str] = set()  # the stubs' /dev/shm regions, removed at stop if left

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}"

    def command(self, backends: Path) -> list[str]:
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            *tritonserver_args(self.repo, self.host, self.ports, self.drain_timeout_s),
            f"--backend-directory={backends}", "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
            "--exit-on-error=true", "--log-verbose", str(self.log_verbose),
        ]

    def start(self, timeout_s: float = 180.0, echo: bool = False,
              cancel: threading.Event | None = None, echo_all: bool = False) -> "TritonServer":
        """Launch and wait until ready. On any failure, or `cancel` set before it is ready (StartCancelled),
        it stops what it started first. `echo` forwards the log to stderr, without its noise unless `echo_all`."""
        env = python_env()
        backends = backend_dir(self.cache)
        check_stub(backends, env)
        self.proc = subprocess.Popen(self.command(backends), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._log_thread = threading.Thread(target=self._pump, args=(echo, echo_all), daemon=True)
        self._log_thread.start()
        try:
            self._wait_ready(timeout_s, cancel)
        except BaseException:  # a failed start (or Ctrl-C during it) leaves nothing running
            self.stop()
            raise
        self._shm_regions = stub_shm_regions(session_processes(self.proc.pid))
        return self

    def _wait_ready(self, timeout_s: float, cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(self.exit_message())
            # Triton reports ready once HTTP is up, before it binds the metrics port (and exits if it can't).
            if self.ready() and self._metrics_up():
                return
            if cancel is None:
                time.sleep(0.25)
            elif cancel.wait(0.25):
                raise StartCancelled()
        raise UserError(f"tritonserver was not ready after {timeout_s:.0f} s")

    def exit_message(self) -> str:
        """Why tritonserver exited: a busy port in one line, else its error lines."""
        if self._log_thread:
            self._log_thread.join(timeout=5)
        busy = busy_port_message(self.log_lines, self.ports)
        if busy:
            return f"tritonserver could not start: {busy}"
        return (f"tritonserver exited with code {self.proc.returncode}:\n"
                + "\n".join(self.load_errors() or self.log_lines[-15:]))

    @property
    def log_lines(self) -> list[str]:
        return list(self._log)

    def log_mark(self) -> int:
        """A position in the log, for `logs_since`."""
        return self._log_total

    def logs_since(self, mark: int) -> list[str]:
        new = self._log_total - mark
        return list(self._log)[-new:] if new > 0 else []

    def load_errors(self) -> list[str]:
        """The server's error lines (a model that failed to load says why here)."""
        return [line for line in self.log_lines if line[:1] == "E" and line[1:5].isdigit() and not is_log_noise(line)]

    def _pump(self, echo: bool, echo_all: bool) -> None:
        assert self.proc and self.proc.stdout
        log = open(self.log_file, "a") if self.log_file else None
        for line in self.proc.stdout:
            self._log.append(line.rstrip("\n"))
            self._log_total += 1
            if echo and (echo_all or not is_log_noise(line)):
                sys.stderr.write(line)
            if log:
                log.write(line)
                log.flush()
        if log:
            log.close()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def _metrics_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.ports.metrics}/metrics", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        """Drain and stop: SIGINT, then wait for the drain (and model unloading) before killing. Whether
        tritonserver was running or had exited already, no stub of it is left running."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.drain_timeout_s + 30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log_thread:
            self._log_thread.join(timeout=5)
        reap_session(self.proc.pid, self._shm_regions)
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class StallWatchdog:
    """Triton 2.51's python backend can deadlock under heavy load (RELIABILITY.md): a model's requests
    then wait for ever while Triton still reports ready. A model whose requests wait to be executed
    (Triton's nv_inference_pending_request_count > 0) while it completes none
    (nv_inference_request_success + _failure unchanged) for `stall_s` is stalled; `serve` then stops
    the server and exits non-zero, so that its supervisor (Kubernetes, systemd) restarts it. Healthy
    models here never hold pending requests for long: their execute() hands each request to a thread."""

    def __init__(self, metrics_url: str, stall_s: float = 60.0):
        self.metrics_url, self.stall_s = metrics_url, stall_s
        self._last: dict[str, float] = {}   # model -> completed count when its pending wait began
        self._since: dict[str, float] = {}  # model -> when it began

    def sample(self) -> dict[str, tuple[float, float]]:
        """{model: (pending, completed)} from Triton's metrics endpoint."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            text = r.read().decode()
        pending: dict[str, float] = {}
        done: dict[str, float] = collections.defaultdict(float)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                model = s.labels.get("model")
                if s.name == "nv_inference_pending_request_count":
                    pending[model] = s.value
                elif s.name in ("nv_inference_request_success", "nv_inference_request_failure"):
                    done[model] += s.value
        return {m: (n, done[m]) for m, n in pending.items()}

    def check(self, sample: dict[str, tuple[float, float]], now: float) -> str | None:
        """A description of the first stalled model, or None."""
        for model, (pending, completed) in sample.items():
            if not pending or self._last.get(model) != completed:
                self._since.pop(model, None)
                self._last[model] = completed
                if not pending:
                    continue
            since = self._since.setdefault(model, now)
            if now - since >= self.stall_s:
                return (f"model {model} has held {int(pending)} pending requests and completed none for "
                        f"{now - since:.0f} s")
        return None

    def poll(self) -> str | None:
        try:
            return self.check(self.sample(), time.monotonic())
        except OSError:  # the endpoint is busy or the server is stopping: no verdict this time
            return None


WORKER_FLAG = "--model-control-mode=explicit"  # what tells a leader-mode worker rank from the leader


def leader_mode(server_args: list[str], world_size: int, engine_model: str = "tensorrt_llm") -> list[str]:
    """A tensor-parallel engine (world size > 1) as the TensorRT-LLM backend runs it in leader mode
    (TensorRT-LLM 1.2 triton_backend/scripts/launch_triton_server.py, and the backend README's
    "Leader Mode"): one tritonserver per GPU under one mpirun, MPI rank r on GPU r. Rank 0 loads the
    whole repository and serves HTTP, gRPC and metrics; the other ranks load only the engine model and
    never finish loading it (the backend holds them in its executor until the leader exits), so their
    listeners never open and the same ports are safe. Each rank gets its own python backend shared-
    memory prefix. Leader mode rather than the orchestrator mode: it is the backend's launch for one
    model over several GPUs, needs no MPI_Comm_spawn, and works under Slurm and in one pod alike."""
    cmd = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        cmd += [":"] if rank else []
        cmd += ["-n", "1", "tritonserver", *server_args]
        if rank:
            cmd += [WORKER_FLAG, f"--load-model={engine_model}"]
        cmd += ["--disable-auto-complete-config", f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
    return cmd


def gpu_command(repo: Path, host: str, ports: Ports, image: str, inside_container: bool,
                drain_timeout_s: int = DRAIN_TIMEOUT_S) -> list[str]:
    """tritonserver with the TensorRT-LLM backend for a GPU repository (under mpirun in leader mode
    for a tensor-parallel engine), inside the serving image. Elsewhere, docker runs this same `serve`
    inside the image (so that the one process that relays stop signals, `stop_signal`, is there too),
    with the repository and the engine mounted read-only at the paths the configs name, and host
    networking so that the loopback binding means the host's loopback."""
    from build_engine import manifest

    repo = Path(repo).resolve()
    engine = Path(manifest.read(repo, "triton-repository")["engine"]["path"])
    if not (engine / "manifest.json").is_file():
        raise UserError(f"the engine {engine} that {repo} serves is not there: run serve where the repository "
                        "was generated (paths are recorded as they were), or regenerate it")
    if inside_container:
        world_size = int(manifest.read(engine).get("world_size", 1))
        server_args = tritonserver_args(repo, host, ports, drain_timeout_s)
        return leader_mode(server_args, world_size) if world_size > 1 else ["tritonserver", *server_args]
    mounts = [x for d in dict.fromkeys([repo, engine]) for x in ("-v", f"{d}:{d}:ro")]
    serve = ["python3", "-m", "model_repo", "serve", "--repo", str(repo), "--host", host,
             "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
             "--drain-timeout", str(drain_timeout_s)]
    # --init: a process that reaps orphans as PID 1 and passes docker's signals on to `serve`.
    # NCCL between the ranks of a tensor-parallel engine needs the host's IPC namespace, unlimited
    # locked memory and a large stack (TensorRT-LLM's docker/Makefile runs its containers so). The host's
    # IPC namespace brings the host's /dev/shm, so no --shm-size: docker ignores it there, podman refuses it.
    return ["docker", "run", "--rm", "--init", "--gpus", "all", "--network", "host", "--ipc", "host",
            "--ulimit", "memlock=-1", "--ulimit", "stack=67108864", *mounts, image, *serve]


SOURCE_LABEL = "hermes-trtllm.source"  # the Dockerfile's LABEL: build_engine.manifest.source_digest()


INSPECT_FORMAT = f'{{{{ index .Config.Labels "{SOURCE_LABEL}" }}}}'


def check_serving_image(image: str, allow_mismatch: bool = False) -> str | None:
    """Outside the image, `serve` runs the image's own copy of the project: refuse an image built from
    other code than this (it could lack what this `serve` relies on, or behave otherwise) unless
    `allow_mismatch`. None when the image holds this code, else a warning to print."""
    from build_engine import manifest

    done = subprocess.run(["docker", "image", "inspect", "--format", INSPECT_FORMAT, image],
                          capture_output=True, text=True)
    if done.returncode != 0:
        err = done.stderr.strip() or f"docker image inspect exited with {done.returncode}"
        if "no such image" in err.lower() or "image not known" in err.lower():  # docker's words, podman's
            raise UserError(f"the serving image {image} is not on this host: build it with `make gpu-image`, or "
                            "docker pull it")
        raise UserError(f"could not inspect the serving image {image}: {err}")
    label, ours = done.stdout.strip(), manifest.source_digest()
    if label in ("", "<no value>", "unknown"):
        return (f"warning: the serving image {image} does not say which code it holds (no {SOURCE_LABEL} label): "
                "if it was built from another version of this project, rebuild it with `make gpu-image`")
    if label != ours:
        problem = (f"the serving image {image} holds other code than this checkout (source {label[:12]}, here "
                   f"{ours[:12]}), and serve runs the image's copy")
        if allow_mismatch:
            return f"warning: {problem} (--allow-image-mismatch)"
        raise UserError(f"{problem}: rebuild it with `make gpu-image` (or pass --allow-image-mismatch)")
    return None


def stop_signal(proc: subprocess.Popen, sig: int) -> None:
    """Pass a stop signal (SIGINT, SIGTERM) on to the server that `proc` runs, so that Triton drains.
    A tensor-parallel engine's mpirun is not signalled itself. Measured with Debian 12's Open MPI 4.1.4:
    mpirun, on SIGTERM or SIGINT, signals its ranks after odls_base_sigkill_timeout (1 s by default) and
    SIGKILLs them the same time later, so ranks that needed 8 s to drain were killed 2 s after the
    SIGTERM (a larger timeout only delays the ranks' SIGTERM as much). That would cut Triton's drain to
    a second. The ranks get the signal instead, as the backend's docs stop a leader-mode server
    (`pkill tritonserver`), but in order: the leader (which serves every request) first, and the
    workers once it has exited. A worker stopping first could end the job under the draining leader:
    mpirun aborts the whole job when one rank exits non-zero. mpirun exits once its ranks have."""
    if proc.poll() is not None:  # gone already (its pid may be another process's by now)
        return
    if Path(str(proc.args[0])).name == "mpirun":  # inside the serving image, where [container] has psutil
        import psutil

        try:
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "tritonserver"]
            leaders = [p for p in ranks if WORKER_FLAG not in p.cmdline()]
        except psutil.NoSuchProcess:
            ranks, leaders = [], []
        if ranks:
            workers = [p for p in ranks if p not in leaders]
            _signal_all(leaders or workers, sig)
            if leaders and workers:
                threading.Thread(target=_signal_after, args=(leaders, workers, sig), name="stop-workers",
                                 daemon=True).start()
            return
    proc.send_signal(sig)  # tritonserver itself, docker (which passes it on), or an mpirun with no rank yet


def _signal_all(procs, sig: int) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _signal_after(first, then, sig: int) -> None:
    """Signal `then` once every process of `first` has exited."""
    import psutil

    psutil.wait_procs(first)
    _signal_all(then, sig)
