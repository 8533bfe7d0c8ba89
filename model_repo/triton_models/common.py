"""Helpers shared by the python-backend models (imported from the installed package)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import secrets
import socket
import struct
import threading
from pathlib import Path

import numpy as np

from common.errors import BAD_REQUEST_MARKER
from common.limits import check_sampling
from common.request import SAMPLING


def params(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def scalar(pb_utils, request, name: str, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy()
    if a.size == 0:
        return default
    if a.size > 1:  # a batch of requests in one: its other rows would be dropped silently
        raise BadRequest(f"{name} holds {a.size} values; this deployment takes one request (batch 1) at a time")
    v = a.reshape(-1)[0]
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return v.item() if hasattr(v, "item") else v


def strings(pb_utils, request, name: str) -> list[str]:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    out = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]
    return [s for s in out if s]


def to_words_list(tokenizer, words: list[str], banned_ids: list[int] = ()) -> np.ndarray:
    """TensorRT-LLM's [2, L] words list: row 0 the concatenated ids, row 1 the end offsets (-1 padded);
    each of `banned_ids` a word of its own (one token: banned at every step)."""
    ids, offsets = [], []
    for w in words:
        ids.extend(tokenizer(w, add_special_tokens=False)["input_ids"])
        offsets.append(len(ids))
    for i in banned_ids:
        ids.append(int(i))
        offsets.append(len(ids))
    n = max(len(ids), 1)
    out = np.full((2, n), -1, dtype=np.int32)
    out[0, : len(ids)] = ids
    out[1, : len(offsets)] = offsets
    return out


def padding_ids(tokenizer, p: dict[str, str]) -> list[int]:
    """The ids the engine can sample but the tokenizer does not have: ModelOpt pads the vocabulary to a
    multiple of 64 with zero rows (Nous-Hermes-2-Mistral: 32002 -> 32064), whose logits are 0, not -inf,
    and TensorRT-LLM samples over the checkpoint's whole vocab_size (the engine's `engine_vocab_size`,
    a model parameter). Every request to tensorrt_llm bans them as one-token bad words."""
    return list(range(len(tokenizer), int(p["engine_vocab_size"])))


def from_words_list(arr: np.ndarray) -> list[list[int]]:
    ids, offsets = arr[0], [int(o) for o in arr[1] if o >= 0]
    out, start = [], 0
    for end in offsets:
        out.append([int(i) for i in ids[start:end]])
        start = end
    return [w for w in out if w]


NUMPY = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}
# The public sampling input -> (tensorrt_llm input, dtype), from the request's declaration.
SAMPLING_TO_ENGINE = {f.name: (f.engine, NUMPY[f.wire]) for f in SAMPLING}


def tensorrt_llm_search(temperature: float, top_k: int, top_p: float | None) -> dict:
    """TensorRT-LLM's sampling rule for what a request gives or leaves out (`top_p` None: absent). Read in
    NVIDIA/TensorRT-LLM (1.x; paths below are in that repository): absent values are temperature 1, top-k 0
    and top-p 0 (cpp/tensorrt_llm/layers/defaultDecodingParams.h); top-k 0 with top-p 0 is greedy, whatever
    the temperature, and top-k > 0 with top-p 0 is plain top-k (setupTopKRuntimeArgs,
    cpp/tensorrt_llm/kernels/samplingTopKKernels.cu). So a request
    with a temperature alone is greedy there, and here too. The backend reads a top-p <= 0 as absent; one
    over 1 is refused (SamplingConfig::checkTopP), here by Sampling's own check. A temperature it refuses
    (negative or NaN, SamplingConfig::checkTemperature; here an infinite one too) is refused even where
    greedy would not use it."""
    check_sampling(temperature=temperature)
    if top_p is not None and top_p <= 0:  # absent (triton_backend/inflight_batcher_llm/src/utils.cc)
        top_p = None
    if top_k == 0 and top_p is None:
        return {"temperature": 0.0}
    return {"temperature": temperature, "top_k": top_k, "top_p": 1.0 if top_p is None else top_p}


# A request without a seed: TensorRT-LLM's sampling layers seed it with 0 (defaultDecodingParams.h, getSeed).
TENSORRT_LLM_DEFAULT_SEED = 0


def engine_sampling(given: dict) -> dict[str, np.ndarray]:
    """The tensorrt_llm sampling tensors ([1, 1] each) for the values a caller gave, by ensemble name, with
    this deployment's meaning (the Python client's): temperature 0 (the default) is greedy,
    top_p defaults to 1 and top_k to 0 (off).

    TensorRT-LLM reads them otherwise (tensorrt_llm_search): absent values are temperature 1, top-k 0,
    top-p 0, and top-k 0 with top-p 0 is greedy. So greedy goes to the engine
    as top-k 1 (temperature 0 would also be allowed there, SamplingConfig::checkTemperature, but its
    kernels scale the logits by 1 / (temperature + 1e-6), cpp/tensorrt_llm/kernels/penaltyKernels.cu), and
    sampling always carries its temperature, top-k and top-p, and a seed: without one TensorRT-LLM seeds
    every request with 0 (its sampling layers' setup, "Initialize curand states using the default seed 0"),
    and two like requests would draw the same reply."""
    values = dict(given)
    if values.get("temperature", 0.0) == 0 or values.get("top_k") == 1:
        values.pop("temperature", None)
        values.pop("top_p", None)
        values["top_k"] = 1
    else:
        values.setdefault("top_k", 0)
        values.setdefault("top_p", 1.0)
        values.setdefault("seed", secrets.randbits(64))
    return {target: np.array([[values[name]]], dtype=dtype)
            for name, (target, dtype) in SAMPLING_TO_ENGINE.items() if name in values}


class InnerRequestIds:
    """Ids for the BLS's requests to tensorrt_llm: the caller's id (for tracing in the engine's log), this
    process and a serial number. TensorRT-LLM's backend keys a stop request by this id alone and keeps
    one request per id (model_instance_state.cc, mTritonRequestIdToRequestIds, TensorRT-LLM 1.2.x), and
    every BLS instance is a process of its own: without the process, two callers that send the same id
    (or none) through two instances would share one, and one's cancellation would end the other."""

    def __init__(self):
        self._serial = itertools.count()

    def next(self, caller_id: str | None) -> str:
        return f"{caller_id or 'bls'}#{os.getpid()}.{next(self._serial)}"


class BadRequest(ValueError):
    """A request the model refuses with a clear message; the server keeps serving."""


class PromptEncoder:
    """Prompt text -> ids, the one rule of preprocessing and the BLS: a missing or empty prompt, one too
    large for any `max_input_len` tokens (refused by size before the tokenizer spends time on it) and one
    over `max_input_len` tokens are refused; BOS is added exactly once (a rendered chat template may
    already start with it)."""

    def __init__(self, tokenizer, max_input_len: int):
        from build_engine.tokenization import max_prompt_bytes

        self.tok, self.max_input_len = tokenizer, int(max_input_len)
        self.max_prompt_bytes = max_prompt_bytes(tokenizer, self.max_input_len)

    def encode(self, text: str | None) -> list[int]:
        if text is None:
            raise BadRequest("text_input is required")
        if not text:
            raise BadRequest("text_input is empty")
        size = len(text.encode("utf-8"))
        if size > self.max_prompt_bytes:
            raise BadRequest(f"the prompt is {size} bytes; at most {self.max_input_len} tokens are accepted, "
                             f"which no text over {self.max_prompt_bytes} bytes fits")
        add_special = not (self.tok.bos_token and text.startswith(self.tok.bos_token))
        ids = self.tok(text, add_special_tokens=add_special)["input_ids"]
        if len(ids) > self.max_input_len:
            raise BadRequest(f"the prompt has {len(ids)} tokens; the engine accepts at most {self.max_input_len}")
        return ids


def check_no_parameters(request) -> None:
    """Request parameters (HTTP /generate's unknown JSON fields land there) are not inputs: refuse
    them rather than ignore a misspelled option."""
    unknown = sorted(json.loads(request.parameters() or "{}"))
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)}")


