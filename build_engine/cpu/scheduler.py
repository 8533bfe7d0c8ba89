"""The CPU engine's runtime: inflight batching under our own scheduler, as TensorRT-LLM's executor
does on the GPU. A waiting request joins the running batch at the next step; it does not wait for
the batch to drain.

One thread owns the onnxruntime session and the KV cache. Each step it
1. takes new requests and cancellations (a cancelled request's row is free for this very step),
2. admits waiting requests in arrival order while a row is free and their worst case
   (prompt + max_tokens) fits the KV budget -- TensorRT-LLM's GUARANTEED_NO_EVICT policy: a request
   that is admitted always finishes, a full cache makes newcomers queue, never fail,
3. prefills admitted prompts in fixed chunks of `prefill_chunk` tokens (a request's chunk
   boundaries never depend on its companions), up to `max_num_tokens` tokens per step,
4. decodes one token for every running request in one batched call.

The default step budget is one chunk of prompt tokens plus a decode token per row. A GPU prefills many
prompts in one step for little more than one; on a CPU prefill is compute-bound, so two prompts in a
step take twice as long, and both first tokens wait for both. One chunk per step staggers a burst:
the first newcomer's token comes after its own prefill, and the running requests wait at most one
chunk per token. Engine alone, 8 concurrent 64-token prompts, 64 tokens out, 8 interleaved rounds:
median TTFT 69 ms with 64-token chunks against 103 ms with 128, at the same throughput (262 against
263 tok/s).

Batch invariance: MatMulNBits computes rows in pairs and an odd last row on another kernel path
(results differ in the last bits; measured with onnxruntime 1.32 at accuracy levels 1 and 4), so
by default a decode batch is padded to an even number of rows with a filler row. Then a greedy
request's logits are bit for bit the same alone and in any batch, and requests that join
mid-flight change nothing for the others. It is the default at accuracy level 1 (fp32 compute,
the exact engine); at level 4 the filler row costs about a fifth of batch-1 decode speed, so it is
off unless asked for, and a greedy output can then depend on the batch (as on GPUs).

    engine = CpuEngine("artifacts/smollm2-135m-instruct/engine-cpu")
    for step in engine.submit(ids, Sampling(max_tokens=64)):
        print(step.text, end="")
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from build_engine import UserError, manifest
from build_engine.cpu.decoder import Decoder
from build_engine.cpu.sampling import Sampler, Sampling
from build_engine.tokenization import Detokenizer, load_tokenizer
from common.limits import check_sampling

DEFAULT_PREFILL_CHUNK = 64


class QueueFull(RuntimeError):
    """The engine's queue is full. The message is TensorRT-LLM's executor's (executorImpl.cpp,
    Executor::Impl::enqueueRequests, 1.2.x), which its Triton backend returns as an INTERNAL error."""

    def __init__(self, max_queue_size: int):
        super().__init__(f"Maximum queue size of {max_queue_size} has been reached, please try again later")


@dataclass
class Step:
    token_id: int | None  # None on a final step that carries no token
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass(eq=False)
class _Request:
    rid: int
    ids: np.ndarray  # the prompt, int64
    sampling: Sampling
    sampler: Sampler
    detok: Detokenizer | None
    need: int  # KV positions reserved: prompt + max_tokens
    out: queue.Queue = field(default_factory=queue.Queue)
    slot: int = -1
    pos: int = 0  # positions of this request in the KV cache
    pending: int | None = None  # the last sampled token, fed at the next decode step
    finished: bool = False
    admitted_step: int | None = None
    first_token_step: int | None = None
    finished_step: int | None = None


class Stream:
    """Iterator of Steps for one request; close() (or leaving a `with` block) cancels it."""

    def __init__(self, engine: "CpuEngine", request: _Request):
        self._engine, self._r = engine, request
        self.prompt_tokens = len(request.ids)
        self.finish_reason: str | None = None

    @property
    def admitted_step(self) -> int | None:
        """The engine step at which the request got its KV row (None while it waits)."""
        return self._r.admitted_step

    @property
    def first_token_step(self) -> int | None:
        """The engine step that sampled its first token (the end of its prefill)."""
        return self._r.first_token_step

    @property
    def generated_tokens(self) -> int:
        """Tokens the engine has sampled for this request so far."""
        return self._r.sampler.generated

    @property
    def backlog(self) -> int:
        """Steps the engine has made for this request that the reader has not taken yet."""
        return self._r.out.qsize()

    @property
    def finished_step(self) -> int | None:
        """The engine step at which its row was free again."""
        return self._r.finished_step

    def __iter__(self) -> Iterator[Step]:
        try:
            while True:
                step: Step = self._r.out.get()
                if step.finish_reason:
                    self.finish_reason = step.finish_reason
                yield step
                if step.finish_reason:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if self.finish_reason is None:
            self._engine._post("cancel", self._r.rid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# The folders this scheduler runs: the ONNX INT4 engine, or the synthetic one (build_engine.synthetic).
ENGINE_KINDS = ("cpu-engine", "synthetic-engine")


def _decoder(engine_dir: Path, kind: str, rows: int, context_length: int, threads: int):
    if kind == "synthetic-engine":
        from build_engine.synthetic import SyntheticDecoder

        return SyntheticDecoder(engine_dir, rows)
    try:
        return Decoder(engine_dir, rows, context_length, threads)
    except Exception as e:  # onnxruntime reports a broken graph or file as a generic failure
        raise UserError(f"cannot load the CPU engine in {engine_dir}: {e}") from None


class CpuEngine:
    def __init__(self, engine_dir: Path | str, tokenizer=None, *, max_batch_size: int | None = None,
                 kv_cache_tokens: int | None = None, prefill_chunk: int | None = None,
                 max_num_tokens: int | None = None, batch_invariant: bool | None = None, threads: int = 0,
                 max_queue_size: int = 0):
        self.dir = Path(engine_dir)
        self.manifest = manifest.read(self.dir)
        self.kind = self.manifest.get("kind")
        if self.kind not in ENGINE_KINDS:
            raise UserError(f"{self.dir} holds a {self.kind!r}, not an engine the scheduler runs "
                            f"({', '.join(ENGINE_KINDS)})")
        self.model_facts = self.manifest["model"]
        self.limits = self.manifest["limits"]
        self.context_length = self.manifest["settings"]["context_length"]
        self.end_id = self.model_facts["end_id"]
        self.max_batch_size = int(max_batch_size or self.limits["max_batch_size"])
        self.kv_cache_tokens = int(kv_cache_tokens or self.max_batch_size * self.context_length)
        self.prefill_chunk = int(prefill_chunk or self.manifest["settings"].get("prefill_chunk", DEFAULT_PREFILL_CHUNK))
        self.max_num_tokens = int(max_num_tokens or self.prefill_chunk + self.max_batch_size)
        # Requests waiting for a row before submit() refuses more (0: unbounded), as TensorRT-LLM's
        # executor with ExecutorConfig.maxQueueSize.
        self.max_queue_size = int(max_queue_size)
        if self.max_queue_size < 0:
            raise UserError(f"max_queue_size must be >= 0 (got {self.max_queue_size})")
        for name in ("max_batch_size", "kv_cache_tokens", "prefill_chunk", "max_num_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1 (got {getattr(self, name)})")
        # Default: invariant for the exact engine (fp32 compute), as fast as possible for the int8 one.
        level = self.manifest["settings"].get("accuracy_level")
        self.batch_invariant = level == 1 if batch_invariant is None else batch_invariant
        self.tokenizer = tokenizer or load_tokenizer(self.dir / "tokenizer")
        # One more row than slots for an odd batch's filler row.
        self.decoder = _decoder(self.dir, self.kind, self.max_batch_size + 1, self.context_length, threads)
        self.vocab_size = self.decoder.vocab
        self.step = 0
        self.reserved_tokens = 0
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._live: list[_Request] = []  # index = KV row
        self._queued = 0  # submitted and not yet admitted or ended (counted at submit, under the lock)
        self._queue_lock = threading.Lock()
        self._closed = False
        self.failures = 0  # engine steps that failed (their requests got an error)
        self._thread = threading.Thread(target=self._loop, name="cpu-engine", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------------
    def check_prompt(self, ids, sampling: Sampling) -> None:
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.limits["max_input_len"]:
            raise ValueError(f"the prompt has {n} tokens; this engine accepts at most {self.limits['max_input_len']}")
        check_sampling(max_tokens=sampling.max_tokens, prompt_tokens=n, max_seq_len=self.context_length)
        if n + sampling.max_tokens > self.kv_cache_tokens:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds the KV cache "
                             f"budget of {self.kv_cache_tokens} tokens")
        for what, seq in (("token id", ids), ("bad word id", [i for w in sampling.bad_words for i in w]),
                          ("stop word id", [i for w in sampling.stop_words for i in w])):
            bad = [i for i in seq if not 0 <= int(i) < self.vocab_size]
            if bad:
                raise ValueError(f"{what} {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def submit(self, ids, sampling: Sampling = Sampling()) -> Stream:
        self.check_prompt(ids, sampling)
        if self._closed:
            raise RuntimeError("the engine is closed")
        prompt = [int(i) for i in ids]
        skip = tuple(sorted({self.end_id, *sampling.stop_token_ids}))
        r = _Request(next(self._ids), np.asarray(prompt, dtype=np.int64), sampling,
                     Sampler(sampling, prompt, self.vocab_size, self.end_id),
                     Detokenizer(self.tokenizer, skip_ids=skip), need=len(prompt) + sampling.max_tokens)
        with self._queue_lock:
            if self.max_queue_size and self._queued + 1 > self.max_queue_size:
                raise QueueFull(self.max_queue_size)
            self._queued += 1
        self._post("add", r)
        return Stream(self, r)

    def generate(self, ids, sampling: Sampling = Sampling()) -> tuple[list[int], str, str]:
        """Blocking: (generated ids, text, finish reason)."""
        stream = self.submit(ids, sampling)
        toks, text = [], []
        for step in stream:
            if step.error:
                raise RuntimeError(step.error)
            if step.token_id is not None:
                toks.append(step.token_id)
            text.append(step.text)
        return toks, "".join(text), stream.finish_reason or "stop"

    def active_requests(self) -> int:
        """Requests running or waiting for a row."""
        return len(self._requests)

    def running_requests(self) -> int:
        return len(self._live)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    def stats(self, tokens_per_block: int = 64) -> dict[str, int]:
        """A snapshot for metrics, in TensorRT-LLM's terms (its executor's IterationStats); KV use is
        counted in blocks of `tokens_per_block` positions per request, as a paged cache would hold it:
        a scheduled request holds its whole prompt's blocks from admission on (TensorRT-LLM's KV cache
        manager allocates the context blocks when it schedules the request), and more as it generates."""
        live = list(self._live)
        return {"active": len(self._requests), "scheduled": len(live), "waiting": self._queued,
                "context": sum(1 for r in live if r.pos < len(r.ids)),
                "generation": sum(1 for r in live if r.pos >= len(r.ids)),
                "context_tokens": sum(len(r.ids) - r.pos for r in live if r.pos < len(r.ids)),
                "kv_blocks_used": sum(-(-max(r.pos, len(r.ids)) // tokens_per_block) for r in live),
                "kv_tokens_reserved": self.reserved_tokens,
                "iterations": self.step, "failures": self.failures}

    # -- engine thread ----------------------------------------------------------------------
    def _dequeued(self) -> None:
        with self._queue_lock:
            self._queued -= 1

    def _post(self, kind: str, item) -> None:
        self._inbox.put((kind, item))
        self._wake.set()

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._requests[item.rid] = item
                self._waiting.append(item)
            elif kind == "cancel" and item in self._requests:
                self._finish(self._requests[item], "cancelled")

    def _admit(self) -> None:
        while self._waiting and len(self._live) < self.max_batch_size:
            r = self._waiting[0]
            if self.reserved_tokens + r.need > self.kv_cache_tokens:
                return  # in arrival order: a large request is not overtaken for ever
            self._waiting.popleft()
            self._dequeued()
            r.slot, r.admitted_step = len(self._live), self.step + 1
            self._live.append(r)
            self.reserved_tokens += r.need

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished, r.finished_step = True, self.step + 1
        tail = r.detok.flush() if r.detok and reason not in ("cancelled", "error") else ""
        r.out.put(Step(None, tail, reason, error))
        self._requests.pop(r.rid, None)
        if r.slot < 0:
            self._waiting.remove(r)
            self._dequeued()
            return
        # Keep live rows contiguous: the last row moves into the freed one.
        last = self._live.pop()
        if last is not r:
            self.decoder.move(last.slot, r.slot, last.pos)
            last.slot = r.slot
            self._live[r.slot] = last
        self.decoder.release(len(self._live))
        self.reserved_tokens -= r.need
        r.slot = -1

    def _fail_running(self, error: str) -> None:
        """End every running request with `error` and free every row (no cache moves: nothing stays)."""
        live, self._live = self._live, []
        for r in live:
            r.finished, r.finished_step, r.slot = True, self.step + 1, -1
            r.out.put(Step(None, "", "error", error))
            self._requests.pop(r.rid, None)
            self.reserved_tokens -= r.need
        for row in range(self.decoder.rows):
            self.decoder.release(row)

    def _emit(self, r: _Request, token: int) -> None:
        s = r.sampling
        if r.first_token_step is None:
            r.first_token_step = self.step
        if token in r.sampler.end_ids:
            self._finish(r, "stop")
            return
        text = r.detok.push(token)
        for stop in s.stop:
            cut = r.detok.text.find(stop)
            if cut >= 0:  # emit the text up to the stop sequence, never the sequence itself
                already = len(r.detok.text) - len(text)
                r.out.put(Step(token, r.detok.text[already:cut] if cut > already else ""))
                r.detok = None
                self._finish(r, "stop")
                return
        r.out.put(Step(token, text))
        if r.sampler.ends_with_stop_word():
            self._finish(r, "stop")
        elif r.sampler.generated >= s.max_tokens:
            self._finish(r, "length")
        else:
            r.pending = token

    def _advance(self, r: _Request, logits: np.ndarray) -> None:
        """Sample and emit a request's next token; a failure there fails this request only."""
        try:
            self._emit(r, r.sampler.next_token(logits))
        except Exception as e:
            self._finish(r, "error", f"sampling failed: {type(e).__name__}: {e}")

    def _prefill(self) -> None:
        budget = self.max_num_tokens - len(self._live)
        used = 0
        for r in sorted((r for r in self._live if r.pos < len(r.ids)), key=lambda r: r.rid):
            n = min(self.prefill_chunk, len(r.ids) - r.pos)
            if used and used + n > budget:
                return
            logits = self.decoder.forward(r.slot, r.ids[None, r.pos:r.pos + n], [r.pos + n])
            r.pos += n
            used += n
            if r.pos == len(r.ids):
                self._advance(r, logits[0])

    def _decode(self) -> None:
        ready = [r for r in self._live if r.pending is not None]
        if not ready:
            return
        rows = max(r.slot for r in ready) + 1
        if self.batch_invariant:
            rows += rows % 2  # see the module docstring
        rows = min(rows, self.decoder.rows)
        ids = np.zeros((rows, 1), dtype=np.int64)
        totals = [1] * rows  # filler rows write one position that nothing reads
        for slot in range(min(rows, len(self._live))):
            r = self._live[slot]
            if r.pending is not None:
                ids[slot, 0] = r.pending
            totals[slot] = r.pos + 1  # a prefilling row's next position is overwritten by its prefill
        logits = self.decoder.forward(0, ids, totals)
        rows = [r.slot for r in ready]
        for r in ready:  # first account for every row, since a finish moves the last row's cache
            r.pos += 1
            r.pending = None
        for r, row in zip(ready, rows):
            self._advance(r, logits[row])

    def _loop(self) -> None:
        while not self._closed:
            try:
                self._iteration()
            except Exception as e:  # an engine failure fails the requests in flight, not the engine
                self.failures += 1
                self._fail_running(f"engine failure: {type(e).__name__}: {e}")
        for r in list(self._requests.values()):
            self._finish(r, "cancelled")

    def _iteration(self) -> None:
        self._take_inbox()
        if self._closed:
            return
        self._admit()
        if not self._live:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        self.step += 1
        self._prefill()
        self._decode()
