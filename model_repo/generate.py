"""Write a Triton model repository for an engine (CPU engine or TensorRT-LLM GPU engine).

  preprocessing -> tensorrt_llm -> postprocessing   = ensemble (tensorrtllm_backend's tensors)
  tensorrt_llm_bls                                   = streaming chat model with exact text deltas
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from build_engine import UserError, manifest
from model_repo import backend_contract
from common import request
from model_repo.config import Batching, ModelSpec, Tensor, message, render

MODELS_DIR = Path(__file__).parent / "triton_models"
S, I32 = "TYPE_STRING", "TYPE_INT32"

def _request_tensor(f: request.RequestField, optional: bool = True) -> Tensor:
    return Tensor(f.name, f.config_dtype, (-1,) if f.many else (1,), optional)


# The public request's optional inputs (common.request), shared by the ensemble and the BLS model.
SAMPLING_INPUTS = [_request_tensor(f) for f in request.OPTIONAL]
# The ensemble hands these to tensorrt_llm as they are; preprocessing makes the rest.
PASS_THROUGH = {f.engine: f.name for f in request.OPTIONAL if f.engine}


@dataclass(frozen=True)
class Instances:
    """Instances of each python model. A python-backend instance is a process of its own, one GIL: the BLS
    and postprocessing do Python work for every streamed token, so their instances are what lets the
    serving path use more than one core. Triton hands a model's requests to its instances as they free up,
    and the BLS frees its instance at once (each request runs on a thread of its own)."""
    bls: int = 1
    preprocessing: int = 1
    postprocessing: int = 1

    def __post_init__(self):
        for name, n in vars(self).items():
            if n < 1:
                raise UserError(f"--{name}-instances must be >= 1 (got {n})")


# The CPU engine's host has two cores, which the engine computes on. A GPU host has 16 or more for the
# serving path (a C++ engine needs about one): one BLS stub caps a stream of tokens near 3,000 a second
# on this project's measurements, a GPU serving 64 streams produces several times that.
DEFAULT_INSTANCES = {"cpu": Instances(), "gpu": Instances(bls=4, preprocessing=2, postprocessing=4)}


def _backend_tensor(t: backend_contract.BackendTensor) -> Tensor:
    return Tensor(t.name, t.dtype, t.dims, t.optional, reshape=() if t.scalar else None, ragged=t.ragged)


# tensorrt_llm declares exactly the backend's tensors (the CPU stand-in included).
LLM_INPUTS = [_backend_tensor(t) for t in backend_contract.INPUTS]
LLM_OUTPUTS = [_backend_tensor(t) for t in backend_contract.OUTPUTS]
QUEUE_PER_BATCH_SLOT = 4  # default bound on the tensorrt_llm queue: 4 x max_batch_size requests


def llm_parameters(eng: dict, engine_dir: Path) -> dict[str, str]:
    """The tensorrt_llm model's parameters: the same keys for the GPU backend and the CPU stand-in."""
    runtime = eng.get("runtime", {})
    # Mistral's sliding window is a runtime setting of the TensorRT-LLM engine: the model's own config.
    window = eng["model"].get("sliding_window")
    return {
        "gpt_model_type": "inflight_fused_batching", "gpt_model_path": str(engine_dir),
        # Read without a default by the 1.2 backend; empty values keep guided decoding off.
        "tokenizer_dir": "", **backend_contract.GUIDED_DECODING_OFF,
        # guaranteed_no_evict: an admitted request always finishes, as the CPU engine's scheduler does (its
        # admission rule). max_utilization pauses and recomputes requests when blocks run out, and sizes a long
        # prompt's first chunk by the sliding window while the whole prompt is allocated (capacityScheduler.cpp,
        # kvCacheManager.cpp getNeededBlocksOneStep, TensorRT-LLM 1.2.0rc2): a near-full cache could then fail
        # every request in the batch ("Can't allocate new blocks").
        "max_beam_width": "1", "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": str(runtime.get("kv_cache_free_gpu_mem_fraction", 0.9)),
        "exclude_input_in_output": "true", "enable_chunked_context": "true",
        # Prefix reuse (a system prompt, the earlier turns of a chat): the 1.2 backend's default when the key is
        # absent (model_instance_state.cc getKvCacheConfigFromParams), stated so that the config says what runs.
        # It needs the engine's paged context FMHA (trtllm.py: --use_paged_context_fmha enable; TensorRT-LLM's
        # docs/source/kv_cache_reuse.md). The CPU engine does not reuse prefixes: outputs are the same, TTFT is not.
        "enable_kv_cache_reuse": "true",
        **({"max_attention_window_size": str(window)} if window else {}),
    }