def refusal(pb_utils, message: str):
    """The error a refused request gets: marked for clients (in-band stream errors carry no status)
    and INVALID_ARG, which Triton's HTTP frontend answers with 400."""
    if not message.startswith(BAD_REQUEST_MARKER):
        message = BAD_REQUEST_MARKER + message
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)


class StopText:
    """Cuts generated text at the first stop sequence (which the reply does not include, as in
    OpenAI's API), holding back a tail that could begin one, so streamed deltas never show part of a
    stop sequence. TensorRT-LLM itself returns the stop word's tokens."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.held + delta
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return text[: min(cuts)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class UnknownToken(ValueError):
    """The engine emitted an id the tokenizer does not have."""


class ReplyText:
    """A reply's token ids -> its text deltas: detokenized without losing SentencePiece spaces or splitting
    a character, the end id skipped, cut before the first stop string, and the tokens counted up to it.
    Ids may come one at a time or several at once (what piled up while the last delta was sent): the
    concatenated deltas, the count and the stop are the same either way."""

    def __init__(self, tokenizer, end_id: int, stops: list[str], vocab_size: int):
        from build_engine.tokenization import Detokenizer

        self.detok, self.cut, self.vocab_size = Detokenizer(tokenizer, skip_ids=(end_id,)), StopText(stops), vocab_size
        self.tokens = 0  # generated tokens, up to the one that completes a stop string
        self.pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.cut.stopped

    def push(self, ids) -> str:
        out = []
        for t in ids:
            if self.cut.stopped:  # the reply is complete; what the engine sent after it is not part of it
                break
            if not 0 <= t < self.vocab_size:
                raise UnknownToken(f"the engine emitted token id {t}, which the tokenizer does not have")
            self.tokens += 1
            out.append(self.cut.push(self.detok.push(t)))
        delta = "".join(out)
        self.pieces.append(delta)
        return delta

    def finish(self) -> str:
        """The text still held back (an incomplete character, a tail that could begin a stop string)."""
        tail = self.cut.push(self.detok.flush()) + self.cut.flush()
        self.pieces.append(tail)
        return tail

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class CancelWatch:
    """Watches the callers of a model's requests in flight, as TensorRT-LLM's backend watches its own
    (model_instance_state.cc, its WaitForCancel thread, TensorRT-LLM 1.2.x): one thread asks each
    request's `sender.is_cancelled()` (a round trip to the Triton process) every `interval_s` and, the
    first time it is true, sets that request's `cancelled` and calls its `on_cancel` (on this thread).
    So a caller that leaves while its request waits in the engine's queue or in a long prefill is seen
    then, not when its first token arrives. A request is watched only inside `watching`: leave it
    before sending the final response (the sender is not asked after that)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval = interval_s
        self._live: dict[int, Watched] = {}
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancel-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, sender, on_cancel=lambda: None):
        w, key = Watched(sender, on_cancel), next(self._keys)
        with self._lock:
            self._live[key] = w
        try:
            yield w
        finally:
            with self._lock:
                del self._live[key]
            with w.lock:  # an is_cancelled() under way ends first
                w.active = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                live = list(self._live.values())
            for w in live:
                with w.lock:
                    if not w.active or w.cancelled or not w.sender.is_cancelled():
                        continue
                    w.cancelled = True
                w.on_cancel()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


