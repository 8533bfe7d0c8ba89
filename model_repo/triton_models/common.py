"""Helpers shared by the python-backend models (imported from the installed package)."""

from __future__ import annotations

import json

import numpy as np


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
