"""Helpers shared by the python-backend models (imported from the installed package)."""

from __future__ import annotations

import json
import time

import numpy as np

from client.errors import BAD_REQUEST_MARKER


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


def to_words_list(tokenizer, words: list[str]) -> np.ndarray:
    """TensorRT-LLM's [2, L] words list: row 0 the concatenated ids, row 1 the end offsets (-1 padded)."""
    ids, offsets = [], []
    for w in words:
        ids.extend(tokenizer(w, add_special_tokens=False)["input_ids"])
        offsets.append(len(ids))
    n = max(len(ids), 1)
    out = np.full((2, n), -1, dtype=np.int32)
    out[0, : len(ids)] = ids
    out[1, : len(offsets)] = offsets
    return out


def from_words_list(arr: np.ndarray) -> list[list[int]]:
    ids, offsets = arr[0], [int(o) for o in arr[1] if o >= 0]
    out, start = [], 0
    for end in offsets:
        out.append([int(i) for i in ids[start:end]])
        start = end
    return [w for w in out if w]


class BadRequest(ValueError):
    """A request the model refuses with a clear message; the server keeps serving."""


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


class CancelCheck:
    """`sender.is_cancelled()` is a round trip to the Triton process: ask it at most every
    `interval_s` while streaming, not for every token (cancellation then lands within that time)."""

    def __init__(self, sender, interval_s: float = 0.02):
        self.sender, self.interval = sender, interval_s
        self.next = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.interval
        return self.sender.is_cancelled()