@dataclasses.dataclass
class Watched:
    """One watched request: `cancelled` once its caller has gone."""
    sender: object
    on_cancel: object
    cancelled: bool = False
    active: bool = True
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


# The python backend of Triton < 2.57 (python_backend r24.10-r25.03: infer_response.cc SaveToSharedMemory
# writes a response's id only when it carries no error; fixed by python_backend PR #398, in r25.04 and
# the GPU container's r26.07) files an error response that follows other responses under a wrong id:
# a BLS caller never sees it, nor the end of the stream, and waits for ever. The CPU server is Triton
# 2.51, so there the BLS asks the CPU tensorrt_llm to end a failed stream with a normal final response
# instead: sequence_length -1 and the error message's UTF-8 bytes as output_ids. It asks by ending the
# request id with FAILURE_MARKER (a BLS request parameter would do, but in Triton 2.51 BLS requests
# with parameters were seen to leave the BLS stub unhealthy under load). Direct clients still get an
# error response, as from the C++ backend.
FAILURE_MARKER = "~failure-marker"


def failure_response(pb_utils, message: str):
    data = np.frombuffer(message.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", data.reshape(1, 1, -1)),
        pb_utils.Tensor("sequence_length", np.array([[-1]], dtype=np.int32)),
    ])


def failure_message(pb_utils, response) -> str | None:
    """The error a FAILURE_MARKER response carries, None for any other response."""
    seq = pb_utils.get_output_tensor_by_name(response, "sequence_length")
    if seq is None or int(seq.as_numpy().reshape(-1)[0]) != -1:
        return None
    ids = pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy().reshape(-1)
    return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", "replace")