def specs(eng: dict, target: str, engine_dir: Path, tokenizer_dir: Path, max_batch_size: int,
          instances: Instances, max_queue_size: int) -> list[ModelSpec]:
    facts, limits = eng["model"], eng["limits"]
    end_id, pad_id = facts["end_id"], facts["pad_id"]
    max_output_len = limits["max_seq_len"] - 1
    tok = {"tokenizer_dir": str(tokenizer_dir), "end_id": str(end_id), "pad_id": str(pad_id),
           "max_input_len": str(limits["max_input_len"]), "max_output_len": str(max_output_len),
           "max_seq_len": str(limits["max_seq_len"]),
           # The vocabulary the engine samples over; the ids past the tokenizer's are banned (common.padding_ids).
           "engine_vocab_size": str(eng["engine_vocab_size"])}
    pre = ModelSpec(
        "preprocessing", "python", max_batch_size,
        inputs=[Tensor("QUERY", S, (1,), True), Tensor("REQUEST_OUTPUT_LEN", I32, (1,), True),
                Tensor("STOP_WORDS", S, (-1,), True), Tensor("BAD_WORDS", S, (-1,), True),
                Tensor("END_ID", I32, (1,), True), Tensor("PAD_ID", I32, (1,), True)],
        outputs=[Tensor("INPUT_ID", I32, (-1,)), Tensor("REQUEST_INPUT_LEN", I32, (1,)),
                 Tensor("OUT_REQUEST_OUTPUT_LEN", I32, (1,)), Tensor("OUT_END_ID", I32, (1,)),
                 Tensor("OUT_PAD_ID", I32, (1,)), Tensor("STOP_WORDS_IDS", I32, (2, -1)),
                 Tensor("BAD_WORDS_IDS", I32, (2, -1))],
        parameters=tok, instances=instances.preprocessing)
    post = ModelSpec(
        "postprocessing", "python", max_batch_size,
        inputs=[Tensor("TOKENS_BATCH", I32, (-1, -1)), Tensor("SEQUENCE_LENGTH", I32, (-1,))],
        outputs=[Tensor("OUTPUT", S, (-1,))], parameters=tok, instances=instances.postprocessing)
    llm = ModelSpec("tensorrt_llm", "python" if target == "cpu" else "tensorrtllm", max_batch_size, LLM_INPUTS,
                    LLM_OUTPUTS, decoupled=True, parameters=llm_parameters(eng, engine_dir),
                    batching=Batching(max_queue_size, preferred_batch_size=(max_batch_size,)))
    ensemble = ModelSpec(
        "ensemble", None, max_batch_size,
        # text_input and max_tokens are optional only so that a request without one reaches preprocessing,
        # which refuses it: Triton 2.51 checks an ensemble request's input count, not the names, and
        # answers a request that lacks a required input but carries an optional one with an empty response.
        inputs=[_request_tensor(request.PROMPT), _request_tensor(request.MAX_TOKENS), *SAMPLING_INPUTS],
        outputs=[Tensor("text_output", S, (-1,))],
        ensemble_steps=[
            {"model": "preprocessing",
             "inputs": {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "STOP_WORDS": "stop_words",
                        "BAD_WORDS": "bad_words", "END_ID": "end_id", "PAD_ID": "pad_id"},
             "outputs": {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_INPUT_LEN",
                         "OUT_REQUEST_OUTPUT_LEN": "_OUTPUT_LEN", "OUT_END_ID": "_END_ID", "OUT_PAD_ID": "_PAD_ID",
                         "STOP_WORDS_IDS": "_STOP_WORDS_IDS", "BAD_WORDS_IDS": "_BAD_WORDS_IDS"}},
            {"model": "tensorrt_llm",
             "inputs": {"input_ids": "_INPUT_ID", "input_lengths": "_INPUT_LEN", "request_output_len": "_OUTPUT_LEN",
                        "end_id": "_END_ID", "pad_id": "_PAD_ID", "stop_words_list": "_STOP_WORDS_IDS",
                        "bad_words_list": "_BAD_WORDS_IDS", **PASS_THROUGH},
             "outputs": {"output_ids": "_TOKENS", "sequence_length": "_SEQ_LEN"}},
            {"model": "postprocessing", "inputs": {"TOKENS_BATCH": "_TOKENS", "SEQUENCE_LENGTH": "_SEQ_LEN"},
             "outputs": {"OUTPUT": "text_output"}},
        ])
    bls = ModelSpec(
        "tensorrt_llm_bls", "python", max_batch_size,
        inputs=[_request_tensor(request.PROMPT, False), _request_tensor(request.MAX_TOKENS, False), *SAMPLING_INPUTS],
        outputs=[Tensor("text_output", S, (-1,)), Tensor("finish_reason", S, (1,)),
                 Tensor("prompt_tokens", I32, (1,)), Tensor("completion_tokens", I32, (1,))],
        decoupled=True, instances=instances.bls,
        parameters={**tok, "tensorrt_llm_model_name": "tensorrt_llm",
                    # Triton 2.51 (the CPU server) loses a mid-stream error on its way to the BLS (common.py).
                    "engine_failure_marker": "true" if target == "cpu" else "false",
                    # ... and deadlocks on the stop requests that cancel an inner request (common.cancel_address).
                    "engine_cancel_channel": "true" if target == "cpu" else "false"})
    return [pre, llm, post, ensemble, bls]


