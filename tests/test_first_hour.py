"""A newcomer's first hour (issue 32): a server that cannot start says why in one line and leaves nothing
running; the CLIs' errors name the fix."""

from __future__ import annotations

import contextlib
import re
import shlex
import socket
import threading
from pathlib import Path

import pytest

from build_engine import UserError
from tests.test_reliability import processes_mentioning

ROOT = Path(__file__).resolve().parent.parent


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


def test_a_stop_signal_while_the_models_load_stops_everything_and_exits_0(tiny_repo):
    """SIGTERM to `serve` once the first model's stub runs, before Triton is ready: serve stops Triton and
    every stub, and exits 0 (a stop asked for, not a failure)."""
    import signal
    import subprocess
    import sys
    import time

    from model_repo.server import free_port

    proc = subprocess.Popen([sys.executable, "-m", "model_repo", "serve", "--repo", str(tiny_repo), "--quiet",
                             "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                             "--metrics-port", str(free_port())],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(pid != proc.pid for pid in processes_mentioning(f"{tiny_repo}/")):
            assert time.monotonic() < deadline and proc.poll() is None, "no stub started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        # On a loaded machine Triton can be ready before the signal lands: then serve drains and stops as
        # from serving. Either way: exit 0 and nothing left behind.
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
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


# -- benchmarks: errors that point the right way -----------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--url", "127.0.0.1:{port}"], "no Triton server is ready at 127.0.0.1:{port} (grpc): start one (make serve)"),
    (["--url", "127.0.0.1:{port}", "--protocol", "http"], "no Triton server is ready at 127.0.0.1:{port} (http)"),
    (["--url", "http://127.0.0.1:{port}"], "--url http://127.0.0.1:{port}: Triton's addresses are HOST:PORT"),
    (["--backend", "openai", "--url", "http://127.0.0.1:{port}/v1", "--model", "m"],
     "no OpenAI-compatible server answers GET http://127.0.0.1:{port}/v1/models: start one (make serve OPENAI_PORT"),
])
def test_a_sweep_with_no_server_at_its_url_fails_up_front_and_writes_nothing(argv, expected, tmp_path, capsys):
    from benchmarks.__main__ import main
    from model_repo.server import free_port

    port = free_port()  # nothing listens there
    argv = [a.format(port=port) for a in argv]
    assert main(["serve", *argv, "--out", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected.format(port=port)) and err.count("\n") == 1, err
    assert not (tmp_path / "results").exists()


def test_a_tokenizer_folder_that_does_not_exist_is_named_with_where_the_deployments_is(tmp_path, capsys):
    from benchmarks.__main__ import main

    missing = tmp_path / "artifacts" / "smol" / "model_repository" / "preprocessing" / "tokenizer"
    assert main(["serve", "--url", "127.0.0.1:1", "--input-len", "64", "--tokenizer", str(missing),
                 "--out", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: the tokenizer folder {missing} does not exist: a deployment's tokenizer is "
                   "REPO/preprocessing/tokenizer (make demo: artifacts/smollm2-135m-instruct/model_repository/"
                   "preprocessing/tokenizer)\n")


@contextlib.contextmanager
def openai_stand_in(status: int, body: bytes):
    """A real HTTP server answering GET /v1/models with `status` and `body`, as an OpenAI server would."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, body, model, expected", [
    (200, b'{"data": [{"id": "smollm2-135m-instruct"}]}', "smollm2-135m-instruct", None),
    (200, b'{"data": [{"id": "smollm2-135m-instruct"}]}', "gpt-4", "serves smollm2-135m-instruct, not 'gpt-4'"),
    (401, b'{"error": {}}', "m", "wants an API key: --api-key KEY"),
    (404, b"", "m", "answered 404: point --url at the API's base (http://HOST:PORT/v1)"),
])
def test_an_openai_target_is_checked_through_its_model_list(status, body, model, expected):
    from benchmarks.runner import Target, check_ready

    with openai_stand_in(status, body) as url:
        target = Target(url, model, "openai")
        if expected is None:
            check_ready(target)
        else:
            with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
                check_ready(target)


def test_a_triton_target_is_ready_with_its_model_and_named_without_it(tiny_server):
    from benchmarks.runner import Target, check_ready

    check_ready(Target(tiny_server.grpc_url, "tensorrt_llm_bls"))
    check_ready(Target(tiny_server.http_url.removeprefix("http://"), "ensemble", "http"))
    with pytest.raises(UserError, match="has no ready model 'bls2': --model bls or ensemble"):
        check_ready(Target(tiny_server.grpc_url, "bls2"))


# -- the README's commands are the ones that run, on the paths `make demo` builds ---------------------

OUTPUT_FLAGS = {"--output", "--out", "--report"}
PLACEHOLDER = re.compile(r"(^|[/:=])[A-Z][A-Z0-9_]{2,}([/:.]|$)")  # REPO, HOST:8001, REPO_OF_..., DIR


def makefile_variables() -> dict[str, str]:
    """The Makefile's variables with their defaults, $(...) expanded."""
    raw = dict(re.findall(r"^([A-Z_]+)\s*(?:\?=|:=|=)[ \t]*(.*)$", (ROOT / "Makefile").read_text(), re.M))

    def expand(value: str) -> str:
        return re.sub(r"\$\(([A-Z_]+)\)", lambda m: expand(raw.get(m[1], "")), value)

    return {name: expand(value) for name, value in raw.items()}


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), re.M))