# Cancelling an inner request on the CPU server (Triton 2.51). TensorRT-LLM's way is a second request with the same
# id and stop=true; the BLS sends one for every closed stream and every stop string. In Triton 2.51's python
# backend, those extra BLS requests deadlocked the server: twice in 30-minute soaks, and in 2 minutes under 70 %
# early closes (the tensorrt_llm stub's threads blocked in ResponseSender.send, the BLS's in exec(); see
# RELIABILITY.md and triton-inference-server/server#5988). Where the BLS and the CPU
# tensorrt_llm share a host, the BLS sends the request id as one datagram instead, outside Triton. The socket is in
# Linux's abstract namespace (nothing on disk to leave behind), named after the tritonserver process that is every
# stub's parent, so two servers on one host never cross. An abstract socket has no file permissions, so the listener
# takes a datagram only from a process of the same user whose parent is that same tritonserver (the kernel's
# SCM_CREDENTIALS): another local process cannot cancel requests. The GPU keeps stop requests: the C++ backend
# takes them.
def cancel_address(model: str) -> bytes:
    return f"\0hermes-trtllm-cancel-{os.getppid()}-{model}".encode()


class CancelListener:
    """The CPU tensorrt_llm's end of the channel: calls `on_cancel(request_id)` for every datagram."""

    def __init__(self, model: str, on_cancel):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(cancel_address(model))
        except OSError as e:  # a second instance of the model: one listener per server and model
            self.sock.close()
            raise RuntimeError(f"cannot open the cancel channel of {model} ({e}); the CPU tensorrt_llm runs as "
                               "one instance") from None
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.on_cancel = on_cancel
        self.refused = 0  # datagrams from anyone but a sibling stub
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancel-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except socket.timeout:
                continue
            except OSError:
                return
            if _from_a_sibling(ancillary):
                self.on_cancel(data.decode("utf-8", "replace"))
            else:
                self.refused += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _from_a_sibling(ancillary) -> bool:
    """Whether the kernel-checked sender is this user's, with this process's parent."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, uid, _ = struct.unpack("3i", data[: struct.calcsize("3i")])
            if uid != os.getuid():
                return False
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                return int(stat.rsplit(")", 1)[1].split()[1]) == os.getppid()
            except (OSError, ValueError, IndexError):
                return False
    return False


class CancelSender:
    """The BLS's end: `send(request_id)` is True once the datagram is on its way, False if no listener is there
    (then the caller falls back to a stop request)."""

    def __init__(self, model: str):
        self.address = cancel_address(model)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)  # a full queue for longer than this: fall back

    def send(self, request_id: str) -> bool:
        try:
            self.sock.sendto(request_id.encode("utf-8"), self.address)
            return True
        except OSError:  # no listener (not the CPU tensorrt_llm), or its queue full for the moment
            return False
