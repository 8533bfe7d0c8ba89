"""config.pbtxt for each model, built as Triton's `ModelConfig` protobuf message (shipped in
tritonclient) from small declarative specs and written with `text_format`: the message type checks
every field, so a config that Triton could not parse cannot be written."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # TYPE_STRING, TYPE_INT32, ...
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None  # () = a per-request scalar, as the tensorrtllm backend reads it
    ragged: bool = False  # allow_ragged_batch: requests of different lengths batch together


@dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher; `max_queue_size` bounds the queue (0 = unbounded)."""
    max_queue_size: int
    max_queue_delay_us: int = 0
    preferred_batch_size: tuple[int, ...] = ()


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
    batching: Batching | None = None
    ensemble_steps: list[dict] = field(default_factory=list)


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _tensor(msg, t: Tensor) -> None:
    pb = _pb()
    msg.name = t.name
    msg.data_type = pb.DataType.Value(t.dtype)
    msg.dims.extend(t.dims)
    if t.optional:
        msg.optional = True
    if t.reshape is not None:
        msg.reshape.SetInParent()  # an empty shape (a scalar) must still be present
        msg.reshape.shape.extend(t.reshape)
    if t.ragged:
        msg.allow_ragged_batch = True


def message(spec: ModelSpec):
    """The spec as a `ModelConfig` message."""
    pb = _pb()
    cfg = pb.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if spec.backend:
        cfg.backend = spec.backend
        cfg.instance_group.add(count=spec.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    else:
        cfg.platform = "ensemble"
    if spec.decoupled:
        cfg.model_transaction_policy.decoupled = True
    for t in spec.inputs:
        _tensor(cfg.input.add(), t)
    for t in spec.outputs:
        _tensor(cfg.output.add(), t)
    if spec.batching:
        b = cfg.dynamic_batching
        b.preferred_batch_size.extend(spec.batching.preferred_batch_size)
        b.max_queue_delay_microseconds = spec.batching.max_queue_delay_us
        b.default_queue_policy.max_queue_size = spec.batching.max_queue_size
    for k, v in spec.parameters.items():
        cfg.parameters[k].string_value = v
    for s in spec.ensemble_steps:
        step = cfg.ensemble_scheduling.step.add(model_name=s["model"], model_version=-1)
        step.input_map.update(s["inputs"])
        step.output_map.update(s["outputs"])
    return cfg


def render(spec: ModelSpec) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(message(spec))


def parse(text: str):
    """Parse config text into a `ModelConfig` message (raises on any error)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())
