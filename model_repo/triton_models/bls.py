"""tensorrt_llm_bls: the streaming chat model. Tokenizes the prompt in process with preprocessing's own
rule (common.PromptEncoder: one place turns text into ids, BOS exactly once; a BLS call to preprocessing
would cost a round trip through the server per request), calls `tensorrt_llm` through BLS, and emits
correct text deltas: a stateful detokenizer keeps SentencePiece leading spaces and never splits a
multi-byte character, so the concatenated deltas equal the non-streamed text.

TensorRT-LLM's backend has no default end id (a request without one never stops), so every inner
request carries an end and a pad id: the request's own, else the tokenizer's, as preprocessing settles
them for the ensemble; and bans the ids the engine has but the tokenizer lacks (common.padding_ids)."""

import collections
import dataclasses
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from build_engine.tokenization import load_tokenizer
from common.limits import check_sampling
from model_repo.triton_models.common import (FAILURE_MARKER, SAMPLING_TO_ENGINE, BadRequest, CancelSender, CancelWatch,
                                             InnerRequestIds, PromptEncoder, ReplyText, UnknownToken,
                                             check_no_parameters, engine_sampling, failure_message, padding_ids,
                                             params, refusal, scalar, strings, to_words_list)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The last requests' BLS objects (requests, their NumPy-backed tensors, response iterators), kept so that
# their last reference is dropped here, by Python under the GIL, and not by the stub's own threads: the
# python backend of Triton 2.51 frees NumPy-backed tensors without the GIL (python_backend PR #390, fixed
# in r24.12), which corrupts the stub's heap under load ("malloc(): unaligned tcache chunk detected",
# then "Stub process is not healthy"). For the same reason every inner stream is read to its end.
_KEEP: collections.deque = collections.deque(maxlen=256)  # some 128 requests: seconds at any load


