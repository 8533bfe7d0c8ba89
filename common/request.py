"""The public generation request, declared once: every field the deployment's text models (the ensemble and
`tensorrt_llm_bls`) take, with its wire type, the client's default and the `tensorrt_llm` input it
becomes. The model configs, the client's request, the BLS's inner request and the OpenAI mapping are
derived from this table; tests/test_request_fields.py walks every field through each of them.

Limits are in common.limits (one check for the client, the models and the engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestField:
    name: str  # the input of the ensemble and the BLS
    wire: str  # Triton datatype on the wire: BYTES, INT32, FP32, UINT64, BOOL
    default: object = None  # what the deployment means when the field is absent (None: nothing)
    engine: str | None = None  # the tensorrt_llm input it passes to unchanged; None: a model turns it into one
    many: bool = False  # a list of values (dims [-1]) rather than one
    always: bool = False  # the client sends it even at its default (the ensemble passes it to TensorRT-LLM,
    #                       whose own defaults differ: temperature 1, top-k 0, top-p 0)
    openai: str | None = None  # the OpenAI API parameter that sets it (the frontend's extensions included)

    @property
    def config_dtype(self) -> str:
        return "TYPE_STRING" if self.wire == "BYTES" else f"TYPE_{self.wire}"


PROMPT = RequestField("text_input", "BYTES", always=True)
MAX_TOKENS = RequestField("max_tokens", "INT32", 256, always=True, openai="max_tokens")
# The sampling fields: each passes to tensorrt_llm unchanged (the BLS first turns greedy into top-k 1).
SAMPLING = (
    RequestField("temperature", "FP32", 0.0, "temperature", always=True, openai="temperature"),
    RequestField("top_p", "FP32", 1.0, "runtime_top_p", always=True, openai="top_p"),
    RequestField("top_k", "INT32", 0, "runtime_top_k", always=True, openai="top_k"),
    RequestField("repetition_penalty", "FP32", 1.0, "repetition_penalty", always=True, openai="repetition_penalty"),
    RequestField("presence_penalty", "FP32", 0.0, "presence_penalty", openai="presence_penalty"),
    RequestField("frequency_penalty", "FP32", 0.0, "frequency_penalty", openai="frequency_penalty"),
    RequestField("min_tokens", "INT32", 0, "min_tokens", openai="min_tokens"),
    RequestField("seed", "UINT64", None, "seed", openai="seed"),
)
# Words are tokenized by the server (preprocessing, the BLS) into TensorRT-LLM's [2, L] lists.
STOP = RequestField("stop_words", "BYTES", (), many=True, openai="stop")
BAD_WORDS = RequestField("bad_words", "BYTES", (), many=True)
# The tokenizer's ids unless given (TensorRT-LLM has no default end id: the server always sends one).
END_ID = RequestField("end_id", "INT32")
PAD_ID = RequestField("pad_id", "INT32")
STREAM = RequestField("stream", "BOOL", False, "streaming", always=True)
EXCLUDE_INPUT = RequestField("exclude_input_in_output", "BOOL", None, "exclude_input_in_output")

# The optional inputs of the ensemble and the BLS, in their config's order.
OPTIONAL = (STOP, BAD_WORDS, END_ID, PAD_ID, *SAMPLING, STREAM, EXCLUDE_INPUT)
FIELDS = (PROMPT, MAX_TOKENS, *OPTIONAL)
BY_NAME = {f.name: f for f in FIELDS}
