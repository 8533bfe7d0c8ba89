"""The GPU deployment as data: the trtllm-build step, the tensorrt_llm config against the C++
backend's contract, the serving command, the container image, and the README's GPU workflow.

TensorRT-LLM cannot run here. Where a GPU tool is needed, a stand-in executable on PATH takes its
place (`trtllm-build`, `nvidia-smi`, `tritonserver`): the project's own code runs for real around it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build_engine import UserError, checkpoint, container, manifest, presets, trtllm
from model_repo import backend_contract
from model_repo.config import parse

ROOT = Path(__file__).resolve().parent.parent


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def gpu_tools(tmp_path, monkeypatch):
    """Stand-ins for the GPU host's tools. `trtllm-build` writes an engine folder the way the real one
    lays it out (config.json + rank0.engine) and fails when TRTLLM_BUILD_FAIL is set; `tritonserver`
    records its argv."""
    bin_dir = tmp_path / "gpu-bin"
    bin_dir.mkdir()
    _script(bin_dir / "nvidia-smi", "print('GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)')\n")
    _script(bin_dir / "trtllm-build", """import os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
print("[TensorRT-LLM] building", args["--checkpoint_dir"], flush=True)
if os.environ.get("TRTLLM_BUILD_FAIL"):
    print("[TensorRT-LLM][ERROR] out of memory while building", flush=True)
    sys.exit(3)
out = args["--output_dir"]
os.makedirs(out, exist_ok=True)
import json
mapping = json.load(open(os.path.join(args["--checkpoint_dir"], "config.json")))["mapping"]
open(os.path.join(out, "config.json"), "w").write(json.dumps({"build_config": {}, "pretrained_config": {"mapping": mapping}}))
for rank in range(min(mapping["world_size"], int(os.environ.get("TRTLLM_BUILD_RANKS", 8)))):
    open(os.path.join(out, f"rank{rank}.engine"), "wb").write(b"engine")
""")
    _script(bin_dir / "tritonserver", """import json, os, signal, sys, time
rank = os.environ.get("OMPI_COMM_WORLD_RANK")  # under mpirun: one file per rank
out = os.environ["TRITONSERVER_ARGV_FILE"] + (f".rank{rank}" if rank else "")
def drain(sig, _):  # Triton drains on SIGTERM/SIGINT (for TRITONSERVER_DRAIN_S here) and exits 0
    open(out + ".signal_at", "w").write(repr(time.time()))
    open(out + ".signal", "w").write(signal.Signals(sig).name)
    time.sleep(float(os.environ.get("TRITONSERVER_DRAIN_S", "0")))
    open(out + ".drained", "w").write(repr(time.time()))
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
signal.signal(signal.SIGINT, drain)
open(out, "w").write(json.dumps(sys.argv[1:]))  # after the handlers: the tests signal once this is there
time.sleep(float(os.environ.get("TRITONSERVER_RUN_S", "0")))
""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(trtllm, "tensorrt_llm_version", lambda: "1.2.1")
    return bin_dir


@pytest.fixture
def gpu_engine(gpu_tools, tiny_ckpt, tmp_path):
    trtllm.build(tiny_ckpt, tmp_path / "engine-gpu")
    return tmp_path / "engine-gpu"


@pytest.fixture
def gpu_repo(gpu_engine, tmp_path):
    from model_repo.generate import generate

    return generate(gpu_engine, tmp_path / "repo")


# -- trtllm-build --------------------------------------------------------------------------------

def test_gpu_build_publishes_the_engine_with_its_manifest(gpu_engine, tiny_ckpt):
    m = manifest.read(gpu_engine, "trtllm-engine")
    assert (gpu_engine / "rank0.engine").read_bytes() == b"engine"
    assert m["tensorrt_llm"] == "1.2.1" and m["image"] == container.DEFAULT_IMAGE and m["world_size"] == 1
    assert m["model"] == manifest.read(tiny_ckpt)["model"] and m["container_release"] is None  # not in a container
    assert m["command"][m["command"].index("--output_dir") + 1] == str(gpu_engine)
    assert m["files"]["rank0.engine"]["sha256"] and (gpu_engine / "tokenizer" / "tokenizer.model").is_file()
    assert manifest.verify_files(gpu_engine) == []