class TritonPythonModel:
    def initialize(self, args):
        p = params(args)
        self.tok = load_tokenizer(p["tokenizer_dir"])
        self.prompts = PromptEncoder(self.tok, int(p["max_input_len"]))
        self.end_id, self.pad_id = int(p["end_id"]), int(p["pad_id"])
        self.max_output_len, self.max_seq_len = int(p["max_output_len"]), int(p["max_seq_len"])
        self.padding, self.vocab_size = padding_ids(self.tok, p), len(self.tok)
        self.llm = p.get("tensorrt_llm_model_name", "tensorrt_llm")
        # CPU deployments only (Triton 2.51): see common.FAILURE_MARKER.
        self.failure_marker = p.get("engine_failure_marker", "false") == "true"
        # CPU deployments only (Triton 2.51): see common.cancel_address.
        self.cancel = CancelSender(self.llm) if p.get("engine_cancel_channel", "false") == "true" else None
        self.watch = CancelWatch()

    _ids = InnerRequestIds()

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _llm_request(self, request, ids, end_id: int, pad_id: int):
        max_tokens = scalar(pb_utils, request, "max_tokens")
        if max_tokens is None:
            raise BadRequest("max_tokens is required")
        given = {name: v for name in SAMPLING_TO_ENGINE if (v := scalar(pb_utils, request, name)) is not None}
        check_sampling(max_tokens=max_tokens, max_output_len=self.max_output_len, prompt_tokens=len(ids),
                       max_seq_len=self.max_seq_len, **given)
        tensors = [
            pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32)),
            pb_utils.Tensor("request_output_len", np.array([[max_tokens]], dtype=np.int32)),
            pb_utils.Tensor("streaming", np.array([[True]])),
            pb_utils.Tensor("exclude_input_in_output", np.array([[True]])),
            pb_utils.Tensor("end_id", np.array([[end_id]], dtype=np.int32)),
            pb_utils.Tensor("pad_id", np.array([[pad_id]], dtype=np.int32)),
        ]
        for name, v in engine_sampling(given).items():
            tensors.append(pb_utils.Tensor(name, v))
        stop_words = strings(pb_utils, request, "stop_words")
        if stop_words:
            tensors.append(pb_utils.Tensor("stop_words_list", to_words_list(self.tok, stop_words)[None]))
        bad_words = strings(pb_utils, request, "bad_words")
        if bad_words or self.padding:
            tensors.append(pb_utils.Tensor("bad_words_list", to_words_list(self.tok, bad_words, self.padding)[None]))
        # The engine request's id carries the caller's, so the engine's log lines can be traced to it.
        rid = self._ids.next(request.request_id()) + (FAILURE_MARKER if self.failure_marker else "")
        return pb_utils.InferenceRequest(model_name=self.llm, inputs=tensors, request_id=rid,
                                         requested_output_names=["output_ids", "sequence_length"])

    def _stop(self, request_id: str) -> None:
        """Cancel an inner request the way TensorRT-LLM's backend defines it: a request with the same
        id and stop=true (BLS requests cannot be cancelled directly in Triton 2.51); on the CPU server,
        through the cancel channel (common.cancel_address)."""
        if self.cancel is not None and self.cancel.send(request_id):
            return
        one = np.array([[1]], dtype=np.int32)
        stop = pb_utils.InferenceRequest(
            model_name=self.llm, request_id=request_id, requested_output_names=["output_ids"],
            inputs=[pb_utils.Tensor("input_ids", one), pb_utils.Tensor("input_lengths", one),
                    pb_utils.Tensor("request_output_len", one), pb_utils.Tensor("stop", np.array([[True]]))])
        responses = stop.exec(decoupled=True)
        _KEEP.append((stop, responses))
        _drain(responses)

    @staticmethod
    def _response(wanted, text, n_out, finish_reason=None, n_prompt=None):
        """Only the outputs the caller asked for (`wanted`). A streamed delta is its text and the tokens so
        far; finish_reason and prompt_tokens come once, on the final response (every response is a message
        through shared memory and over the wire: the fewer tensors, the less each token costs)."""
        values = {"text_output": np.array([text.encode("utf-8")], dtype=object),
                  "completion_tokens": np.array([n_out], dtype=np.int32)}
        if finish_reason is not None:
            values["finish_reason"] = np.array([finish_reason.encode()], dtype=object)
            values["prompt_tokens"] = np.array([n_prompt], dtype=np.int32)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, v) for name, v in values.items() if name in wanted])

    def _parse(self, request) -> "_Call":
        """The request checked, its prompt tokenized and its inner request built; BadRequest if refused."""
        check_no_parameters(request)
        ids = self.prompts.encode(scalar(pb_utils, request, "text_input"))
        end_id, pad_id = (int(scalar(pb_utils, request, name, default))
                          for name, default in (("end_id", self.end_id), ("pad_id", self.pad_id)))
        inner = self._llm_request(request, ids, end_id, pad_id)  # checks max_tokens and the sampling values
        return _Call(ids=ids, end_id=end_id, stream=bool(scalar(pb_utils, request, "stream", False)),
                     wanted=set(request.requested_output_names()),
                     max_tokens=int(scalar(pb_utils, request, "max_tokens")),
                     stops=strings(pb_utils, request, "stop_words"), inner=inner)

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            call = self._parse(request)
        except (BadRequest, ValueError) as e:
            sender.send(pb_utils.InferenceResponse(error=refusal(pb_utils, str(e))), flags=FINAL)
            return
        try:
            final = self._relay(call, sender)
        except Exception as e:  # a broken inner stream fails this request only
            final = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}"))
        if final is None:  # cancelled by the caller: the stream ends without another response
            sender.send(flags=FINAL)
        else:
            sender.send(final, flags=FINAL)

    def finalize(self):
        self.watch.close()

    def _relay(self, call: "_Call", sender):
        """Runs the inner request, sends the text deltas (when streaming) and returns the final response,
        or None if the caller cancelled. Every inner stream is read to its end (see _KEEP)."""
        text = ReplyText(self.tok, call.end_id, call.stops, self.vocab_size)
        rid = call.inner.request_id()
        # A caller that leaves stops the inner request at once, queued or mid-prefill included.
        with self.watch.watching(sender, lambda: self._stop(rid)) as caller:
            responses = call.inner.exec(decoupled=True)
            _KEEP.append((call.inner, responses))
            for r in responses:
                if caller.cancelled:  # the inner request is stopped: read what is still in flight
                    _drain(responses)
                    return None
                if r.has_error():
                    return pb_utils.InferenceResponse(error=pb_utils.TritonError(r.error().message()))
                failure = failure_message(pb_utils, r)
                if failure is not None:
                    raise RuntimeError(failure)
                out = pb_utils.get_output_tensor_by_name(r, "output_ids")
                if out is None or text.stopped:  # after a stop string: drain what is in flight
                    continue
                try:
                    delta = text.push(out.as_numpy().reshape(-1).tolist())
                except UnknownToken as e:  # the tokenizer would drop it from the text without a word: fail, free the slot
                    self._stop(rid)
                    _drain(responses)
                    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}"))
                if text.stopped:  # the reply is complete: free the engine's slot instead of generating on
                    self._stop(rid)
                if call.stream and delta:
                    sender.send(self._response(call.wanted, delta, text.tokens))
            if caller.cancelled:  # the caller left as the inner stream ended
                return None
        tail = text.finish()
        reason = "length" if text.tokens >= call.max_tokens and not text.stopped else "stop"
        return self._response(call.wanted, tail if call.stream else text.text, text.tokens, reason, len(call.ids))


def _drain(responses) -> None:
    for _ in responses:
        pass


@dataclasses.dataclass
class _Call:
    """One chat request, checked and ready to run."""
    ids: list[int]
    end_id: int
    stream: bool
    wanted: set[str]  # the outputs the caller asked for
    max_tokens: int
    stops: list[str]
    inner: object  # the tensorrt_llm InferenceRequest
