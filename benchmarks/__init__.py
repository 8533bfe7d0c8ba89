"""benchmarks: latency and throughput the way the field measures them (vLLM benchmark_serving's
definitions): TTFT, TPOT, ITL, E2E latency, request/output-token throughput, goodput; and a
memory-bandwidth roofline for batch-1 decode on NVIDIA GPUs."""
