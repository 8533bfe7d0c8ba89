"""Hostile requests to every model the repository exposes, over gRPC and HTTP (issue #13 item 3).

Hypothesis generates requests for ensemble, tensorrt_llm_bls, tensorrt_llm, preprocessing and
postprocessing: wrong dtypes and shapes, batches > 1, empty, huge and invalid-UTF-8 strings,
NaN/inf/negative sampling values, oversized stop-word lists, unknown inputs, fields and parameters.
Every request must end within a timeout in a valid answer or a clear error (non-empty, no Python
traceback); a request that is certainly invalid must be refused, not answered; after every example
the server is ready and still serves a normal request. Schemathesis fuzzes the OpenAI frontend from
its own /openapi.json. Budgets are fixed and derandomized (no example database): CI runs the same
examples every time.
"""

from __future__ import annotations

import json
import math
import queue
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
import schemathesis
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

TIMEOUT = 30  # s: a request still unanswered by then is a hang
TRACEBACK = re.compile(r"Traceback|File \"|\nAt:\n|\.py\(\d+\)")  # CPython's and Triton's python-stub stacks
NP = {"INT8": np.int8, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "FP16": np.float16,
      "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_, "BYTES": np.object_}
DECOUPLED = {"ensemble", "tensorrt_llm_bls", "tensorrt_llm"}  # Triton serves these over streams only


def budget(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass(frozen=True)
class Limits:
    vocab: int
    max_input: int
    max_seq: int
    max_batch: int
    engine_vocab: int  # the ids tensorrt_llm takes and can emit: the padded vocabulary (common.padding_ids)

    @property
    def max_output(self) -> int:
        return self.max_seq - 1


@pytest.fixture(scope="module")
def lim(tiny_server) -> Limits:
    m = json.loads((tiny_server.repo / "manifest.json").read_text())
    return Limits(m["model"]["vocab_size"], m["limits"]["max_input_len"], m["limits"]["max_seq_len"],
                  m["settings"]["max_batch_size"], m["engine_vocab_size"])


# -- requests and transports ------------------------------------------------------------------------

def short(v, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else f"{r[:n]}... ({len(r)} chars)"


class Req:
    """One request: its tensors, and why it is certainly invalid (empty: it may be answered)."""

    def __init__(self, model: str, inputs: dict[str, tuple[np.ndarray, str]], refuse: list[str] | None = None,
                 outputs: list[str] | None = None):
        self.model, self.inputs, self.refuse, self.outputs = model, inputs, refuse or [], outputs
        self.params: dict = {}  # request parameters
        self.request_id = ""
        self.transport = "stream"  # stream | unary | http (Triton's /v2/models/<m>/infer, JSON)

    @property
    def rows(self) -> int:
        return max((a.shape[0] for a, _ in self.inputs.values() if a.ndim), default=1)

    def value(self, name, default=None):
        a = self.inputs.get(name, (None,))[0]
        return default if a is None or a.size == 0 else a.reshape(-1)[0]

    def __repr__(self):
        ins = ", ".join(f"{n}: {dt}{list(a.shape)} {short(a.tolist(), 60)}" for n, (a, dt) in self.inputs.items())
        extra = "".join(f" {k}={v!r}" for k, v in (("params", self.params), ("outputs", self.outputs),
                                                     ("request_id", self.request_id)) if v)
        return f"Req({self.model} over {self.transport}: {ins}{extra}; refuse={self.refuse})"


def as_array(v, dtype: str) -> np.ndarray:
    """A per-request value as Triton wants it: [1, 1] for scalars, [1, n...] for lists."""
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, list):
        return np.array([v], dtype=NP[dtype]) if v else np.zeros((1, 0), dtype=NP[dtype])
    return np.array([[v]], dtype=NP[dtype])


def _outputs_of(result) -> dict[str, np.ndarray]:
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def _grpc_inputs(req: Req):
    out = []
    for name, (arr, dt) in req.inputs.items():
        x = grpcclient.InferInput(name, list(arr.shape), dt)
        x.set_data_from_numpy(arr)
        out.append(x)
    return out


def _requested(req: Req):
    return None if req.outputs is None else [grpcclient.InferRequestedOutput(n) for n in req.outputs]


def grpc_stream(url: str, req: Req, cancel_after_final: bool = False) -> tuple[list[dict], str | None]:
    """(responses, error) of one gRPC streaming request: up to its final flag or its error, or a failure
    after TIMEOUT (a hang). The stream is closed with cancellation if it did not end (or if asked to)."""
    c = grpcclient.InferenceServerClient(url)
    q: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    done = False
    try:
        c.async_stream_infer(req.model, _grpc_inputs(req), outputs=_requested(req), request_id=req.request_id,
                             parameters=req.params or None, enable_empty_final_response=True)
        got = []
        while True:
            try:
                r, e = q.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no final response nor error within {TIMEOUT} s (a hang)") from None
            if e is not None:
                done = True
                return got, e.message()
            got.append(_outputs_of(r))
            if r.get_response().parameters["triton_final_response"].bool_param:
                done = True
                return got, None
    finally:
        c.stop_stream(cancel_requests=cancel_after_final or not done)
        c.close()


def grpc_unary(url: str, req: Req) -> tuple[list[dict], str | None]:
    c = grpcclient.InferenceServerClient(url)
    try:
        r = c.infer(req.model, _grpc_inputs(req), outputs=_requested(req), request_id=req.request_id,
                    parameters=req.params or None, client_timeout=TIMEOUT)
        return [_outputs_of(r)], None
    except grpcclient.InferenceServerException as e:
        assert "Deadline Exceeded" not in (e.message() or ""), f"no answer within {TIMEOUT} s (a hang)"
        return [], e.message()
    finally:
        c.close()


def to_json(o) -> bytes:
    """JSON, except that bytes go into strings as they are (invalid UTF-8 included) and non-finite
    floats as NaN/Infinity, which Triton's parser takes."""
    if isinstance(o, bytes):
        return b'"' + re.sub(rb'[\x00-\x1f"\\]', lambda m: b"\\u%04x" % m.group()[0], o) + b'"'
    if isinstance(o, dict):
        return b"{" + b",".join(to_json(str(k).encode()) + b":" + to_json(v) for k, v in o.items()) + b"}"
    if isinstance(o, (list, tuple)):
        return b"[" + b",".join(to_json(x) for x in o) + b"]"
    return json.dumps(o.item() if isinstance(o, np.generic) else o).encode()


def http_post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except TimeoutError:
        raise AssertionError(f"no HTTP answer within {TIMEOUT} s (a hang)") from None


def http_error(status: int, body: bytes) -> str | None:
    """The error of a Triton HTTP answer (None when it is an answer); a bare 5xx without one fails."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "error" in obj:
        return str(obj["error"])
    assert status < 400, f"HTTP {status} without an error message: {body[:300]!r}"
    return None


def http_infer(url: str, req: Req) -> tuple[list[dict], str | None]:
    body = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": dt,
                        "data": [x.item() if isinstance(x, np.generic) else x for x in a.reshape(-1)]}
                       for n, (a, dt) in req.inputs.items()]}
    if req.outputs is not None:
        body["outputs"] = [{"name": n} for n in req.outputs]
    if req.params:
        body["parameters"] = req.params
    status, raw = http_post(f"{url}/v2/models/{req.model}/infer", to_json(body))
    err = http_error(status, raw)
    if err is not None:
        return [], err
    outs = {}
    for o in json.loads(raw)["outputs"]:
        data = [x.encode() for x in o["data"]] if o["datatype"] == "BYTES" else o["data"]
        outs[o["name"]] = np.array(data, dtype=NP[o["datatype"]]).reshape(o["shape"])
    return [outs], None


def send(server, req: Req) -> tuple[list[dict], str | None]:
    if req.transport == "http":
        return http_infer(server.http_url, req)
    return (grpc_unary if req.transport == "unary" else grpc_stream)(server.grpc_url, req)


def ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(http_url + "/v2/health/ready", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def normal_request() -> Req:
    return Req("tensorrt_llm_bls", {"text_input": (as_array(b"Hello there", "BYTES"), "BYTES"),
                                    "max_tokens": (as_array(2, "INT32"), "INT32")})


def assert_serving(server) -> None:
    assert ready(server.http_url), "the server is not ready after the request"
    got, err = grpc_stream(server.grpc_url, normal_request())
    assert err is None and got[-1]["finish_reason"].reshape(-1)[0] in (b"stop", b"length"), \
        f"a normal request fails after the hostile one: {err}"


def settle(server, req: Req, got: list[dict], err: str | None, check_answer) -> None:
    """The properties every hostile request has, whatever it was."""
    note(f"error: {err!r}" if err is not None else f"answered: {short(got, 400)}")
    if err is not None:
        assert err.strip(), "the error message is empty"
        assert not TRACEBACK.search(err), f"a Python traceback in the error message: {err}"
    else:
        assert not req.refuse, f"certainly invalid ({'; '.join(req.refuse)}) but answered: {short(got, 300)}"
        check_answer(req, got)
    assert_serving(server)


# -- value domains: (Triton datatype, valid values, certainly invalid values) ----------------------------

def f32(lo=None, hi=None, **kw):
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=lo is None and hi is None, **kw)


NONFINITE = st.sampled_from([math.inf, math.nan, -math.inf])
NEGATIVE = f32(hi=-(2.0 ** -20))
I32 = st.integers(-2**31, 2**31 - 1)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24)
SPECIAL = st.sampled_from(["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "\x00", " ", "\n\n"])
INVALID_UTF8 = st.builds(lambda a, bad, b: a.encode() + bad + b.encode(), st.text(max_size=4),
                         st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"]),
                         st.text(max_size=4))
NOTHING = st.nothing()


def prompts(lim: Limits):
    good = st.one_of(TEXT, SPECIAL, st.lists(SPECIAL | TEXT, min_size=2, max_size=4).map("".join)).map(str.encode)
    # every piece is at least one token: more pieces than the engine's input limit
    long = st.builds(lambda piece, n: piece * n, st.sampled_from([b"word ", b"\x00", "\u00e9 ".encode(), "\U0001f642".encode()]),
                     st.integers(lim.max_input + 1, 100_000))
    return good, st.one_of(st.just(b""), long, INVALID_UTF8)


def word_lists():
    words = TEXT.map(str.encode)
    good = st.one_of(st.lists(words, max_size=4), st.lists(words, min_size=300, max_size=2000))  # oversized too
    bad = st.builds(lambda ws, i, w: ws[:i] + [w] + ws[i:], st.lists(words, max_size=30), st.integers(0, 30), INVALID_UTF8)
    return ("BYTES", good, bad)


def penalty():
    return ("FP32", f32(-2.0, 2.0), NONFINITE | f32(2.0, exclude_min=True) | f32(hi=-2.0, exclude_max=True))


def sampling(names: dict[str, str], engine_reads_top_p: bool = False) -> dict:
    """The sampling inputs the ensemble, the BLS and tensorrt_llm share, under each one's names.
    Valid max_tokens are 1..3, so min_tokens 0..1 are valid and 4.. are not. Where tensorrt_llm reads top_p
    itself (the ensemble passes it on), a top_p <= 0 means absent (triton_backend utils.cc,
    getSamplingConfigFromTensors); the BLS refuses it."""
    top_p = (("FP32", f32(0.0, 1.0, exclude_min=True) | f32(hi=0.0) | st.just(-math.inf),
              st.sampled_from([math.inf, math.nan]) | f32(1.0, exclude_min=True)) if engine_reads_top_p else
             ("FP32", f32(0.0, 1.0, exclude_min=True), NONFINITE | f32(hi=0.0) | f32(1.0, exclude_min=True)))
    domains = {
        "temperature": ("FP32", f32(0.0, 2.0 ** 20), NONFINITE | NEGATIVE),
        "top_p": top_p,
        "top_k": ("INT32", st.integers(0, 2**31 - 1), st.integers(-2**31, -1)),
        "repetition_penalty": ("FP32", f32(0.0, 2.0 ** 20, exclude_min=True), NONFINITE | f32(hi=0.0)),
        "presence_penalty": penalty(), "frequency_penalty": penalty(),
        "min_tokens": ("INT32", st.integers(0, 1), st.integers(-2**31, -1) | st.integers(4, 2**31 - 1)),
        "seed": ("UINT64", st.integers(0, 2**64 - 1), NOTHING),
        # An end or pad id the vocabulary lacks is taken as the C++ backend takes it: either outcome is fine.
        "end_id": ("INT32", I32, NOTHING), "pad_id": ("INT32", I32, NOTHING),
        "stream": ("BOOL", st.booleans(), NOTHING), "exclude_input_in_output": ("BOOL", st.booleans(), NOTHING),
    }
    return {names.get(k, k): v for k, v in domains.items()}


def text_domains(lim: Limits, model: str) -> dict:
    good, bad = prompts(lim)
    return {"text_input": ("BYTES", good, bad),
            "max_tokens": ("INT32", st.integers(1, 3), st.integers(-2**31, 0) | st.integers(lim.max_output + 1, 2**31 - 1)),
            **sampling({}, engine_reads_top_p=model == "ensemble"), "stop_words": word_lists(), "bad_words": word_lists()}


def words_list(vocab: int, oov: bool):
    """TensorRT-LLM's [2, W] words list (ids; end offsets, -1 padded) as nested lists."""
    ids = st.integers(0, vocab - 1)
    word = st.lists(ids, min_size=1, max_size=3)
    bad_id = st.integers(vocab, 2**31 - 1) | st.integers(-2**31, -2)

    def build(words):
        flat = [i for w in words for i in w]
        ends = list(np.cumsum([len(w) for w in words]))
        return [flat, [int(e) for e in ends] + [-1] * (len(flat) - len(ends))]

    many = st.lists(word, max_size=4) | st.lists(word, min_size=200, max_size=800)
    if oov:
        many = st.builds(lambda ws, i, b: ws[:i] + [[b]] + ws[i:], st.lists(word, max_size=4), st.integers(0, 4), bad_id)
    return many.filter(len).map(build)


def llm_domains(lim: Limits) -> dict:
    ids = st.integers(0, lim.engine_vocab - 1)
    bad_ids = st.one_of(st.just([]),
                        st.builds(lambda a, b, c: a + [b] + c, st.lists(ids, max_size=4),
                                  st.integers(lim.engine_vocab, 2**31 - 1) | st.integers(-2**31, -1),
                                  st.lists(ids, max_size=4)),
                        st.lists(ids, min_size=lim.max_input + 1, max_size=lim.max_input + 64))
    return {"input_ids": ("INT32", st.lists(ids, min_size=1, max_size=16), bad_ids),
            "request_output_len": ("INT32", st.integers(1, 3), st.integers(-2**31, 0) | st.integers(lim.max_seq, 2**31 - 1)),
            **sampling({"top_k": "runtime_top_k", "top_p": "runtime_top_p", "stream": "streaming"},
                       engine_reads_top_p=True),
            "stop_words_list": ("INT32", words_list(lim.engine_vocab, False), words_list(lim.engine_vocab, True)),
            "bad_words_list": ("INT32", words_list(lim.engine_vocab, False), words_list(lim.engine_vocab, True))}


# -- request strategies -------------------------------------------------------------------------------

ATTACKS = ("dtype", "shape", "batch", "oversized_batch", "unknown_input", "missing", "unknown_param", "unary")


MODES = ("valid", "values", "structure")  # all valid; one or two certainly invalid values; a structural attack


@st.composite
def fields(draw, domains: dict, required: tuple[str, ...], mode: str, optional_max: int = 5):
    """(values, why certainly invalid): some optional fields, and in "values" mode one or two fields
    (each as likely as any other) certainly invalid."""
    bad = set()
    if mode == "values":
        bad = draw(st.sets(st.sampled_from(sorted(n for n, d in domains.items() if not d[2].is_empty)),
                           min_size=1, max_size=2))
    optional = draw(st.sets(st.sampled_from(sorted(set(domains) - set(required))), max_size=optional_max))
    names = [*required, *sorted((optional | bad) - set(required))]
    values, refuse = {}, []
    for n in names:
        _, good, evil = domains[n]
        values[n] = draw(evil if n in bad else good)
        if n in bad:
            refuse.append(f"{n}={short(values[n], 40)}")
    return values, refuse


def retype(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BYTES":
        return np.array([str(x).encode() for x in arr.reshape(-1)], dtype=object).reshape(arr.shape)
    if arr.dtype == object:
        return np.zeros(arr.shape, dtype=NP[dtype])
    with np.errstate(all="ignore"):
        return np.nan_to_num(arr.astype(np.float64)).astype(NP[dtype])


@st.composite
def attacked(draw, req: Req, required: tuple[str, ...], lim: Limits, mode: str, params_refused: bool,
             transports=("stream",)):
    """`req` over one of `transports`, with one structural attack in "structure" mode (and its refusal
    reason, when it is certain)."""
    req.transport = draw(st.sampled_from(transports))
    if req.transport == "unary" and req.model in DECOUPLED:
        req.refuse.append("a decoupled model over unary gRPC")
    if mode != "structure":
        return req
    kind = draw(st.sampled_from(ATTACKS))
    name = draw(st.sampled_from(sorted(req.inputs)))
    arr, dtype = req.inputs[name]
    if kind == "dtype":
        new = draw(st.sampled_from(sorted(set(NP) - {dtype})))
        req.inputs[name] = (retype(arr, new), new)
        req.refuse.append(f"{name} sent as {new}, declared {dtype}")
    elif kind == "shape":
        req.inputs[name] = (arr.reshape(arr.shape + (1,)) if draw(st.booleans()) else arr.reshape(-1), dtype)
        req.refuse.append(f"{name} of shape {list(req.inputs[name][0].shape)}")
    elif kind in ("batch", "oversized_batch"):
        # A batch the model may serve (then every row is answered) or refuse; past max_batch_size it is refused.
        k = draw(st.integers(2, lim.max_batch) if kind == "batch" else st.integers(lim.max_batch + 1, lim.max_batch + 8))
        req.inputs = {n: (np.concatenate([a] * k), dt) for n, (a, dt) in req.inputs.items()}
        if kind == "oversized_batch":
            req.refuse.append(f"batch {k} > max_batch_size {lim.max_batch}")
    elif kind == "unknown_input":
        new = "x_" + draw(st.from_regex(r"[a-z_]{1,10}", fullmatch=True))
        req.inputs[new] = (as_array(draw(I32), "INT32"), "INT32")
        req.refuse.append(f"unknown input {new!r}")
    elif kind == "missing" and set(required) & set(req.inputs):
        gone = draw(st.sampled_from(sorted(set(required) & set(req.inputs))))
        del req.inputs[gone]
        req.refuse.append(f"required input {gone!r} missing")
    elif kind == "unknown_param":
        key = "x_" + draw(st.from_regex(r"[a-z_]{1,10}", fullmatch=True))
        req.params[key] = draw(st.one_of(st.integers(-2**63, 2**63 - 1), st.booleans(), st.text(max_size=8)))
        if params_refused:  # the user-facing models refuse what they do not know (a typo is not ignored)
            req.refuse.append(f"unknown parameter {key!r}")
    elif kind == "unary" and req.model in DECOUPLED:
        req.transport = "unary"
        req.refuse.append("a decoupled model over unary gRPC")
    return req


@st.composite
def text_request(draw, model: str, lim: Limits):
    """ensemble / tensorrt_llm_bls over gRPC."""
    required = ("text_input", "max_tokens")
    domains = text_domains(lim, model)
    mode = draw(st.sampled_from(MODES))
    values, refuse = draw(fields(domains, required, mode))
    inputs = {n: (as_array(v, domains[n][0]), domains[n][0]) for n, v in values.items()}
    return draw(attacked(Req(model, inputs, refuse), required, lim, mode, params_refused=True))


@st.composite
def llm_request(draw, lim: Limits):
    """tensorrt_llm (TensorRT-LLM's backend tensors) over gRPC."""
    required = ("input_ids", "input_lengths", "request_output_len")
    domains = llm_domains(lim)
    mode = draw(st.sampled_from(MODES))
    values, refuse = draw(fields(domains, ("input_ids", "request_output_len"), mode))
    ids = values["input_ids"]
    inputs = {n: (as_array(v, domains[n][0]) if n not in ("stop_words_list", "bad_words_list")
                  else np.array([v], dtype=np.int32), domains[n][0]) for n, v in values.items()}
    # With one sequence the backend reads all of input_ids; input_lengths is mostly its length.
    n_ids = draw(st.one_of(st.just(len(ids)), I32))
    inputs["input_lengths"] = (as_array(n_ids, "INT32"), "INT32")
    if ids and "request_output_len" not in refuse and len(ids) <= lim.max_input and values["request_output_len"] + len(ids) > lim.max_seq:
        refuse.append("prompt + request_output_len over max_seq_len")
    req = Req("tensorrt_llm", inputs, refuse, outputs=draw(st.sampled_from(
        [None, ["output_ids", "sequence_length"], ["output_ids"], ["sequence_length"]])))
    stop = draw(st.sampled_from(["none", "none", "with_id", "without_id"]))
    if stop != "none":  # the backend reads nothing else of a stop request (an id of no request in flight: a no-op)
        req.inputs["stop"] = (as_array(True, "BOOL"), "BOOL")
        req.request_id = "fuzz-stop" if stop == "with_id" else ""
        req.refuse[:] = [] if stop == "with_id" else ["stop=true without a request id"]
        required = ("input_lengths", "request_output_len")  # input_ids is optional in the backend's config
    elif req.outputs is not None and len(req.outputs) == 1:
        req.refuse.append(f"only {req.outputs} requested")
    return draw(attacked(req, required, lim, mode, params_refused=False, transports=("stream", "stream", "unary")))


@st.composite
def pre_request(draw, lim: Limits):
    """preprocessing over gRPC (unary or stream) or HTTP /infer."""
    good, bad = prompts(lim)
    domains = {"QUERY": ("BYTES", good, bad),
               "REQUEST_OUTPUT_LEN": ("INT32", st.integers(1, lim.max_output),
                                      st.integers(-2**31, 0) | st.integers(lim.max_output + 1, 2**31 - 1)),
               "STOP_WORDS": word_lists(), "BAD_WORDS": word_lists(),
               "END_ID": ("INT32", I32, NOTHING), "PAD_ID": ("INT32", I32, NOTHING)}
    required = ("QUERY", "REQUEST_OUTPUT_LEN")
    mode = draw(st.sampled_from(MODES))
    values, refuse = draw(fields(domains, required, mode))
    inputs = {n: (as_array(v, domains[n][0]), domains[n][0]) for n, v in values.items()}
    return draw(attacked(Req("preprocessing", inputs, refuse), required, lim, mode, params_refused=False,
                         transports=("unary", "stream", "http")))


@st.composite
def post_request(draw, lim: Limits):
    """postprocessing over gRPC (unary or stream) or HTTP /infer: tokens [1, beams, T], lengths [1, beams]."""
    beams, t = draw(st.integers(1, 2)), draw(st.integers(0, 12))
    tokens = np.array(draw(st.lists(st.integers(0, lim.vocab - 1), min_size=beams * t, max_size=beams * t)),
                      dtype=np.int32).reshape(beams, t)
    if t and draw(st.integers(0, 3)) == 0:
        tokens[draw(st.integers(0, beams - 1)), draw(st.integers(0, t - 1))] = draw(
            st.integers(lim.vocab, 2**31 - 1) | st.integers(-2**31, -1))
    len_beams = beams if draw(st.integers(0, 4)) else 3 - beams
    lengths = draw(st.lists(st.integers(0, t), min_size=len_beams, max_size=len_beams))
    if draw(st.integers(0, 3)) == 0:
        lengths[0] = draw(st.integers(-2**31, -1) | st.integers(t + 1, 2**31 - 1))
    refuse = []
    if len_beams != beams:
        refuse.append(f"SEQUENCE_LENGTH has {len_beams} beams, TOKENS_BATCH {beams}")
    refuse += [f"sequence length {n} outside [0, {t}]" for n in lengths if not 0 <= n <= t]
    if not refuse:  # an id the vocabulary lacks, within its row's length
        refuse += [f"token id {i} outside the vocabulary" for b in range(beams) for i in tokens[b, :lengths[b]]
                   if not 0 <= i < lim.vocab]
    inputs = {"TOKENS_BATCH": (tokens[None], "INT32"), "SEQUENCE_LENGTH": (np.array([lengths], dtype=np.int32), "INT32")}
    mode = "structure" if draw(st.integers(0, 2)) == 0 else "valid"
    return draw(attacked(Req("postprocessing", inputs, refuse), ("TOKENS_BATCH", "SEQUENCE_LENGTH"), lim, mode,
                         params_refused=False, transports=("unary", "stream", "http")))


# -- what a valid answer looks like -----------------------------------------------------------------------

def rows_of(a: np.ndarray) -> int:
    return a.shape[0] if a.ndim else 1


def check_text_answer(req: Req, got: list[dict]) -> None:
    texts = [r["text_output"] for r in got if r.get("text_output") is not None]
    assert texts, f"answered without text_output: {short(got)}"
    for t in texts:
        assert rows_of(t) == req.rows, f"a batch of {req.rows} answered with {rows_of(t)} row(s)"
        [x.decode("utf-8") for x in t.reshape(-1)]
    final = [r for r in got if r.get("finish_reason") is not None]
    if req.model == "tensorrt_llm_bls":
        assert final and final[-1]["finish_reason"].reshape(-1)[0] in (b"stop", b"length")
        assert 1 <= final[-1]["completion_tokens"].reshape(-1)[0] <= req.value("max_tokens")


def llm_checker(lim: Limits):
    def check(req: Req, got: list[dict]) -> None:
        for r in got:
            ids = r.get("output_ids")
            if ids is not None:
                assert rows_of(ids) == req.rows, f"a batch of {req.rows} answered with {rows_of(ids)} row(s)"
                # As TensorRT-LLM's: any id of the padded vocabulary (the text models ban the padding).
                assert ((0 <= ids) & (ids < lim.engine_vocab)).all(), f"output ids outside the vocabulary: {ids}"
                assert r.get("sequence_length") is not None
    return check


def pre_checker(lim: Limits):
    def check(req: Req, got: list[dict]) -> None:
        (out,) = [r for r in got if r]
        ids = out["INPUT_ID"]
        assert rows_of(ids) == req.rows, f"a batch of {req.rows} answered with {rows_of(ids)} row(s)"
        assert ids.size and ((0 <= ids) & (ids < lim.vocab)).all()
        assert out["REQUEST_INPUT_LEN"].reshape(-1)[0] == ids.shape[-1]
        assert out["OUT_REQUEST_OUTPUT_LEN"].reshape(-1)[0] == req.value("REQUEST_OUTPUT_LEN")
    return check


def check_post_answer(req: Req, got: list[dict]) -> None:
    (out,) = [r for r in got if r]
    tokens = req.inputs["TOKENS_BATCH"][0]
    assert list(out["OUTPUT"].shape) == list(tokens.shape[:2]), f"OUTPUT {list(out['OUTPUT'].shape)} for tokens {list(tokens.shape)}"
    [x.decode("utf-8") for x in out["OUTPUT"].reshape(-1)]


# -- the gRPC and HTTP /infer properties ------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "ensemble"])
@budget(80)
@given(data=st.data())
def test_text_models_over_grpc_answer_or_refuse_clearly(tiny_server, lim, model, data):
    """ensemble and tensorrt_llm_bls over gRPC streams: every input hostile in turn (prompts empty, huge,
    invalid UTF-8; NaN/inf/out-of-range sampling; oversized and invalid stop/bad word lists; wrong
    dtype/shape; batches; unknown inputs and parameters; unary calls): a clear error or a valid answer
    covering every row, certainly invalid ones refused, the server serving afterwards."""
    req = data.draw(text_request(model, lim))
    settle(tiny_server, req, *send(tiny_server, req), check_text_answer)


@budget(60)
@given(data=st.data())
def test_tensorrt_llm_over_grpc_answers_or_refuses_clearly(tiny_server, lim, data):
    """tensorrt_llm with TensorRT-LLM's backend tensors: out-of-vocabulary, empty and over-long ids,
    over-long outputs, bad sampling values, malformed stop/bad words lists, stop requests, missing
    requested outputs, structural attacks."""
    req = data.draw(llm_request(lim))
    settle(tiny_server, req, *send(tiny_server, req), llm_checker(lim))


@budget(50)
@given(data=st.data())
def test_preprocessing_answers_or_refuses_clearly(tiny_server, lim, data):
    """preprocessing over unary gRPC, gRPC streams and HTTP /infer: hostile queries, output lengths,
    word lists, ids, shapes, dtypes and batches."""
    req = data.draw(pre_request(lim))
    settle(tiny_server, req, *send(tiny_server, req), pre_checker(lim))


@budget(50)
@given(data=st.data())
def test_postprocessing_answers_or_refuses_clearly(tiny_server, lim, data):
    """postprocessing over unary gRPC, gRPC streams and HTTP /infer: out-of-vocabulary and negative ids,
    lengths outside the row, beams that disagree between the two tensors, structural attacks."""
    req = data.draw(post_request(lim))
    settle(tiny_server, req, *send(tiny_server, req), check_post_answer)


@budget(20)
@given(model=st.sampled_from(sorted(DECOUPLED)), body=st.one_of(
    st.just(b"{}"), st.binary(max_size=64), st.just(b'{"inputs": []}'),
    st.just(b'{"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]},'
            b' {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [2]}]}')))
def test_decoupled_models_refuse_http_infer_clearly(tiny_server, model, body):
    """Triton's HTTP /infer cannot serve a decoupled model: any body gets a clear refusal."""
    err = http_error(*http_post(f"{tiny_server.http_url}/v2/models/{model}/infer", body))
    assert err and not TRACEBACK.search(err), err
    assert_serving(tiny_server)


# -- HTTP generate / generate_stream (Triton's JSON endpoints) ------------------------------------------

WRONG_JSON = {  # JSON values Triton cannot take for a tensor of this datatype
    "INT32": st.sampled_from(["3", 2.5, True, None, {}]), "UINT64": st.sampled_from(["3", 2.5, -1, True, None, {}]),
    "FP32": st.sampled_from(["0.5", True, None, {}]), "BOOL": st.sampled_from([1, "true", None, {}]),
    "BYTES": st.sampled_from([5, True, None, {}, ["ok", 1]]),
}


@st.composite
def generate_request(draw, model: str, lim: Limits):
    """(endpoint, body bytes, refuse, rows) for Triton's generate endpoints."""
    if model == "tensorrt_llm":
        domains, required = llm_domains(lim), ("input_ids", "request_output_len")
    else:
        domains, required = text_domains(lim, model), ("text_input", "max_tokens")
    values, refuse = draw(fields(domains, required, draw(st.sampled_from(MODES[:2]))))
    if model == "tensorrt_llm":
        values["input_lengths"] = len(values["input_ids"])
        ids, n = values["input_ids"], values["request_output_len"]
        if ids and not refuse and n + len(ids) > lim.max_seq:
            refuse.append("prompt + request_output_len over max_seq_len")
    if model != "tensorrt_llm" and draw(st.integers(0, 5)) == 0:  # over JSON, a lone surrogate is invalid too
        values["text_input"] = draw(st.sampled_from(["\ud800", "a\udc80b"]))
        refuse[:] = [r for r in refuse if not r.startswith("text_input")] + ["text_input with a lone surrogate"]
    endpoint = draw(st.sampled_from(["generate", "generate_stream"]))
    rows = 1
    kind = draw(st.sampled_from([None, None, None, "json_type", "unknown_field", "missing", "malformed",
                                 "batch", "mismatch", "int_overflow"]))
    name = draw(st.sampled_from(sorted(values)))
    dtype = domains.get(name, ("INT32",))[0]
    if kind == "json_type":
        values[name] = draw(WRONG_JSON[dtype])
        refuse.append(f"{name}={values[name]!r} is no {dtype}")
    elif kind == "unknown_field":
        key = "x_" + draw(st.from_regex(r"[a-z_]{1,10}", fullmatch=True))
        values[key] = draw(st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans()))
        if model != "tensorrt_llm":  # the user-facing models refuse what they do not know (a typo is not ignored)
            refuse.append(f"unknown field {key!r}")
    elif kind == "missing":
        gone = draw(st.sampled_from(required))
        del values[gone]
        refuse.append(f"required field {gone!r} missing")
    elif kind == "batch" and model != "tensorrt_llm":
        rows = draw(st.integers(2, lim.max_batch))
        values["text_input"], values["max_tokens"] = [values["text_input"]] * rows, [values["max_tokens"]] * rows
    elif kind == "mismatch" and model != "tensorrt_llm":
        values["text_input"] = [values["text_input"]] * 2
        refuse.append("text_input has 2 rows, max_tokens 1")
    elif kind == "int_overflow":
        # Beyond int32 Triton's JSON parser wraps the value: refused or (wrapped into range) answered.
        key = required[1]
        values[key] = draw(st.integers(2**31, 2**63 - 1) | st.integers(-2**63, -2**31 - 1))
        refuse[:] = [r for r in refuse if key not in r]
    body = to_json(values)
    if kind == "malformed":
        body = draw(st.sampled_from([body[:-1], b"[]", b"", b'"text"', body + b"}", body.replace(b":", b"=", 1)]))
        refuse.append(f"malformed body {short(body, 40)}")
    return endpoint, body, refuse, rows


def generate_answer(status: int, raw: bytes) -> tuple[list[dict], str | None]:
    """(events, error) of a generate / generate_stream answer."""
    text = raw.decode("utf-8")
    if text.startswith("data:"):
        events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
        errors = [str(e["error"]) for e in events if "error" in e]
        return events, errors[0] if errors else None
    err = http_error(status, raw)
    return ([json.loads(raw)] if err is None else []), err


@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "ensemble", "tensorrt_llm"])
@budget(50)
@given(data=st.data())
def test_generate_endpoints_answer_or_refuse_clearly(tiny_server, lim, model, data):
    """Triton's /generate and /generate_stream JSON endpoints: hostile values, wrong JSON types, NaN and
    Infinity literals, unknown fields (request parameters), missing fields, malformed JSON, batches,
    integers beyond int32."""
    endpoint, body, refuse, rows = data.draw(generate_request(model, lim))
    note(f"POST /v2/models/{model}/{endpoint} {short(body, 300)}; refuse={refuse}")
    events, err = generate_answer(*http_post(f"{tiny_server.http_url}/v2/models/{model}/{endpoint}", body))
    note(f"error: {err!r}" if err is not None else f"answered: {short(events, 300)}")
    if err is not None:
        assert err.strip(), "the error message is empty"
        assert not TRACEBACK.search(err), f"a Python traceback in the error message: {err}"
    else:
        assert not refuse, f"certainly invalid ({'; '.join(refuse)}) but answered: {short(events, 300)}"
        key = "output_ids" if model == "tensorrt_llm" else "text_output"
        assert events and all(key in e for e in events), f"answered without {key}: {short(events)}"
        for e in events:
            out = e[key]
            n = len(out) if rows > 1 and isinstance(out, list) else 1
            assert n == rows, f"a batch of {rows} answered with {n} row(s)"
    assert_serving(tiny_server)


