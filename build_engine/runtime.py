"""Run the CPU engine: continuous batching through onnxruntime-genai's Engine, HF tokenization.

One background thread owns the og.Engine (og objects are used from that thread only). Callers
submit token ids with sampling settings and read a per-request stream of `Step`s; closing a stream
early cancels the request in the engine and frees its slot.

    engine = CpuEngine("artifacts/smol/engine-cpu")
    for step in engine.submit(ids, Sampling(max_tokens=64)):
        print(step.text, end="")
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from build_engine import UserError, manifest
from client.limits import check_sampling


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0  # end id masked until this many tokens (benchmarks: fixed output length)
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # stop sequences, matched on the decoded text
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        check_sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens, seed=self.seed)
        if not all(self.stop):
            raise ValueError("stop sequences must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Step:
    token_id: int | None  # None on a final step that carries no token
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class Detokenizer:
    """Incremental detokenization that keeps SentencePiece leading spaces and never splits a
    multi-byte character: decode a short window of ids and emit only the new, complete suffix."""

    def __init__(self, tokenizer, skip_ids: tuple[int, ...] = ()):
        self.tok, self.skip = tokenizer, set(skip_ids)
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=False)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        rest = self.tok.decode(self.ids, skip_special_tokens=False)[len(self.text) :]
        self.text += rest
        return rest


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass
class _Pending:
    rid: int
    ids: np.ndarray
    sampling: Sampling
    out: queue.Queue = field(default_factory=queue.Queue)
    detok: Detokenizer | None = None
    generated: int = 0
    request: object = None
    turn: int = -1
    finished: bool = False


class Stream:
    """Iterator of Steps for one request; close() (or leaving a `with` block) cancels it."""

    def __init__(self, engine: "CpuEngine", pending: _Pending):
        self._engine, self._p = engine, pending
        self.prompt_tokens = len(pending.ids)
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[Step]:
        try:
            while True:
                step: Step = self._p.out.get()
                if step.finish_reason:
                    self.finish_reason = step.finish_reason
                yield step
                if step.finish_reason:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if self.finish_reason is None:
            self._engine._cancel(self._p.rid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CpuEngine:
    def __init__(self, engine_dir: Path | str, tokenizer=None):
        import onnxruntime_genai as og

        self.dir = Path(engine_dir)
        self.manifest = manifest.read(self.dir, "cpu-engine")
        self.model_facts = self.manifest["model"]
        self.limits = self.manifest["limits"]
        self.context_length = self.manifest["settings"]["context_length"]
        self.end_id = self.model_facts["end_id"]
        self.tokenizer = tokenizer or load_tokenizer(self.dir / "tokenizer")
        self._og = og
        self.max_batch_size = 0
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="cpu-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise UserError(f"cannot load the CPU engine in {self.dir}: {self._start_error}")

    # -- public -----------------------------------------------------------------------------
    def check_prompt(self, ids, sampling: Sampling) -> None:
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.limits["max_input_len"]:
            raise ValueError(f"the prompt has {n} tokens; this engine accepts at most {self.limits['max_input_len']}")
        if n + sampling.max_tokens > self.context_length:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds the engine's "
                             f"maximum sequence length {self.context_length}")

    def submit(self, ids, sampling: Sampling = Sampling()) -> Stream:
        self.check_prompt(ids, sampling)
        if sampling.seed is not None:
            # og applies per-request seeds only in its paged (dynamic-batching) engine, which needs a
            # paged-attention graph; this engine uses static batching.
            raise ValueError("per-request seeds are not supported by the CPU engine; omit seed")
        if self._closed:
            raise RuntimeError("the engine is closed")
        p = _Pending(next(self._ids), np.asarray(ids, dtype=np.int32), sampling,
                     detok=Detokenizer(self.tokenizer, skip_ids=(self.end_id,)))
        self._inbox.put(("add", p))
        self._wake.set()
        return Stream(self, p)

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
        return len(self._live)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread ----------------------------------------------------------------------
    def _cancel(self, rid: int) -> None:
        self._inbox.put(("cancel", rid))
        self._wake.set()

    def _turn_options(self, req, s: Sampling):
        og = self._og
        to = og.TurnOptions(req)
        to.set_max_generated_tokens(s.max_tokens)
        if s.min_tokens:
            to.set_min_generated_tokens(s.min_tokens)
        to.set_do_sample(not s.greedy)
        if not s.greedy:
            to.set_temperature(s.temperature)
            to.set_top_k(s.top_k)
            to.set_top_p(s.top_p)
        if s.repetition_penalty != 1.0:
            to.set_repetition_penalty(s.repetition_penalty)
        return to

    def _finish(self, p: _Pending, reason: str, error: str | None = None, cancel: bool = False) -> None:
        if p.finished:
            return
        p.finished = True
        if cancel and p.request is not None:
            try:
                p.request.cancel_turn(p.turn)
            except Exception:  # the turn may have just ended on its own
                pass
        tail = p.detok.flush() if p.detok and reason != "cancelled" else ""
        p.out.put(Step(None, tail, reason, error))
        self._live.pop(p.rid, None)
        if p.request is not None:
            try:
                p.request.close()
            except Exception:  # og refuses to close a request it already released; nothing is held
                pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                p: _Pending = item
                try:
                    p.request = self._engine.create_request()
                    p.turn = p.request.begin_turn(p.ids, self._turn_options(p.request, p.sampling))
                    self._live[p.rid] = p
                except Exception as e:
                    self._finish(p, "error", f"engine rejected the request: {e}")
            elif kind == "cancel" and item in self._live:
                self._finish(self._live[item], "cancelled", cancel=True)

    def _on_token(self, p: _Pending, token: int) -> None:
        s = p.sampling
        p.generated += 1
        text = p.detok.push(token)
        if token in s.stop_token_ids:
            p.out.put(Step(token, text))
            self._finish(p, "stop", cancel=True)
            return
        if s.stop:
            for stop in s.stop:
                cut = p.detok.text.find(stop)
                if cut >= 0:
                    # Emit text up to the stop sequence, never the sequence itself.
                    already = len(p.detok.text) - len(text)
                    p.out.put(Step(token, p.detok.text[already:cut] if cut > already else ""))
                    p.detok.text = p.detok.text[:cut]
                    p.detok.ids.clear()
                    p.detok = None
                    self._finish(p, "stop", cancel=True)
                    return
        p.out.put(Step(token, text))

    def _loop(self) -> None:
        og = self._og
        # og's Engine must be created and driven by one thread: this one.
        try:
            self._model = og.Model(str(self.dir))
            self._engine = og.Engine(self._model)
            self.max_batch_size = self._engine.get_capabilities().configured_max_batch_size
        except Exception as e:
            self._start_error = e
            return
        finally:
            self._ready.set()
        TOKEN, DONE, FAILED = (og.EngineEventFlags.TOKEN.value, og.EngineEventFlags.TURN_FINISHED.value,
                               og.EngineEventFlags.FAILED.value)
        reasons = {og.FinishReason.EOS: "stop", og.FinishReason.STOP_STRING: "stop",
                   og.FinishReason.MAX_GENERATED_TOKENS: "length", og.FinishReason.MAX_SESSION_TOKENS: "length",
                   og.FinishReason.CANCELLED: "cancelled"}
        buf = self._engine.create_event_buffer(256)
        by_request: dict[int, _Pending] = {}
        while not self._closed:
            self._drain_inbox()
            if not self._live:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            by_request = {id(p.request): p for p in self._live.values()}
            try:
                events = self._engine.run(buf)
            except Exception as e:  # an engine failure fails the requests in flight, not the server
                for p in list(self._live.values()):
                    self._finish(p, "error", f"engine failure: {e}")
                continue
            for ev in events:
                p = by_request.get(id(ev.request))
                if p is None or p.finished:
                    continue
                flags = ev.flags.value
                if flags & TOKEN:
                    self._on_token(p, int(ev.token))
                if p.finished:
                    continue
                if flags & FAILED:
                    self._finish(p, "error", f"engine error {ev.error_code.name}")
                elif flags & DONE:
                    self._finish(p, reasons.get(ev.finish_reason, "stop"))
        for p in list(self._live.values()):
            self._finish(p, "cancelled", cancel=True)
