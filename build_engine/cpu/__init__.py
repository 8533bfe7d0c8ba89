"""The CPU engine: `graph` writes the ONNX INT4 decoder from the TensorRT-LLM checkpoint,
`decoder` runs it over a shared KV cache, `sampling` picks each request's tokens and `scheduler`
batches requests in flight (`CpuEngine`)."""

from build_engine.cpu.sampling import Sampling
from build_engine.cpu.scheduler import CpuEngine, QueueFull, Step, Stream

__all__ = ["CpuEngine", "QueueFull", "Sampling", "Step", "Stream"]