def test_failed_trtllm_build_is_a_clear_error_and_leaves_no_folder(gpu_tools, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTLLM_BUILD_FAIL", "1")
    with pytest.raises(UserError, match=r"(?s)exit code 3.*out of memory while building"):
        trtllm.build(tiny_ckpt, tmp_path / "engine-gpu")
    assert not (tmp_path / "engine-gpu").exists() and not list(tmp_path.glob(".engine-gpu.partial-*"))


def test_tensorrt_llm_outside_1_2_is_refused(gpu_tools, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(trtllm, "tensorrt_llm_version", lambda: "1.1.0")
    with pytest.raises(UserError, match=r"TensorRT-LLM 1\.1\.0 is installed.*1\.2\.x"):
        trtllm.build(tiny_ckpt, tmp_path / "engine-gpu")


# -- the tensorrt_llm config against the C++ backend's contract ----------------------------------

def test_generated_gpu_config_meets_the_backend_contract(gpu_repo, gpu_engine):
    cfg = parse((gpu_repo / "tensorrt_llm" / "config.pbtxt").read_text())
    assert backend_contract.check(cfg) == []
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert cfg.backend == "tensorrtllm" and params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str(gpu_engine.resolve())
    assert {params[k] for k in ("xgrammar_tokenizer_info_path", "guided_decoding_backend")} == {""}
    assert "tokenizer_dir" in params and params["max_attention_window_size"] == "64"
    # The CPU engine's admission rule: an admitted request always finishes (no pause and recompute).
    assert params["batch_scheduler_policy"] == "guaranteed_no_evict"
    # Prefix reuse, stated rather than left to the backend's default; the engine is built for it.
    assert params["enable_kv_cache_reuse"] == "true" and params["enable_chunked_context"] == "true"
    command = manifest.read(gpu_engine)["command"]
    assert command[command.index("--use_paged_context_fmha") + 1] == "enable"
    by_name = {i.name: i for i in cfg.input}
    assert by_name["input_lengths"].HasField("reshape") and list(by_name["input_lengths"].reshape.shape) == []
    assert by_name["input_ids"].allow_ragged_batch and not by_name["input_ids"].HasField("reshape")
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 4 * cfg.max_batch_size
    assert not (gpu_repo / "tensorrt_llm" / "1" / "model.py").exists()


def test_backend_contract_states_the_upstream_facts():
    """Hand-copied from TensorRT-LLM 1.2's tensorrt_llm/config.pbtxt and model_instance_state.cc (see
    backend_contract's docstring), independently of the contract's own tables."""
    inputs = {t.name: t for t in backend_contract.INPUTS}
    assert (inputs["input_ids"].dtype, inputs["input_ids"].dims, inputs["input_ids"].ragged,
            inputs["input_ids"].optional, inputs["input_ids"].scalar) == ("TYPE_INT32", (-1,), True, True, False)
    assert [n for n, t in inputs.items() if not t.optional] == ["input_lengths", "request_output_len"]
    assert (inputs["stop_words_list"].dims, inputs["stop_words_list"].ragged) == ((2, -1), True)
    assert (inputs["seed"].dtype, inputs["seed"].scalar) == ("TYPE_UINT64", True)
    assert all(inputs[n].scalar for n in ("end_id", "pad_id", "runtime_top_k", "runtime_top_p", "temperature",
                                          "streaming", "stop", "min_tokens", "exclude_input_in_output"))
    outputs = {t.name: (t.dtype, t.dims) for t in backend_contract.OUTPUTS}
    assert outputs == {"output_ids": ("TYPE_INT32", (-1, -1)), "sequence_length": ("TYPE_INT32", (-1,))}
    assert set(backend_contract.REQUIRED_PARAMETERS) == {"gpt_model_type", "tokenizer_dir",
                                                         "xgrammar_tokenizer_info_path", "guided_decoding_backend"}


def test_cpu_and_gpu_tensorrt_llm_configs_differ_only_in_backend(gpu_repo, tiny_engine, tiny_ckpt, tmp_path):
    from model_repo.generate import generate

    cpu = parse((generate(tiny_engine, tmp_path / "cpu-repo") / "tensorrt_llm" / "config.pbtxt").read_text())
    gpu = parse((gpu_repo / "tensorrt_llm" / "config.pbtxt").read_text())
    assert (cpu.backend, gpu.backend) == ("python", "tensorrtllm")
    assert list(cpu.input) == list(gpu.input) and list(cpu.output) == list(gpu.output)
    assert set(cpu.parameters) == set(gpu.parameters) and backend_contract.check(cpu) == []
    # The BLS's Triton 2.51 workarounds are the CPU server's only: on the GPU, errors travel as errors and
    # cancellation is TensorRT-LLM's stop request, which the C++ backend takes.
    bls = {t: parse((repo / "tensorrt_llm_bls" / "config.pbtxt").read_text()).parameters
           for t, repo in (("cpu", tmp_path / "cpu-repo"), ("gpu", gpu_repo))}
    for key in ("engine_failure_marker", "engine_cancel_channel"):
        assert (bls["cpu"][key].string_value, bls["gpu"][key].string_value) == ("true", "false")
    # Both engines sample over the checkpoint's padded vocabulary (ModelOpt: 32002 -> 32064, zero rows; TensorRT-LLM
    # takes the checkpoint config's vocab_size), and the text models of both ban the padding (common.padding_ids).
    padded = checkpoint.read_config(tiny_ckpt)["vocab_size"]
    assert padded == 32064
    for repo in (tmp_path / "cpu-repo", gpu_repo):
        for model in ("tensorrt_llm_bls", "preprocessing"):
            params = parse((repo / model / "config.pbtxt").read_text()).parameters
            assert params["engine_vocab_size"].string_value == str(padded)


@pytest.mark.parametrize("breakage,expected", [
    ("del cfg.parameters['guided_decoding_backend']", "'guided_decoding_backend' is missing"),
    ("del cfg.parameters['tokenizer_dir']", "'tokenizer_dir' is missing"),
    ("del cfg.parameters['xgrammar_tokenizer_info_path']", "'xgrammar_tokenizer_info_path' is missing"),
    ("cfg.parameters['gpt_model_type'].string_value = '${batching_strategy}'", "gpt_model_type"),
    ("cfg.input[1].ClearField('reshape')", "'input_lengths' needs reshape"),
    ("cfg.input[0].allow_ragged_batch = False", "'input_ids' must set allow_ragged_batch"),
    ("cfg.input[2].optional = True", "'request_output_len' must not be optional"),
    ("cfg.ClearField('dynamic_batching')", "max_queue_size must bound the queue"),
    ("cfg.model_transaction_policy.decoupled = False", "decoupled must be true"),
    ("cfg.parameters['exclude_input_in_output'].string_value = 'yes'", "not a boolean"),
    ("cfg.output[0].dims[:] = [-1]", "'output_ids' is TYPE_INT32 [-1]"),
])
def test_contract_check_names_each_way_a_config_breaks_the_backend(gpu_repo, breakage, expected):
    cfg = parse((gpu_repo / "tensorrt_llm" / "config.pbtxt").read_text())
    exec(breakage, {"cfg": cfg})
    problems = backend_contract.check(cfg)
    assert any(expected in p for p in problems), problems


# -- serving on a GPU host -----------------------------------------------------------------------

def test_gpu_serve_outside_the_container_runs_itself_in_docker_bound_to_loopback(gpu_repo, gpu_engine, gpu_tools,
                                                                                 capsys, monkeypatch):
    """Outside the serving image, docker runs the same `serve` inside it (the process that relays stop
    signals to the ranks); run as printed there, that `serve` binds tritonserver to loopback."""
    from model_repo.__main__ import main

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no tritonserver: outside the container
    assert main(["serve", "--repo", str(gpu_repo), "--dry-run"]) == 0
    default_inner = shlex.split(capsys.readouterr().out)
    default_inner = default_inner[default_inner.index(container.SERVING_IMAGE) + 1:]
    assert main(["serve", "--repo", str(gpu_repo), "--host", "10.0.0.5", "--http-port", "9000", "--grpc-port", "9001",
                 "--metrics-port", "9002", "--drain-timeout", "45", "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    image_at = argv.index(container.SERVING_IMAGE)
    docker, inner = argv[:image_at], argv[image_at + 1:]
    assert docker[:2] == ["docker", "run"] and "--gpus" in docker and docker[docker.index("--network") + 1] == "host"
    assert "--init" in docker  # PID 1 reaps orphans and passes docker's signals on to serve
    mounts = [docker[i + 1] for i, a in enumerate(docker) if a == "-v"]
    assert f"{gpu_repo.resolve()}:{gpu_repo.resolve()}:ro" in mounts
    assert f"{gpu_engine.resolve()}:{gpu_engine.resolve()}:ro" in mounts
    assert inner[:4] == ["python3", "-m", "model_repo", "serve"]

    monkeypatch.setenv("PATH", f"{gpu_tools}{os.pathsep}/usr/bin:/bin")  # inside: tritonserver is there
    servers = []
    for argv in (default_inner, inner):
        assert main([*argv[3:], "--dry-run"]) == 0
        servers.append(shlex.split(capsys.readouterr().out))
    assert servers[0][0] == "tritonserver" and f"--model-repository={gpu_repo.resolve()}" in servers[0]
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in servers[0] and f"{flag}=10.0.0.5" in servers[1]
    assert {"--http-port=9000", "--grpc-port=9001", "--metrics-port=9002", "--exit-timeout-secs=45"} <= set(servers[1])


def test_gpu_serve_of_a_repository_whose_engine_is_gone_is_a_clear_error(gpu_repo, gpu_engine, capsys, monkeypatch):
    import shutil

    from model_repo.__main__ import main

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    shutil.rmtree(gpu_engine)
    assert main(["serve", "--repo", str(gpu_repo), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert str(gpu_engine.resolve()) in err and "regenerate" in err and "\n" not in err


def test_gpu_serve_inside_the_container_runs_tritonserver_as_printed(gpu_repo, gpu_tools, tmp_path, capsys,
                                                                    monkeypatch):
    from model_repo.__main__ import main

    argv_file = tmp_path / "argv.json"
    monkeypatch.setenv("TRITONSERVER_ARGV_FILE", str(argv_file))
    assert main(["serve", "--repo", str(gpu_repo), "--host", "10.0.0.5", "--grpc-port", "9001"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed[0] == "tritonserver" and json.loads(argv_file.read_text()) == printed[1:]
    assert "--grpc-address=10.0.0.5" in printed and "--grpc-port=9001" in printed
    assert "--metrics-address=10.0.0.5" in printed


@pytest.mark.parametrize("sent,received", [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT"), ("SIGHUP", "SIGTERM")])
def test_gpu_serve_passes_stop_signals_to_tritonserver_and_returns_its_exit_code(gpu_repo, gpu_tools, tmp_path,
                                                                                 sent, received):
    """A pod stopping sends SIGTERM to `serve` (the container's main process), Ctrl-C sends SIGINT: Triton
    must get it to drain, rather than be killed when the grace period ends. The server runs in a session
    of its own, so a hangup (the terminal closing) must stop it as SIGTERM does, not leave it running."""
    import signal

    argv_file = tmp_path / "argv.json"
    env = {**os.environ, "TRITONSERVER_ARGV_FILE": str(argv_file), "TRITONSERVER_RUN_S": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "model_repo", "serve", "--repo", str(gpu_repo)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not argv_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(getattr(signal, sent))
    assert proc.wait(20) == 0
    assert (tmp_path / "argv.json.signal").read_text() == received


# -- tensor parallelism (world size > 1) ----------------------------------------------------------

@pytest.fixture
def gpu_engine_tp2(gpu_tools, tiny_ckpt_tp2, tmp_path):
    trtllm.build(tiny_ckpt_tp2, tmp_path / "engine-gpu-tp2")
    return tmp_path / "engine-gpu-tp2"


def test_tp2_build_runs_a_worker_per_rank_and_records_the_world_size(gpu_engine_tp2):
    m = manifest.read(gpu_engine_tp2, trtllm.ENGINE_KIND)
    assert m["world_size"] == 2 and m["command"][m["command"].index("--workers") + 1] == "2"
    assert sorted(p.name for p in gpu_engine_tp2.glob("rank*.engine")) == ["rank0.engine", "rank1.engine"]


def test_a_build_that_misses_a_rank_engine_is_refused(gpu_tools, tiny_ckpt_tp2, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTLLM_BUILD_RANKS", "1")
    with pytest.raises(UserError, match="wrote no rank1.engine for world size 2"):
        trtllm.build(tiny_ckpt_tp2, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_tp2_serve_launches_leader_mode_one_tritonserver_per_gpu(gpu_engine_tp2, tmp_path, capsys):
    """TensorRT-LLM 1.2 triton_backend/scripts/launch_triton_server.py (leader mode): mpirun with one
    `-n 1 tritonserver` block per rank; rank 0 loads the repository, the others only tensorrt_llm,
    with the model-control mode that allows it; each rank its own python shm prefix; the same ports."""
    from model_repo.__main__ import main
    from model_repo.generate import generate

    repo = generate(gpu_engine_tp2, tmp_path / "repo")
    assert manifest.read(repo, "triton-repository")["world_size"] == 2
    assert main(["serve", "--repo", str(repo), "--dry-run", "--host", "10.0.0.5"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(argv[2:]).split(" : ")
    assert len(ranks) == 2
    blocks = [r.split() for r in ranks]
    for rank, block in enumerate(blocks):
        assert block[:3] == ["-n", "1", "tritonserver"]
        assert f"--model-repository={repo.resolve()}" in block and "--grpc-address=10.0.0.5" in block
        assert "--disable-auto-complete-config" in block
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in block
    assert not any(a.startswith(("--model-control-mode", "--load-model")) for a in blocks[0])
    assert {"--model-control-mode=explicit", "--load-model=tensorrt_llm"} <= set(blocks[1])
    ports = [sorted(a for a in b if a.endswith(tuple("0123456789")) and "-port=" in a) for b in blocks]
    assert ports[0] == ports[1] and len(ports[0]) == 3


def test_tp2_serve_outside_the_container_runs_in_docker_with_nccls_limits(gpu_engine_tp2, gpu_tools, tmp_path,
                                                                         capsys, monkeypatch):
    from model_repo.__main__ import main
    from model_repo.generate import generate

    repo = generate(gpu_engine_tp2, tmp_path / "repo")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert main(["serve", "--repo", str(repo), "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    image_at = argv.index(container.SERVING_IMAGE)
    docker, inner = argv[:image_at], argv[image_at + 1:]
    assert docker[docker.index("--ipc") + 1] == "host"
    # With the host's IPC namespace a --shm-size is ignored by docker and refused by podman.
    assert not any(a.startswith("--shm-size") for a in docker)
    assert {"memlock=-1", "stack=67108864"} <= {docker[i + 1] for i, a in enumerate(docker) if a == "--ulimit"}
    monkeypatch.setenv("PATH", f"{gpu_tools}{os.pathsep}/usr/bin:/bin")
    assert main([*inner[3:], "--dry-run"]) == 0  # inside the image, serve starts leader mode
    assert shlex.split(capsys.readouterr().out)[0] == "mpirun"


def test_tp2_serve_drains_every_rank_on_sigterm_under_open_mpi(gpu_engine_tp2, tmp_path):
    """A pod stopping sends SIGTERM to `serve`. Under the real Open MPI mpirun (Debian's openmpi-bin,
    as the Makefile installs it), every rank must get it and drain for as long as it needs (mpirun
    itself, signalled, kills its ranks about two seconds later: server.stop_signal), the leader first
    and the worker only once the leader has exited."""
    import signal

    from model_repo.generate import generate

    repo = generate(gpu_engine_tp2, tmp_path / "repo")
    argv_file = tmp_path / "argv.json"
    # Open MPI counts physical cores as slots: a machine with one core and two threads would refuse -n 2.
    env = {**os.environ, "TRITONSERVER_ARGV_FILE": str(argv_file), "TRITONSERVER_RUN_S": "120",
           "TRITONSERVER_DRAIN_S": "3", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "model_repo", "serve", "--repo", str(repo)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        ranks = [Path(f"{argv_file}.rank{r}") for r in range(2)]
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ranks) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(r.exists() for r in ranks), f"mpirun did not start both ranks (serve: {proc.poll()})"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert time.monotonic() - sent >= 6  # two drains of 3 s, one after the other
        for r in ranks:
            assert Path(f"{r}.signal").read_text() == "SIGTERM"
            assert Path(f"{r}.drained").exists(), f"{r.name} was killed before its drain ended"
        leader, worker = ranks
        assert float(Path(f"{worker}.signal_at").read_text()) >= float(Path(f"{leader}.drained").read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["pkill", "-f", f"--model-repository={repo.resolve()}"], check=False)  # ranks left behind


@pytest.fixture
def docker_stand_in(gpu_tools, tmp_path, monkeypatch):
    """`docker` on a host without tritonserver: `image inspect` (its argv recorded) answers with
    DOCKER_LABEL as the image's source label (after DOCKER_INSPECT_S seconds), or fails with
    DOCKER_INSPECT_ERROR; `run` records its argv and exits 0."""
    bin_dir = tmp_path / "host-bin"
    bin_dir.mkdir()
    _script(bin_dir / "docker", """import json, os, sys
if sys.argv[1:3] == ["image", "inspect"]:
    open(os.environ["DOCKER_ARGV_FILE"] + ".inspect", "w").write(json.dumps(sys.argv[1:]))
    if os.environ.get("DOCKER_INSPECT_S"):
        import time; time.sleep(float(os.environ["DOCKER_INSPECT_S"]))
    if os.environ.get("DOCKER_INSPECT_ERROR"):
        sys.exit(os.environ["DOCKER_INSPECT_ERROR"])
    print(os.environ.get("DOCKER_LABEL", "<no value>"))
elif sys.argv[1] == "run":
    open(os.environ["DOCKER_ARGV_FILE"], "w").write(json.dumps(sys.argv[1:]))
""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")  # docker, and no tritonserver
    monkeypatch.setenv("DOCKER_ARGV_FILE", str(tmp_path / "docker-argv.json"))
    return tmp_path / "docker-argv.json"


def test_gpu_serve_outside_runs_an_image_that_holds_this_code(gpu_repo, docker_stand_in, capsys, monkeypatch):
    from model_repo.__main__ import main

    from model_repo.server import SOURCE_LABEL

    monkeypatch.setenv("DOCKER_LABEL", manifest.source_digest())
    assert main(["serve", "--repo", str(gpu_repo), "--image", "registry.example/hermes:1"]) == 0
    printed = shlex.split(capsys.readouterr().out.strip().splitlines()[0])
    assert ["docker", *json.loads(docker_stand_in.read_text())] == printed
    inspect = json.loads(Path(f"{docker_stand_in}.inspect").read_text())
    assert inspect == ["image", "inspect", "--format", '{{ index .Config.Labels "%s" }}' % SOURCE_LABEL,
                       "registry.example/hermes:1"] and SOURCE_LABEL == "hermes-trtllm.source"  # the Dockerfile's


@pytest.mark.parametrize("env,expected", [
    ({"DOCKER_LABEL": "0" * 64}, r"holds other code than this checkout \(source 000000000000, here .*make gpu-image"),
    ({"DOCKER_INSPECT_ERROR": "Error: No such image: x"}, r"is not on this host: build it with `make gpu-image`"),
    ({"DOCKER_INSPECT_ERROR": "Cannot connect to the Docker daemon at unix:///var/run/docker.sock"},
     r"could not inspect the serving image .*: Cannot connect to the Docker daemon"),
])
def test_gpu_serve_outside_refuses_an_image_it_cannot_trust(gpu_repo, docker_stand_in, capsys, monkeypatch, env,
                                                            expected):
    """The inner serve is the image's own copy: an image built from other code could, for instance,
    still signal mpirun on SIGTERM (cutting a tensor-parallel drain short), so it is refused up front."""
    from model_repo.__main__ import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--repo", str(gpu_repo)]) == 1
    assert re.search(expected, capsys.readouterr().err) and not docker_stand_in.exists()


@pytest.mark.parametrize("label,flags,warning", [
    ("<no value>", [], "does not say which code it holds"),
    ("0" * 64, ["--allow-image-mismatch"], "holds other code than this checkout"),
])
def test_gpu_serve_outside_warns_and_runs(gpu_repo, docker_stand_in, capsys, monkeypatch, label, flags, warning):
    from model_repo.__main__ import main

    monkeypatch.setenv("DOCKER_LABEL", label)
    assert main(["serve", "--repo", str(gpu_repo), *flags]) == 0
    assert warning in capsys.readouterr().err and docker_stand_in.exists()


def test_a_stop_signal_before_the_server_starts_stops_serve_and_starts_nothing(gpu_repo, docker_stand_in,
                                                                              monkeypatch):
    """serve's stop signals are relayed from before the server starts: one that came after the server
    had started but before the relay was in place would end serve and leave the server (in a session
    of its own) running with no one to stop it."""
    import signal

    monkeypatch.setenv("DOCKER_LABEL", manifest.source_digest())
    monkeypatch.setenv("DOCKER_INSPECT_S", "30")
    proc = subprocess.Popen([sys.executable, "-m", "model_repo", "serve", "--repo", str(gpu_repo)], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    inspecting = Path(f"{docker_stand_in}.inspect")
    deadline = time.monotonic() + 30
    while not inspecting.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inspecting.exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0  # a clean stop, not killed by the signal (-15)
    assert not docker_stand_in.exists()  # and no `docker run`


def test_the_relay_passes_a_signal_that_came_before_the_server_on_once_it_exists():
    import signal

    from model_repo.__main__ import _forwarding_signals

    before = signal.getsignal(signal.SIGHUP)
    with _forwarding_signals() as relay:
        os.kill(os.getpid(), signal.SIGHUP)  # handled (in this, the main thread) before kill returns
        assert relay.pending == signal.SIGTERM
        server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        relay.attach(server)
        assert server.wait(20) == -signal.SIGTERM
    assert signal.getsignal(signal.SIGHUP) == before  # restored


def _source_copy(tmp_path: Path) -> Path:
    """This checkout's files without its venvs, artifacts and history (setuptools writes into the tree)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".venv*", "artifacts", "results", ".git", "build"))
    return tree


def test_source_digest_is_the_same_for_a_checkout_and_an_install_of_it(tmp_path):
    """The image's label is computed on the host from the checkout and checked in the image against the
    installed copy: both must hash alike (setuptools installs the packages' .py files and presets)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(tmp_path / "site"), str(_source_copy(tmp_path))], check=True, capture_output=True)
    installed = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                "from build_engine import manifest; print(manifest.__file__, manifest.source_digest())",
                                str(tmp_path / "site")], cwd="/", capture_output=True, text=True, check=True).stdout.split()
    assert installed[0].startswith(str(tmp_path / "site")) and installed[1] == manifest.source_digest()


def test_source_digest_ignores_hidden_and_dangling_files(tmp_path, monkeypatch):
    """An editor's lock file (a dangling symlink named .#x.py) or a notebook checkpoint in a package
    folder is not installed: it must neither change the digest nor break it."""
    tree = _source_copy(tmp_path)
    digest = lambda: subprocess.run(  # noqa: E731  (the copy's own code: its folder comes first on sys.path)
        [sys.executable, "-c", "from build_engine import manifest; assert manifest.__file__.startswith(%r); "
         "print(manifest.source_digest())" % str(tree)], cwd=tree, capture_output=True, text=True,
        check=True).stdout.strip()
    before = digest()
    assert before == manifest.source_digest()
    (tree / "model_repo" / ".#server.py").symlink_to("root@host.1234:1700000000")
    (tree / "build_engine" / ".ipynb_checkpoints").mkdir()
    (tree / "build_engine" / ".ipynb_checkpoints" / "quantize-checkpoint.py").write_text("x = 1\n")
    assert digest() == before
    (tree / "model_repo" / "server.py").write_text((tree / "model_repo" / "server.py").read_text() + "\n# edited\n")
    assert digest() != before


def test_gpu_image_is_labelled_with_the_code_it_installs(tmp_path):
    """make gpu-image passes this checkout's source digest; the Dockerfile labels the image with it and
    fails the build when the installed code hashes otherwise (run here on this checkout's install)."""
    make = subprocess.run(["make", "-n", "gpu-image", "GPU_PY=" + sys.executable], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    assert f"--build-arg HERMES_SOURCE={manifest.source_digest()}" in make
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"^ARG HERMES_SOURCE=unknown$", text, re.M)
    assert re.search(r"^LABEL (\S+)=\$\{HERMES_SOURCE\}$", text, re.M).group(1) == "hermes-trtllm.source"
    check = re.search(r"^LABEL .*\nRUN (.*)$", text, re.M).group(1)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # the image's, with this checkout
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    for source, ok in ((manifest.source_digest(), True), ("unknown", True), ("0" * 64, False)):
        done = subprocess.run(["sh", "-c", check], env={**env, "HERMES_SOURCE": source}, capture_output=True, text=True)
        assert (done.returncode == 0) == ok, (source, done.stderr)


# -- the container image -------------------------------------------------------------------------

def test_dockerfile_builds_on_the_pinned_image_without_replacing_its_packages():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1) == container.DEFAULT_IMAGE
    assert container.image(container.DEFAULT_IMAGE).tensorrt_llm == "1.2.1"
    run = re.search(r"^RUN python3 -m pip list --format=freeze > (\S+).*?\n(?:.*\n)*?.*pip install.*-c \1 "
                    r"\"/opt/hermes-trtllm\[container\]\"", text, re.M)
    assert run, "the project must be installed constrained to the container's own package versions"
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^SERVING_IMAGE := (\S+)$", make, re.M).group(1) == container.SERVING_IMAGE


def test_container_extra_lists_only_packages_tensorrt_llm_pins_allow():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = {"transformers": "4.57.3", "nvidia-modelopt": "0.37.0", "datasets": "3.1.0"}
    for group in ("container", "build"):
        for req in map(Requirement, extras[group]):
            if req.name in pinned:
                assert req.specifier.contains(pinned[req.name]), f"[{group}] {req} refuses TensorRT-LLM 1.2.1's pin"
    for name, spec in container.TRTLLM_PINS.items():
        assert SpecifierSet(spec), name


def test_container_versions_constraints_follow_tensorrt_llm_pins():
    from packaging.specifiers import SpecifierSet

    pins = dict(line.split("==", 1) for line in (ROOT / "constraints-trtllm.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for name, spec in container.TRTLLM_PINS.items():
        if name == "torch":  # the CPU build on this machine's disk stands in for the container's CUDA torch
            continue
        assert SpecifierSet(spec).contains(pins[name]), f"{name}=={pins[name]} breaks TensorRT-LLM 1.2.1's {spec}"


# -- the README's GPU workflow runs as written ---------------------------------------------------

def _gpu_block_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## GPU workflow"):]
    section = section[: section.index("\n## ", 3)]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _parse_python_line(argv: list[str]):
    from build_engine.__main__ import parser as build
    from model_repo.__main__ import parser as repo

    assert argv[0] in ("python", "python3") and argv[1] == "-m", argv
    parsers = {"build_engine": build, "model_repo": repo}
    args = parsers[argv[2]]().parse_args(argv[3:])
    assert getattr(args, "handler", None) is not None, argv
    return args


def test_readme_gpu_workflow_commands_parse_and_chain():
    lines = _gpu_block_lines()
    python_lines = [shlex.split(line) for line in lines if line.startswith(("python ", "python3 "))]
    assert len(python_lines) == 4
    produced: set[str] = set()
    for argv in python_lines:
        args = _parse_python_line(argv)
        for attr in ("checkpoint", "engine", "repo"):
            if getattr(args, attr, None):
                assert getattr(args, attr) in produced, f"{attr} {getattr(args, attr)} is made by no earlier step"
        if getattr(args, "output", None):
            produced.add(args.output)
    # The 7B quantize step takes the preset's name and resolves to its hub id (or GPU_SOURCE's folder).
    quantize = _parse_python_line(python_lines[0])
    assert presets.load(quantize.preset).source == "NousResearch/Nous-Hermes-2-Mistral-7B-DPO"
    assert quantize.model == "nous-hermes-2-mistral-7b-dpo"


def test_readme_gpu_make_lines_resolve_to_the_documented_commands(tmp_path):
    lines = _gpu_block_lines()
    documented = [line for line in lines if line.startswith(("python ", "python3 "))]
    make_lines = [shlex.split(line) for line in lines if line.startswith("make ")]
    assert [m[1] for m in make_lines] == ["gpu-image", "gpu-quantize", "gpu-engine", "gpu-repo", "gpu-serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_") and k != "ARTIFACTS"}
    fresh = tmp_path / "artifacts"  # a fresh checkout: nothing built yet
    run = lambda argv: [  # noqa: E731
        line.replace(f"{fresh}/", "artifacts/") for line in subprocess.run(
            ["make", "-n", "--no-print-directory", *argv[1:], f"ARTIFACTS={fresh}"], cwd=ROOT, env=env,
            capture_output=True, text=True, check=True).stdout.splitlines()]
    base = presets.load("nous-hermes-2-mistral-7b-dpo").triton_image
    assert run(make_lines[0]) == [f"docker build --build-arg BASE_IMAGE={base} --build-arg "
                                  f"HERMES_SOURCE={manifest.source_digest()} -t {container.SERVING_IMAGE} ."]
    # `make -n gpu-serve` on a fresh checkout shows every step it would run, in order.
    assert run(make_lines[-1]) == documented
    for argv, n in zip(make_lines[1:], (1, 2, 3, 4)):
        assert run(argv) == documented[:n], argv
    docker_runs = [shlex.split(line) for line in lines if line.startswith("docker run")]
    assert docker_runs and container.SERVING_IMAGE in docker_runs[0] and "--gpus" in docker_runs[0]


def test_quantize_resolves_the_preset_name_to_its_hub_id(monkeypatch):
    from build_engine import sources

    seen = []
    monkeypatch.setattr(sources, "_from_hub", lambda repo_id: seen.append(repo_id) or "resolved")
    assert sources.resolve("nous-hermes-2-mistral-7b-dpo") == "resolved"
    assert seen == ["NousResearch/Nous-Hermes-2-Mistral-7B-DPO"]


def test_gpu_serve_with_openai_port_runs_the_frontend_beside_tritonserver(gpu_repo, gpu_tools, tmp_path, monkeypatch):
    import threading
    import urllib.request

    from model_repo.__main__ import main
    from model_repo.server import free_port

    monkeypatch.setenv("TRITONSERVER_ARGV_FILE", str(tmp_path / "argv.json"))
    monkeypatch.setenv("TRITONSERVER_RUN_S", "8")
    port = free_port()
    codes = []
    t = threading.Thread(target=lambda: codes.append(main(["serve", "--repo", str(gpu_repo), "--openai-port",
                                                           str(port)])))
    t.start()
    models = None
    for _ in range(60):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                models = json.loads(r.read())
            break
        except OSError:
            time.sleep(0.1)
    t.join(timeout=30)
    assert models["data"][0]["id"] == "tiny-hermes" and codes == [0]



def test_python_models_get_instances_per_model_sized_for_the_target(gpu_repo, tiny_engine, tmp_path):
    """A GPU host runs several BLS and postprocessing stubs (one GIL each); the CPU host one of each. The
    CLI sets each model's count, or all of them; the repository manifest records them."""
    from build_engine import manifest
    from model_repo.__main__ import main
    from model_repo.generate import DEFAULT_INSTANCES

    def counts(repo):
        return {m: parse((repo / m / "config.pbtxt").read_text()).instance_group[0].count
                for m in ("tensorrt_llm_bls", "preprocessing", "postprocessing", "tensorrt_llm")}

    gpu = DEFAULT_INSTANCES["gpu"]
    assert gpu.bls > 1 and gpu.postprocessing > 1
    assert counts(gpu_repo) == {"tensorrt_llm_bls": gpu.bls, "preprocessing": gpu.preprocessing,
                                "postprocessing": gpu.postprocessing, "tensorrt_llm": 1}
    assert main(["generate", "--engine", str(tiny_engine), "--output", str(tmp_path / "cpu")]) == 0
    assert set(counts(tmp_path / "cpu").values()) == {1}
    assert main(["generate", "--engine", str(tiny_engine), "--output", str(tmp_path / "cpu3"), "--instances", "2",
                 "--bls-instances", "3"]) == 0
    assert counts(tmp_path / "cpu3") == {"tensorrt_llm_bls": 3, "preprocessing": 2, "postprocessing": 2,
                                         "tensorrt_llm": 1}
    assert manifest.read(tmp_path / "cpu3")["settings"]["instances"] == {"bls": 3, "preprocessing": 2,
                                                                       "postprocessing": 2}
