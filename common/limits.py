"""The limits of a generation request, in one place. The client's pre-flight check, the server's
preprocessing and BLS models and the CPU engine all call `sampling_problems`, so a value refused
anywhere gets the same message everywhere (the server also knows the engine's output limit)."""

from __future__ import annotations

import math

UINT64_MAX = 2**64 - 1


def sampling_problems(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                      presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0, seed=None,
                      max_output_len: int | None = None, prompt_tokens: int | None = None,
                      max_seq_len: int | None = None) -> list[str]:
    """Every out-of-range value, one message each (empty when the request is within limits).

    `prompt_tokens` + `max_tokens` must fit `max_seq_len`: TensorRT-LLM's executor would otherwise cut
    max_tokens to what fits and only log a warning (LlmRequest::validate, TensorRT-LLM 1.2.x), and the
    reply would end early with no sign of why."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    infinite = [name for name, v in (("temperature", temperature), ("top_p", top_p),
                                     ("repetition_penalty", repetition_penalty),
                                     ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty))
                if isinstance(v, float) and math.isinf(v)]
    if infinite:
        return [f"{name} must be a finite number" for name in infinite]

    checks = [
        (is_int(max_tokens) and max_tokens >= 1, f"max_tokens must be an integer >= 1 (got {max_tokens!r})"),
        (max_output_len is None or not is_int(max_tokens) or max_tokens <= max_output_len,
         f"max_tokens must be at most {max_output_len}, the engine's output limit (got {max_tokens!r})"),
        (max_seq_len is None or prompt_tokens is None or not is_int(max_tokens)
         or prompt_tokens + max_tokens <= max_seq_len,
         f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the engine's maximum sequence "
         f"length {max_seq_len}"),
        (temperature >= 0, f"temperature must be >= 0 (got {temperature})"),
        (0 < top_p <= 1, f"top_p must be in (0, 1] (got {top_p})"),
        (is_int(top_k) and top_k >= 0, f"top_k must be an integer >= 0 (got {top_k!r})"),
        (repetition_penalty > 0, f"repetition_penalty must be > 0 (got {repetition_penalty})"),
        (-2 <= presence_penalty <= 2, f"presence_penalty must be in [-2, 2] (got {presence_penalty})"),
        (-2 <= frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2] (got {frequency_penalty})"),
        (is_int(min_tokens) and 0 <= min_tokens <= (max_tokens if is_int(max_tokens) else 0),
         f"min_tokens must be in [0, max_tokens] (got {min_tokens!r})"),
        (seed is None or (is_int(seed) and 0 <= seed <= UINT64_MAX), f"seed must be a uint64 (got {seed!r})"),
    ]
    return [msg for ok, msg in checks if not ok]


def check_sampling(**values) -> None:
    """Raise ValueError with the first problem `sampling_problems` finds."""
    problems = sampling_problems(**values)
    if problems:
        raise ValueError(problems[0])
