"""model_repo: a Triton Inference Server model repository for an engine, and the server to host it.

generate (write the repository: preprocessing -> tensorrt_llm -> postprocessing, the ensemble, and
the streaming BLS model) -> serve (the bundled tritonserver on a CPU host; the TRT-LLM container
on a GPU host).
"""