COMMAND = re.compile(r"\s*(\S*/)?(python3?|make) ")  # the lines checked here; others (curl, kubectl) are not


def readme_commands() -> list[list[str]]:
    """Each python or make line of the README's fenced code blocks (continuations joined), as shell words."""
    lines, fence, pending = [], None, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = line.strip()[3:] if fence is None else None  # the open block's language, or None
            continue
        if fence not in ("", "bash", "sh"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        words = shlex.split(pending, comments=True) if COMMAND.match(pending) else []
        pending = ""
        if words and words[-1] == "&":
            words = words[:-1]
        if words:
            lines.append(words)
    return lines


def python_module_argv(words: list[str]) -> tuple[str, list[str]] | None:
    if len(words) > 2 and Path(words[0]).name.startswith("python") and words[1] == "-m":
        return words[2], words[3:]
    return None


def test_readme_python_commands_parse_with_their_packages_parsers():
    import importlib

    checked = 0
    for words in readme_commands():
        found = python_module_argv(words)
        if found is None or any(PLACEHOLDER.search(w) for w in found[1]):
            continue
        package, argv = found
        try:
            importlib.import_module(f"{package}.__main__").parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README: {shlex.join(words)} does not parse")
        checked += 1
    assert checked >= 10


def test_readme_make_commands_name_real_targets_and_variables():
    targets, variables = makefile_targets(), makefile_variables()
    make_lines = [w for w in readme_commands() if w[0] == "make"]
    assert make_lines
    for words in make_lines:
        settings = [w.split("=")[0] for w in words[1:] if "=" in w]
        goals = [w for w in words[1:] if "=" not in w]
        assert set(goals) <= targets, f"README: {shlex.join(words)}"
        assert set(settings) <= set(variables), f"README: {shlex.join(words)}"


def test_readme_artifact_paths_are_ones_make_demo_or_an_earlier_line_builds():
    """Following the README after `make demo` reuses what it built, not a 20-minute quantization of a new path."""
    v = makefile_variables()
    built = [v["CKPT"], v["CPU_ENGINE"], v["REPO"]]
    assert built[0] == "artifacts/smollm2-135m-instruct/checkpoint"
    for words in readme_commands():
        found = python_module_argv(words)
        if found is None:
            continue
        argv = found[1]
        outputs = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in OUTPUT_FLAGS]
        inputs = [w for w in argv if w.startswith("artifacts/") and w not in outputs]
        for path in inputs:
            assert any(path == b or path.startswith(b + "/") for b in built), \
                f"README: {shlex.join(words)} reads {path}, which neither make demo nor an earlier line builds"
        built += outputs


