"""What TensorRT-LLM 1.2.x's C++ `tensorrtllm` Triton backend requires of the `tensorrt_llm` model's
config, as data, with the upstream source of each fact; and one check of a config against it.

The generator takes the `tensorrt_llm` tensors from here (GPU and CPU alike), the CPU stand-in
(triton_models/tensorrt_llm_cpu.py) refuses to load a config this check rejects, exactly where the
C++ backend would fail its model load, and the tests check the generated GPU config with it.

Sources (NVIDIA/TensorRT-LLM; the index holds these files by commit, not by tag):
  MIS  = triton_backend/inflight_batcher_llm/src/model_instance_state.cc @ 0c8de69a (1.2.0rc8)
  MS   = triton_backend/inflight_batcher_llm/src/model_state.cc @ 5cdd6921
  UTIL = triton_backend/inflight_batcher_llm/src/utils.cc @ c8c6df08
  TPL  = triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt @ 0c8de69a
  RUN  = cpp/tensorrt_llm/batch_manager/createNewDecoderRequests.cpp @ b35ac1b6 (1.2.0rc2)
"""

from __future__ import annotations

from dataclasses import dataclass

# Read with GetParameter<std::string> outside any try block: a missing key throws "Cannot find
# parameter with name: ..." (MS) and ModelInstanceState::Create fails the model load (MIS).
REQUIRED_PARAMETERS = {
    "gpt_model_type": "MIS ModelInstanceState(): GetParameter<std::string>(\"gpt_model_type\")",
    "tokenizer_dir": "MIS getGuidedDecodingConfigFromParams()",
    "xgrammar_tokenizer_info_path": "MIS getGuidedDecodingConfigFromParams()",
    "guided_decoding_backend": "MIS getGuidedDecodingConfigFromParams()",
}
# Anything else throws "Invalid gpt_model_type. Must be v1/inflight_batching/inflight_fused_batching." (MIS)
GPT_MODEL_TYPES = ("V1", "v1", "inflight_batching", "inflight_fused_batching")
# gpt_model_path is read in a try block with a filesystem::exists check; a missing or absent path is
# left empty and "Both encoder and decoder model paths are empty" then fails the load (MIS).
MODEL_PATH_PARAMETER = "gpt_model_path"
# Guided decoding stays off when either of these is empty (MIS getGuidedDecodingConfigFromParams).
GUIDED_DECODING_OFF = {"xgrammar_tokenizer_info_path": "", "guided_decoding_backend": ""}
# GetParameter<bool> accepts only these spellings, else "Cannot convert X to a boolean." (MS); inside
# the backend's try blocks a bad spelling silently becomes the default, so we refuse it here.
TRUE_SPELLINGS, FALSE_SPELLINGS = ("True", "true", "TRUE", "1"), ("False", "false", "FALSE", "0")
BOOL_SPELLINGS = TRUE_SPELLINGS + FALSE_SPELLINGS
BOOL_PARAMETERS = ("exclude_input_in_output", "enable_chunked_context", "enable_kv_cache_reuse",
                   "normalize_log_probs", "kv_cache_onboard_blocks", "multi_block_mode",
                   "enable_context_fmha_fp32_acc", "cuda_graph_mode")
BATCH_SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")  # MIS; else a warning and the default


@dataclass(frozen=True)
class BackendTensor:
    name: str
    dtype: str
    dims: tuple[int, ...]
    scalar: bool = False  # `reshape: { shape: [ ] }`: the backend reads one value per request
    ragged: bool = False  # `allow_ragged_batch: true`
    optional: bool = True


_I32, _F32, _U64, _B = "TYPE_INT32", "TYPE_FP32", "TYPE_UINT64", "TYPE_BOOL"


def _scalar(name: str, dtype: str, optional: bool = True) -> BackendTensor:
    return BackendTensor(name, dtype, (1,), scalar=True, optional=optional)


