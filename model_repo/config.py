"""config.pbtxt for each model, written from small declarative specs and validated by parsing
into Triton's ModelConfig protobuf (shipped in tritonclient)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # TYPE_STRING, TYPE_INT32, ...
    dims: tuple[int, ...]
    optional: bool = False


@dataclass
class ModelSpec:
    name: str
    backend: str | None  # "python" | "tensorrtllm" | None (ensemble)
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    decoupled: bool = False
    parameters: dict[str, str] = field(default_factory=dict)
    instances: int = 1
    ensemble_steps: list[dict] = field(default_factory=list)


def _tensor(t: Tensor) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    opt = "\n    optional: true" if t.optional else ""
    return f'  {{\n    name: "{t.name}"\n    data_type: {t.dtype}\n    dims: [ {dims} ]{opt}\n  }}'


def render(spec: ModelSpec) -> str:
    lines = [f'name: "{spec.name}"']
    if spec.backend:
        lines.append(f'backend: "{spec.backend}"')
    else:
        lines.append('platform: "ensemble"')
    lines.append(f"max_batch_size: {spec.max_batch_size}")
    if spec.decoupled:
        lines.append("model_transaction_policy {\n  decoupled: true\n}")
    lines.append("input [\n" + ",\n".join(_tensor(t) for t in spec.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(t) for t in spec.outputs) + "\n]")
    if spec.backend:
        lines.append(f"instance_group [\n  {{\n    count: {spec.instances}\n    kind: KIND_CPU\n  }}\n]")
    for k, v in spec.parameters.items():
        lines.append(f'parameters {{\n  key: "{k}"\n  value: {{\n    string_value: "{v}"\n  }}\n}}')
    if spec.ensemble_steps:
        steps = []
        for s in spec.ensemble_steps:
            maps = "".join(f'\n      input_map {{ key: "{k}" value: "{v}" }}' for k, v in s["inputs"].items())
            maps += "".join(f'\n      output_map {{ key: "{k}" value: "{v}" }}' for k, v in s["outputs"].items())
            steps.append(f'    {{\n      model_name: "{s["model"]}"\n      model_version: -1{maps}\n    }}')
        lines.append("ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}")
    return "\n".join(lines) + "\n"


def parse(text: str):
    """Parse config text into tritonclient's ModelConfig message (raises on any error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())