MODEL_FILES = {"preprocessing": "preprocessing.py", "postprocessing": "postprocessing.py",
               "tensorrt_llm_bls": "bls.py", "tensorrt_llm": "tensorrt_llm_cpu.py"}


def generate(engine_dir: Path, output: Path, max_batch_size: int | None = None, instances: dict | None = None,
             max_queue_size: int | None = None) -> Path:
    """`instances`: {bls, preprocessing, postprocessing: count}, each absent one the target's default
    (DEFAULT_INSTANCES)."""
    engine_dir, output = Path(engine_dir).resolve(), Path(output)
    m = manifest.read(engine_dir)
    # The synthetic engine (no compute, a GPU's pace) is served like the CPU engine, by the python stand-in.
    target = {"cpu-engine": "cpu", "synthetic-engine": "cpu", "trtllm-engine": "gpu"}.get(m["kind"])
    if target is None:
        raise UserError(f"{engine_dir} holds a {m['kind']!r}, not an engine (build one with python -m build_engine build)")
    if "engine_vocab_size" not in m:
        raise UserError(f"{engine_dir} was built by an earlier hermes-trtllm and does not record the vocabulary its "
                        "engine samples over: rebuild it")
    mbs = max_batch_size or m["limits"]["max_batch_size"]
    queue = max_queue_size or QUEUE_PER_BATCH_SLOT * mbs
    if mbs < 1 or queue < 1:
        raise UserError("--max-batch-size and --max-queue-size must be >= 1")
    counts = replace(DEFAULT_INSTANCES[target], **{k: v for k, v in (instances or {}).items() if v is not None})
    with manifest.staging(output) as tmp:
        # Inside a model folder: Triton would take a top-level folder for a model.
        tokenizer_dir = output.resolve() / "preprocessing" / "tokenizer"
        shutil.copytree(engine_dir / "tokenizer", tmp / "preprocessing" / "tokenizer")
        for spec in specs(m, target, engine_dir, tokenizer_dir, mbs, counts, queue):
            if spec.name == "tensorrt_llm":
                problems = backend_contract.check(message(spec))
                if problems:  # a bug in this generator, never a user's mistake
                    raise AssertionError("tensorrt_llm config breaks the backend contract: " + "; ".join(problems))
            text = render(spec)
            d = tmp / spec.name
            (d / "1").mkdir(parents=True, exist_ok=True)
            (d / "config.pbtxt").write_text(text)
            src = MODEL_FILES.get(spec.name)
            if spec.backend == "python" and src:
                shutil.copyfile(MODELS_DIR / src, d / "1" / "model.py")
        manifest.write(tmp, "triton-repository", engine={"path": str(engine_dir), "kind": m["kind"],
                                                          "files": m["files"]},
                       target=target, preset=m.get("preset"), settings={"max_batch_size": mbs, "instances": asdict(counts),
                                                                     "max_queue_size": queue},
                       # GPUs the engine spans: `serve` launches one tritonserver per GPU (leader mode) above 1.
                       world_size=m.get("world_size", 1), engine_vocab_size=m["engine_vocab_size"],
                       model=m["model"], limits=m["limits"])
    return output
