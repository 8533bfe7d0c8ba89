"""Per-request sampling for the CPU engine: what a request asks for (`Sampling`) and the state that
turns one row of logits into its next token (`Sampler`).

Every request owns its random generator, seeded from its own `seed`, so a seeded request draws the
same tokens whichever requests share its batch. Order and conventions as TensorRT-LLM's penalty kernel
(batchApplyPenalty, cpp/tensorrt_llm/kernels/penaltyKernels.cu, TensorRT-LLM 1.x): temperature first,
then, for every token that occurs in the prompt or the output so far, repetition (divides a positive,
multiplies a negative logit), presence (subtracted once) and frequency (subtracted per occurrence,
the prompt's included); then bans, top-k, top-p and the draw (greedy takes the arg-max after them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.limits import check_sampling


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None: fresh entropy per request
    min_tokens: int = 0  # end ids are banned until this many tokens
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop sequences, matched on the decoded text and cut from it
    stop_words: tuple[tuple[int, ...], ...] = ()  # TensorRT-LLM's stop words: token sequences, kept in the output
    stop_token_ids: tuple[int, ...] = ()  # end the request like the end id (not emitted)
    ignore_eos: bool = False  # the engine's own end id does not end the request
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never completed

    def __post_init__(self):
        check_sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                       frequency_penalty=self.frequency_penalty, min_tokens=self.min_tokens, seed=self.seed)
        if not all(self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        if not all(self.bad_words) or not all(self.stop_words):
            raise ValueError("stop and bad words must be non-empty token sequences")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """One request's sampling state: its generator, the tokens seen, and its end ids."""

    def __init__(self, s: Sampling, prompt: list[int], vocab_size: int, engine_end_id: int):
        self.s = s
        self.rng = np.random.default_rng(s.seed)
        self.end_ids = set(s.stop_token_ids) | (set() if s.ignore_eos else {engine_end_id})
        self._end_list = np.array(sorted(i for i in self.end_ids if 0 <= i < vocab_size), dtype=np.int64)
        self.history = list(prompt)
        self.generated = 0
        self._penalize = s.repetition_penalty != 1 or s.presence_penalty != 0 or s.frequency_penalty != 0
        if self._penalize:  # occurrences in the prompt and the output
            self.counts = np.bincount(np.asarray(prompt, dtype=np.int64), minlength=vocab_size).astype(np.float32)

    def _adjust(self, logits: np.ndarray) -> np.ndarray:
        """The logits after temperature, penalties and bans; `logits` itself when none applies (it is not
        written)."""
        s = self.s
        scale = s.temperature not in (0, 1)  # 0: greedy, nothing to scale
        if not (scale or self._penalize or s.bad_words or (self.generated < s.min_tokens and self._end_list.size)):
            return logits
        x = logits / np.float32(s.temperature) if scale else logits.astype(np.float32, copy=True)
        if self._penalize:
            seen = self.counts > 0
            if s.repetition_penalty != 1:
                v = x[seen]
                x[seen] = np.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
            if s.presence_penalty:
                x -= s.presence_penalty * seen
            if s.frequency_penalty:
                x -= s.frequency_penalty * self.counts
        for word in s.bad_words:
            n = len(word) - 1
            if n == 0 or self.history[-n:] == list(word[:-1]):
                x[word[-1]] = -np.inf
        if self.generated < s.min_tokens and self._end_list.size:
            x[self._end_list] = -np.inf
        return x

    def ends_with_stop_word(self) -> bool:
        return any(self.history[-len(w):] == list(w) for w in self.s.stop_words)

    def _draw(self, x: np.ndarray) -> int:
        """A draw from softmax(x) (x: the logits after temperature and penalties) restricted to the top-k
        tokens, then to the nucleus. No full sort of the vocabulary: it costs more than a decode step at
        32k-50k tokens, and a draw needs no order."""
        s = self.s
        cand = np.sort(np.argpartition(x, -s.top_k)[-s.top_k:]) if 0 < s.top_k < x.size else None  # ascending ids
        z = x if cand is None else x[cand]
        p = np.exp(z - z.max())  # unnormalized; banned tokens (-inf) get 0
        keep = _nucleus(z, p, s.top_p) if s.top_p < 1 else None
        j = pick(p if keep is None else p[keep], self.rng.random())
        i = j if keep is None else keep[j]
        return int(i if cand is None else cand[i])

    def next_token(self, logits: np.ndarray) -> int:
        """The next token from one row of logits [V]; records it as generated."""
        x = self._adjust(logits)
        s = self.s
        token = int(np.argmax(x)) if s.greedy else self._draw(x)
        self.record(token)
        return token

    def record(self, token: int) -> None:
        """Count a generated token."""
        self.generated += 1
        self.history.append(token)
        if self._penalize:
            self.counts[token] += 1


PICK_BLOCK = 256


def pick(w: np.ndarray, u: float) -> int:
    """The inverse-CDF draw: the index i where the running sum of the weights `w` (>= 0, float64 sums)
    first exceeds u * their total, for u in [0, 1). Over sums of blocks of PICK_BLOCK weights first, then
    within one block: a float64 running sum over a whole vocabulary costs numpy about 0.5 ms, more than
    the rest of a draw. A weight of 0 (a banned token) is never picked, also where rounding puts the
    target at the end of a block or of the whole."""
    starts = np.arange(0, w.size, PICK_BLOCK)
    blocks = np.cumsum(np.add.reduceat(w, starts, dtype=np.float64))
    target = u * blocks[-1]
    b = int(np.searchsorted(blocks, target, side="right"))
    if b == blocks.size:  # u * total rounded up to the total: the last token with any weight
        return int(np.flatnonzero(w)[-1])
    block = w[starts[b]:starts[b] + PICK_BLOCK]
    j = int(np.searchsorted(np.cumsum(block, dtype=np.float64), target - (blocks[b - 1] if b else 0.0),
                            side="right"))
    if j == block.size:  # the block's own running sum rounded below its total
        j = int(np.flatnonzero(block)[-1])
    return int(starts[b]) + j


def _nucleus(z: np.ndarray, p: np.ndarray, top_p: float, first: int = 64) -> np.ndarray:
    """The fewest most likely entries (logits `z`, unnormalized probabilities `p`) whose mass reaches
    `top_p`, most likely first. A peaked distribution (the usual case) needs only its top `first` entries
    sorted; a flat one gets one wider try, then a full sort."""
    total = p.sum(dtype=np.float64)
    for k in (first, 16 * first, z.size):
        k = min(k, z.size)
        top = np.argpartition(-z, k - 1)[:k] if k < z.size else np.arange(z.size)
        top = top[np.argsort(-z[top])]
        mass = np.cumsum(p[top], dtype=np.float64) / total
        if mass[-1] >= top_p or k == z.size:
            return top[:min(int(np.searchsorted(mass, top_p)) + 1, k)]
