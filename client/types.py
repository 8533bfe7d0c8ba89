"""Typed requests and results, validated before any network call."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.limits import check_sampling

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} (got {self.role!r})")
        if not isinstance(self.content, str):
            raise ValueError(f"content must be a string (got {type(self.content).__name__})")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        check_sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                       frequency_penalty=self.frequency_penalty, min_tokens=self.min_tokens, seed=self.seed)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")


@dataclass(frozen=True)
class Chunk:
    """One streamed delta. `finish_reason` is set on the last chunk ("stop" | "length")."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_s: float | None = None
    latency_s: float | None = None
    chunks: list[Chunk] = field(default_factory=list, repr=False)