# The backend's inputs that this project sends, as TPL declares them. input_lengths and
# request_output_len are the only non-optional inputs (TPL); request_output_len is also checked per
# request: "request_output_len is not present in the request" (UTIL).
INPUTS = (
    BackendTensor("input_ids", _I32, (-1,), ragged=True),
    _scalar("input_lengths", _I32, optional=False),
    _scalar("request_output_len", _I32, optional=False),
    # No default end id: a request without one gets mEndId.value_or(-1) and never stops on EOS (RUN).
    _scalar("end_id", _I32), _scalar("pad_id", _I32),
    BackendTensor("stop_words_list", _I32, (2, -1), ragged=True),
    BackendTensor("bad_words_list", _I32, (2, -1), ragged=True),
    _scalar("runtime_top_k", _I32), _scalar("runtime_top_p", _F32), _scalar("temperature", _F32),
    _scalar("repetition_penalty", _F32), _scalar("presence_penalty", _F32), _scalar("frequency_penalty", _F32),
    _scalar("min_tokens", _I32), _scalar("seed", _U64),
    _scalar("streaming", _B), _scalar("exclude_input_in_output", _B),
    # stop=true with the Triton request id of a request in flight cancels it (MIS handleStopRequest).
    _scalar("stop", _B),
)
# output_ids and sequence_length must be requested: "%s tensor must be present in list of output
# tensors" (MIS fillTritonResponse). Shapes per response: output_ids [1, beams, len], sequence_length [1, beams].
OUTPUTS = (
    BackendTensor("output_ids", _I32, (-1, -1), optional=False),
    BackendTensor("sequence_length", _I32, (-1,), optional=False),
)
# input_ids must reach the backend as [batch, len] ("Expected inputTokens tensors to have 2
# dimensions", UTIL): max_batch_size must be > 0. Streaming and batch > 1 need decoupled mode (UTIL).
# dynamic_batching.default_queue_policy.max_queue_size becomes the executor's maxQueueSize; 0 means
# unbounded (MIS), so the contract asks for a bound.


def _dims(values) -> tuple[int, ...]:
    return tuple(int(d) for d in values)


def check(cfg) -> list[str]:
    """Every way `cfg` (a ModelConfig message, or the python backend's JSON dict of it) breaks the
    contract; empty when the C++ backend would load it and serve this project's requests."""
    if not isinstance(cfg, dict):
        from google.protobuf import json_format

        cfg = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    problems = []
    params = {k: (v or {}).get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
    for key, source in REQUIRED_PARAMETERS.items():
        if key not in params:
            problems.append(f"parameter {key!r} is missing (the backend reads it without a default: {source})")
    if "gpt_model_type" in params and params["gpt_model_type"] not in GPT_MODEL_TYPES:
        problems.append(f"gpt_model_type {params['gpt_model_type']!r} is not one of {', '.join(GPT_MODEL_TYPES)}")
    if not params.get(MODEL_PATH_PARAMETER):
        problems.append(f"parameter {MODEL_PATH_PARAMETER!r} (the engine folder) is missing or empty")
    for key in BOOL_PARAMETERS:
        if key in params and params[key] not in BOOL_SPELLINGS:
            problems.append(f"parameter {key!r} = {params[key]!r} is not a boolean the backend parses")
    policy = params.get("batch_scheduler_policy")
    if policy is not None and policy not in BATCH_SCHEDULER_POLICIES:
        problems.append(f"batch_scheduler_policy {policy!r} is not one of {', '.join(BATCH_SCHEDULER_POLICIES)}")
    if int(cfg.get("max_batch_size", 0)) < 1:
        problems.append("max_batch_size must be >= 1 (input_ids must reach the backend as [batch, len])")
    if not (cfg.get("model_transaction_policy") or {}).get("decoupled"):
        problems.append("model_transaction_policy.decoupled must be true (streaming needs it)")
    queue = ((cfg.get("dynamic_batching") or {}).get("default_queue_policy") or {}).get("max_queue_size")
    if not queue or int(queue) < 1:
        problems.append("dynamic_batching.default_queue_policy.max_queue_size must bound the queue (0 = unbounded)")
    problems += _check_tensors("input", cfg.get("input") or [], INPUTS)
    problems += _check_tensors("output", cfg.get("output") or [], OUTPUTS)
    return problems


def _check_tensors(kind: str, declared: list[dict], contract: tuple[BackendTensor, ...]) -> list[str]:
    problems = []
    by_name = {t["name"]: t for t in declared}
    for want in contract:
        got = by_name.get(want.name)
        if got is None:
            if not want.optional:
                problems.append(f"{kind} {want.name!r} is missing")
            continue
        if got.get("data_type") != want.dtype or _dims(got.get("dims", ())) != want.dims:
            problems.append(f"{kind} {want.name!r} is {got.get('data_type')} {list(_dims(got.get('dims', ())))}; "
                            f"the backend declares {want.dtype} {list(want.dims)}")
        reshape = got.get("reshape")
        if want.scalar and (reshape is None or _dims(reshape.get("shape", ())) != ()):
            problems.append(f"{kind} {want.name!r} needs reshape: {{ shape: [ ] }} (a per-request scalar)")
        if bool(got.get("allow_ragged_batch")) != want.ragged:
            problems.append(f"{kind} {want.name!r} must {'' if want.ragged else 'not '}set allow_ragged_batch")
        if kind == "input" and bool(got.get("optional")) != want.optional:
            problems.append(f"input {want.name!r} must {'' if want.optional else 'not '}be optional")
    known = {t.name for t in contract}
    problems += [f"{kind} {n!r} is not one this project's backend contract knows" for n in by_name if n not in known]
    return problems