# -- the OpenAI frontend, from its OpenAPI schema (schemathesis) --------------------------------------

FRONTEND_DOWN: list[str] = []  # why the frontend's Triton stopped serving, once it has
OPENAI_PATHS = r"^/(v1/chat/completions|v1/completions|v1/models|health)$"
MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens", "min_tokens")


def own_server(tiny_engine, folder):
    from model_repo.generate import generate
    from model_repo.server import TritonServer

    return TritonServer(generate(tiny_engine, folder / "repo")).start()


@pytest.fixture(scope="module")
def frontend_triton(tiny_engine, tmp_path_factory):
    """A Triton server of this module's own on the tiny engine: the frontend cancels every call it closes,
    which can leave a model unable to serve or unload (see the last test); that must not spill into the
    other tests' tiny_server."""
    server = own_server(tiny_engine, tmp_path_factory.mktemp("fuzz-openai"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_frontend(frontend_triton):
    """The real frontend (uvicorn on a free loopback port) in front of the real Triton, as test_openai_api."""
    from model_repo.__main__ import served_model_name, start_frontend
    from model_repo.openai_api import FrontendConfig
    from model_repo.server import free_port

    cfg = FrontendConfig(triton_url=frontend_triton.grpc_url, model_name=served_model_name(frontend_triton.repo),
                         default_max_tokens=8)
    port = free_port()
    server = start_frontend(cfg, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}", cfg.model_name
    server.should_exit = True


@pytest.fixture(scope="module")
def openai_schema(openai_frontend):
    url, name = openai_frontend
    config = schemathesis.Config.from_dict({
        "seed": 20240613, "generation": {"mode": "all"},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
                   "stateful": {"enabled": False}},
    })
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config, timeout=30)

    @schema.hook
    def map_body(ctx, body):
        # Bodies name the served model (a wrong one is test_openai_api's 404), so that generation is reached;
        # for bounded time in-range token counts become small ones (out-of-range ones stay: they get a 400).
        if isinstance(body, dict):
            if isinstance(body.get("model"), str):
                body["model"] = name
            for key in MAX_TOKENS_KEYS:
                v = body.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and 4 < v <= 2047:
                    body[key] = 4
        return body

    return schema