def test_a_missing_artifact_folder_is_said_not_to_exist_with_the_command_that_builds_it(tmp_path):
    from build_engine import manifest

    with pytest.raises(UserError) as e:
        manifest.read(tmp_path / "artifacts" / "smol" / "checkpoint", "trtllm-checkpoint")
    assert str(e.value) == (f"{tmp_path}/artifacts/smol/checkpoint does not exist: build it with python -m "
                            "build_engine quantize, or check the path (make demo builds "
                            "artifacts/smollm2-135m-instruct/checkpoint, engine-cpu and model_repository)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no manifest.json"):
        manifest.read(tmp_path / "empty")


# -- the client CLI checks its imports up front -------------------------------------------------------

def test_the_chat_cli_in_a_python_without_its_dependencies_says_how_to_install_them_before_the_banner():
    """`python -S` is this very Python without site-packages: no numpy, no tritonclient (the client
    package itself comes from the checkout, the current directory)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-S", "-m", "client", "chat", "--url", "127.0.0.1:1"], cwd=ROOT,
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {sys.executable} cannot import numpy: ") and \
        "pip install 'tritonclient[grpc,http]' numpy" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "chat with the model" not in done.stderr and done.stdout == ""


# -- the CPU server's log, quiet by default -----------------------------------------------------------

TRITON_LOG = """\
I1208 00:55:01.729554 23389 pinned_memory_manager.cc:283] "Pinned memory pool disabled"
E1208 00:55:01.729886 23389 server.cc:241] "CudaDriverHelper has not been initialized."
W1208 00:55:01.734949 23389 model_lifecycle.cc:111] "ignore version directory 'tokenizer' which fails to convert \
to integral number"
I1208 00:55:07.627948 23389 model_lifecycle.cc:839] "successfully loaded 'tensorrt_llm_bls'"
E1208 00:55:07.628464 23389 ensemble_scheduler.cc:1468] "unable to create stream for ensemble: CUDA driver version \
is insufficient for CUDA runtime version"
I1208 00:55:07.628759 23389 server.cc:674] \n\
+------------------+---------+--------+
| Model            | Version | Status |
+------------------+---------+--------+
| tensorrt_llm_bls | 1       | READY  |
+------------------+---------+--------+

E1208 00:56:00.000000 23389 model_lifecycle.cc:638] "failed to load 'tensorrt_llm': ValueError: bad engine"
I1208 00:55:07.632400 23389 grpc_server.cc:2558] "Started GRPCInferenceService at 127.0.0.1:56167"
"""  # Triton 2.51's own lines on this machine (the failed load made up in its format)


def test_the_cpu_servers_log_loses_its_cuda_noise_and_tables_and_keeps_the_rest():
    from model_repo.server import is_log_noise

    kept = [line for line in TRITON_LOG.splitlines(True) if not is_log_noise(line)]
    assert [line.split("] ", 1)[1].strip().strip('"') for line in kept] == [
        "Pinned memory pool disabled", "successfully loaded 'tensorrt_llm_bls'",
        "failed to load 'tensorrt_llm': ValueError: bad engine", "Started GRPCInferenceService at 127.0.0.1:56167"]


# -- the chat CLI: its URL checked up front, and ways out -----------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1:8001", "grpc://127.0.0.1:8001"])
def test_the_chat_refuses_a_url_with_a_scheme_before_it_starts(url, capsys):
    from client.__main__ import main

    assert main(["chat", "--url", url]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"error: --url {url}: the chat speaks gRPC to HOST:PORT without a scheme, Triton's "
                            "gRPC port (e.g. 127.0.0.1:8001; not the HTTP port 8000 or the OpenAI port)\n")
    assert captured.out == ""


@pytest.mark.parametrize("leave", ["/exit", "/quit", "ctrl-c"])
def test_the_chat_quits_on_exit_or_ctrl_c_at_the_prompt_without_asking_the_model(leave):
    """No server listens at the URL: a quit that reached the model would fail instead of exiting 0."""
    import signal
    import sys

    import pexpect

    from model_repo.server import free_port

    child = pexpect.spawn(sys.executable, ["-m", "client", "chat", "--url", f"127.0.0.1:{free_port()}"], cwd=str(ROOT),
                          encoding="utf-8", timeout=30,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as test_client says
    try:
        child.expect_exact("you> ")
        child.sendintr() if leave == "ctrl-c" else child.sendline(leave)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "model>" not in child.before and "error" not in child.before
