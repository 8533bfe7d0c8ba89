"""tensorrt_llm on a CPU host: the same config, tensors and strictness as TensorRT-LLM's C++
`tensorrtllm` backend (model_repo.backend_contract), served by the CPU engine's inflight-batching
scheduler (build_engine.cpu), or by the synthetic engine (build_engine.synthetic) under the same scheduler. Decoupled: a streaming request gets one response per UTF-8-complete
chunk of new tokens; a cancelled request frees its engine row at the next step. Sampling covers the
backend's inputs: temperature, top-k/top-p, seeds, repetition/presence/frequency penalties, min
tokens, stop and bad word lists, end id.

Strict where the C++ backend is strict: a config that breaks the contract fails the model load, and
there is no default end id (a request without `end_id` runs to `request_output_len`, as the C++
backend's -1 does). Sampling values a request leaves out take TensorRT-LLM's defaults
(common.tensorrt_llm_search; seed 0)."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from build_engine.cpu import CpuEngine, QueueFull, Sampling
from model_repo import backend_contract
from model_repo.triton_models.common import (FAILURE_MARKER, TENSORRT_LLM_DEFAULT_SEED, BadRequest, CancelWatch,
                                             CancelListener, failure_response, from_words_list, params, refusal,
                                             scalar, tensorrt_llm_search)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
REQUIRED_OUTPUTS = [t.name for t in backend_contract.OUTPUTS if not t.optional]
# Triton 2.51 checks a request's input count, not the names: a request missing a required input but
# carrying an optional one reaches the model, which refuses it as Triton would.
REQUIRED_INPUTS = [t.name for t in backend_contract.INPUTS if not t.optional]


class TritonPythonModel:
    def initialize(self, args):
        problems = backend_contract.check(json.loads(args["model_config"]))
        if problems:  # where the C++ backend fails its model load
            raise RuntimeError("tensorrt_llm config breaks the tensorrtllm backend contract: " + "; ".join(problems))
        p = params(args)
        cfg = json.loads(args["model_config"])
        # The config's batch size is the scheduler's row count; `max_tokens_in_paged_kv_cache`, when
        # set, is its KV budget (TensorRT-LLM's meaning), else every row can hold a full sequence.
        budget = p.get("max_tokens_in_paged_kv_cache", "").strip()
        # The backend's executor queue bound is the config's dynamic_batching queue policy
        # (model_instance_state.cc getExecutorConfigFromParams, TensorRT-LLM 1.2.x; absent or 0: none).
        queue = int(cfg.get("dynamic_batching", {}).get("default_queue_policy", {}).get("max_queue_size", 0))
        self.engine = CpuEngine(p[backend_contract.MODEL_PATH_PARAMETER], max_batch_size=int(cfg["max_batch_size"]),
                                kv_cache_tokens=int(budget) if budget else None, max_queue_size=queue)
        self.metrics = EngineMetrics(self.engine, args["model_name"], args["model_version"])
        self.exclude_input_default = p.get("exclude_input_in_output", "false") in backend_contract.TRUE_SPELLINGS
        self.live = {}  # request id -> engine stream, for stop requests and the cancel channel
        self.cancel_listener = CancelListener(args["model_name"], self._cancel)
        self.watch = CancelWatch()

    def _cancel(self, rid: str) -> None:
        target = self.live.get(rid)
        if target is not None:
            target.close()

    def _sampling(self, request) -> Sampling:
        def val(name, default=None):
            return scalar(pb_utils, request, name, default)

        def words(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return [] if t is None else from_words_list(t.as_numpy().reshape(2, -1))

        max_tokens = val("request_output_len")
        if max_tokens is None:
            raise BadRequest("request_output_len is not present in the request")
        end_id = None if val("end_id") is None else int(val("end_id"))
        top_p = val("runtime_top_p")
        try:
            search = tensorrt_llm_search(float(val("temperature", 1.0)), int(val("runtime_top_k", 0)),
                                         None if top_p is None else float(top_p))
            return Sampling(
                max_tokens=int(max_tokens), **search,
                min_tokens=int(val("min_tokens", 0)), repetition_penalty=float(val("repetition_penalty", 1.0)),
                presence_penalty=float(val("presence_penalty", 0.0)),
                frequency_penalty=float(val("frequency_penalty", 0.0)),
                seed=int(val("seed", TENSORRT_LLM_DEFAULT_SEED)),
                # As TensorRT-LLM: stop words are token sequences, matched on ids and kept in the output.
                stop_words=tuple(tuple(w) for w in words("stop_words_list")),
                bad_words=tuple(tuple(w) for w in words("bad_words_list")),
                # TensorRT-LLM stops only on the end id it is sent (none: -1, never stops).
                ignore_eos=end_id != self.engine.end_id,
                stop_token_ids=() if end_id in (None, self.engine.end_id) else (end_id,),
            )
        except ValueError as e:
            raise BadRequest(str(e)) from None

    @staticmethod
    def _input_ids(request):
        t = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if t is None:
            raise BadRequest("input_ids is required")
        ids = t.as_numpy()  # [batch, len]
        if ids.shape[0] != 1:
            raise BadRequest(f"the CPU engine serves one sequence per request (input_ids has batch {ids.shape[0]})")
        # With batch 1 the C++ backend uses all of input_ids and does not read input_lengths.
        return ids.reshape(-1)

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _send_tokens(self, sender, ids, flags=0):
        arr = np.array([[ids]], dtype=np.int32).reshape(1, 1, -1)
        sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", arr),
            pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32)),
        ]), flags=flags)

    def _serve(self, request):
        sender = request.get_response_sender()
        rid = request.request_id()
        try:
            absent = [n for n in REQUIRED_INPUTS if pb_utils.get_input_tensor_by_name(request, n) is None]
            if absent:  # before anything else, stop requests included, as Triton's own check would be
                raise BadRequest(f"{absent[0]} is required")
            if scalar(pb_utils, request, "stop", False):
                # TensorRT-LLM's convention: stop=true with the id of a request in flight cancels it.
                if not rid:
                    raise BadRequest("Trying to stop a request but request ID is not provided")
                self._cancel(rid)
                sender.send(flags=FINAL)
                return
            missing = [n for n in REQUIRED_OUTPUTS if n not in request.requested_output_names()]
            if missing:  # as the C++ backend's fillTritonResponse
                raise BadRequest(f"{missing[0]} tensor must be present in list of output tensors")
            ids = self._input_ids(request)
            streaming = bool(scalar(pb_utils, request, "streaming", False))
            exclude = bool(scalar(pb_utils, request, "exclude_input_in_output", self.exclude_input_default))
            stream = self.engine.submit(ids.tolist(), self._sampling(request))
        except (BadRequest, ValueError) as e:
            sender.send(pb_utils.InferenceResponse(error=refusal(pb_utils, str(e))), flags=FINAL)
            return
        except QueueFull as e:  # the backend answers a full executor queue with INTERNAL and this text
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
            return
        if rid:
            self.live[rid] = stream
        try:
            self._respond(sender, rid, stream, ids.tolist(), streaming, exclude)
        finally:
            stream.close()
            self.live.pop(rid, None)

    def _respond(self, sender, rid: str, stream, ids: list[int], streaming: bool, exclude: bool) -> None:
        generated, held, error = [], [], None
        with self.watch.watching(sender, stream.close):  # a caller that leaves frees its row, queued or not
            for step in stream:
                if step.error:
                    error = step.error
                    break
                if step.token_id is not None:
                    generated.append(step.token_id)
                    held.append(step.token_id)
                # Stream a chunk when it decodes to complete characters, and when no later step is already
                # waiting: a reader that fell behind (two cores shared by the engine and every stub) sends what
                # has piled up as one response instead of one IPC round per token. (The C++ backend sends one
                # per step, in process; from a stub, one per step at a synthetic engine's full rate deadlocked
                # Triton 2.51's python backend: its threads blocked in send, the BLS's waiting for them.)
                if streaming and held and step.text and not step.finish_reason and not stream.backlog:
                    self._send_tokens(sender, held)
                    held = []
                if step.finish_reason:
                    break
        if error:
            pb_utils.Logger.log_error(f"request {rid or '-'}: {error}")
            response = (failure_response(pb_utils, error) if rid.endswith(FAILURE_MARKER)
                        else pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
            sender.send(response, flags=FINAL)
            return
        if stream.finish_reason in (None, "cancelled"):  # by the caller, a stop request or the cancel channel
            stream.close()
            self._log_cancelled(rid, stream)
            sender.send(flags=FINAL)
        elif streaming:
            # The C++ backend's last streamed response is the final one and carries the last tokens (none,
            # [1, 1, 0] with sequence_length 0, after the end id): model_instance_state.cc WaitForResponse and
            # llmRequest.cpp createResult, TensorRT-LLM 1.2.x.
            self._send_tokens(sender, held, flags=FINAL)
        else:
            self._send_tokens(sender, generated if exclude else ids + generated, flags=FINAL)

    @staticmethod
    def _log_cancelled(rid: str, stream) -> None:
        # The id and a count only: prompts and outputs stay out of the log.
        pb_utils.Logger.log_info(f"request {rid or '-'} cancelled after {stream.generated_tokens} tokens")

    def finalize(self):
        self.watch.close()
        self.cancel_listener.close()
        self.metrics.close()
        self.engine.close()


class EngineMetrics:
    """The tensorrtllm backend's engine metrics on Triton's /metrics, from the CPU engine's state:
    the same families, labels and label values (custom_metrics_reporter.cc, TensorRT-LLM 1.2.x
    triton_backend), so dashboards, alerts and autoscalers work on both. KV "blocks" are counted in
    blocks of TOKENS_PER_BLOCK positions."""

    TOKENS_PER_BLOCK = 64
    INTERVAL_S = 0.1

    def __init__(self, engine: CpuEngine, model: str, version: str):
        self.engine = engine
        base = {"model": model, "version": str(version)}
        gauge = pb_utils.MetricFamily.GAUGE
        self.families = {
            "request": pb_utils.MetricFamily("nv_trt_llm_request_metrics", "TRT LLM request metrics", gauge),
            "kv": pb_utils.MetricFamily("nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics", gauge),
            "ifb": pb_utils.MetricFamily("nv_trt_llm_inflight_batcher_metrics",
                                         "TRT LLM inflight_batcher-specific metrics", gauge),
            "general": pb_utils.MetricFamily("nv_trt_llm_general_metrics", "General TRT LLM metrics", gauge),
        }
        labels = {"request": ("request_type", ["active", "max", "scheduled", "context", "waiting"]),
                  "kv": ("kv_cache_block_type", ["max", "free", "used", "tokens_per", "fraction"]),
                  "ifb": ("inflight_batcher_specific_metric",
                          ["total_context_tokens", "generation_requests", "micro_batch_id", "paused_requests"]),
                  "general": ("general_type", ["timestamp", "iteration_counter"])}
        self.metrics = {(fam, value): self.families[fam].Metric(labels={**base, key: value})
                        for fam, (key, values) in labels.items() for value in values}
        self._publish()  # right from readiness on, not 0.1 s later
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-metrics", daemon=True)
        self._thread.start()

    def values(self) -> dict[tuple[str, str], float]:
        e, per = self.engine, self.TOKENS_PER_BLOCK
        s = e.stats(tokens_per_block=per)
        max_blocks, used = e.kv_cache_tokens // per, s["kv_blocks_used"]
        return {("request", "active"): s["active"], ("request", "max"): e.max_batch_size,
                ("request", "scheduled"): s["scheduled"], ("request", "context"): s["context"],
                ("request", "waiting"): s["waiting"],
                ("kv", "max"): max_blocks, ("kv", "used"): used, ("kv", "free"): max(max_blocks - used, 0),
                ("kv", "tokens_per"): per, ("kv", "fraction"): used / max_blocks if max_blocks else 0.0,
                ("ifb", "total_context_tokens"): s["context_tokens"], ("ifb", "generation_requests"): s["generation"],
                ("ifb", "micro_batch_id"): 0, ("ifb", "paused_requests"): 0,
                ("general", "timestamp"): int(time.time() * 1e6), ("general", "iteration_counter"): s["iterations"]}

    def _publish(self) -> None:
        for key, value in self.values().items():
            self.metrics[key].set(value)

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._publish()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.metrics.clear()  # metrics before their families (the python backend's rule)
        self.families.clear()