def clear_openai_error(ctx, response, case):
    """An error answer carries a message (OpenAI's error object; Starlette's `detail` for a wrong method
    or path) and no traceback; a stream ends with [DONE]."""
    text = response.content.decode("utf-8", "replace")
    if response.status_code >= 400:
        obj = json.loads(text)
        err = obj.get("error") if isinstance(obj, dict) else None
        message = err.get("message") if isinstance(err, dict) else obj.get("detail") if isinstance(obj, dict) else None
        assert isinstance(message, str) and message.strip(), f"HTTP {response.status_code} without a message: {text[:300]}"
    assert not TRACEBACK.search(text), f"a Python traceback in the answer: {text[:500]}"
    if response.status_code == 200 and text.startswith("data:"):
        assert text.rstrip().endswith("data: [DONE]"), f"a stream that does not end with [DONE]: {text[-300:]}"


@pytest.fixture
def pytest9_nodeid(request):
    """schemathesis 4.32's lazy schemas read `request.node._nodeid`, which pytest 9.2 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


openai_api = schemathesis.pytest.from_fixture("openai_schema").include(path_regex=OPENAI_PATHS)


@openai_api.parametrize()
@pytest.mark.usefixtures("pytest9_nodeid")
@budget(30)
def test_openai_frontend_from_its_openapi_schema(case, openai_frontend, frontend_triton):
    """Schemathesis over /v1/chat/completions, /v1/completions, /v1/models and /health (positive and
    negative bodies, the schema's boundaries): no 5xx (no 503 is documented), content types as the
    schema declares, OpenAI-shaped clear errors, and the frontend and Triton healthy afterwards."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance

    assert not FRONTEND_DOWN, f"no longer serving since an earlier case: {FRONTEND_DOWN[0]}"
    response = case.call(timeout=TIMEOUT)
    case.validate_response(response, checks=[not_a_server_error, content_type_conformance, clear_openai_error])
    url, _ = openai_frontend
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            assert r.status == 200
        assert_serving(frontend_triton)
    except (AssertionError, OSError) as e:
        FRONTEND_DOWN.append(f"after {case.method} {case.path} {short(case.body, 300)}: {e}")
        raise
