"""The synthetic engine: TensorRT-LLM's serving contract at a GPU's pace, with no compute. For load tests
of the serving stack (Triton, the BLS, the OpenAI frontend, autoscaling, clients) on machines without a
GPU, and for measuring what that stack costs per token at the rates a GPU produces.

It is served by the same `tensorrt_llm` model and inflight scheduler as the CPU engine
(build_engine.cpu.CpuEngine): admission, KV budget, queue bound, end id, stop and bad words, min tokens,
sampling, cancellation and metrics are that code's; only the decoder is replaced. `SyntheticDecoder`
returns logits that make real English text (Python's bundled documentation, tokenized with the
deployment's own tokenizer, one paragraph per reply, then the end id) the likely choice, and holds
each step for the time the chosen schedule gives it:

  roofline   a decode step reads the weights once plus every running sequence's KV cache, at the GPU's
             bandwidth x efficiency; a prefill chunk is the larger of that read and its flops at the
             GPU's fp16 peak x efficiency (build_engine.gpu_specs)
  rate       every stream gets a fixed number of tokens per second
  max        as fast as the scheduler can go
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from build_engine import UserError, gpu_specs, manifest

ENGINE_KIND = "synthetic-engine"
SCHEDULES = ("roofline", "rate", "max")
CORPUS_FILE = "corpus.npy"
CORPUS_PARAGRAPHS = 400
DEFAULT_EFFICIENCY = 0.7  # share of datasheet bandwidth and flops that real kernels reach
# Logits of the text's next token and of the one after it: a draw takes the first unless it is banned (the
# end id under min_tokens, a bad word), then the second; with any other token ~e^-50 as likely.
TARGET_LOGIT, RUNNER_UP_LOGIT = 100.0, 50.0


@dataclass(frozen=True)
class StepModel:
    """How long one engine step takes on the modelled GPU."""
    schedule: str
    weight_bytes: int = 0  # read once per step
    kv_bytes_per_token: int = 0  # read per cached position per decode step
    flops_per_token: int = 0
    bytes_per_s: float = 0.0  # bandwidth x efficiency
    flops_per_s: float = 0.0  # fp16 peak x efficiency
    tokens_per_s: float = 0.0  # rate: per stream

    def decode_s(self, context_tokens: int) -> float:
        """A decode step over sequences that hold `context_tokens` positions in all."""
        if self.schedule == "rate":
            return 1.0 / self.tokens_per_s
        if self.schedule == "max":
            return 0.0
        return (self.weight_bytes + self.kv_bytes_per_token * context_tokens) / self.bytes_per_s

    def prefill_s(self, new_tokens: int, context_tokens: int) -> float:
        """A prefill chunk of `new_tokens` after `context_tokens` already cached."""
        if self.schedule != "roofline":
            return 0.0
        read = (self.weight_bytes + self.kv_bytes_per_token * (context_tokens + new_tokens)) / self.bytes_per_s
        return max(read, self.flops_per_token * new_tokens / self.flops_per_s)


def step_model(schedule: str, gpu: str | None, arch: dict, weight_bytes: dict[str, int],
               tokens_per_s: float | None = None, efficiency: float = DEFAULT_EFFICIENCY) -> StepModel:
    if schedule not in SCHEDULES:
        raise UserError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule == "rate":
        if not tokens_per_s or tokens_per_s <= 0:
            raise UserError("--schedule rate needs --tokens-per-s above 0 (tokens per second per stream)")
        return StepModel("rate", tokens_per_s=float(tokens_per_s))
    if schedule == "max":
        return StepModel("max")
    if not gpu:
        raise UserError("--schedule roofline needs --gpu (one of " + ", ".join(sorted(gpu_specs.GPU_BANDWIDTH_GBS)) + ")")
    if not 0 < efficiency <= 1:
        raise UserError(f"--efficiency must be in (0, 1] (got {efficiency})")
    try:
        gpu = gpu_specs.check_gpu(gpu)
    except ValueError as e:
        raise UserError(str(e)) from None
    return StepModel("roofline", weight_bytes=sum(weight_bytes.values()),
                     kv_bytes_per_token=gpu_specs.kv_bytes_per_token(arch),
                     flops_per_token=gpu_specs.flops_per_token(weight_bytes),
                     bytes_per_s=gpu_specs.GPU_BANDWIDTH_GBS[gpu] * 1e9 * efficiency,
                     flops_per_s=gpu_specs.GPU_FP16_TFLOPS[gpu] * 1e12 * efficiency)


def corpus_ids(tokenizer, end_id: int, paragraphs: int = CORPUS_PARAGRAPHS) -> np.ndarray:
    """Replies to replay: English paragraphs of Python's bundled documentation, each tokenized as the
    deployment's tokenizer does and followed by the end id."""
    from pydoc_data.topics import topics

    texts = []
    for topic in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[topic]):
            para = " ".join(para.split())
            if len(para.split()) >= 30 and para[0].isalpha() and para.isascii():
                texts.append(para)
    ids: list[int] = []
    for text in texts[:paragraphs]:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(end_id)
    out = np.asarray(ids, dtype=np.int32)
    if out.size == 0 or out.max() >= len(tokenizer):
        raise UserError("the synthetic corpus could not be tokenized with this tokenizer")
    return out


def build(ckpt: Path, output: Path, schedule: str = "roofline", gpu: str | None = "h100",
          tokens_per_s: float | None = None, efficiency: float = DEFAULT_EFFICIENCY,
          size_as: str | None = None) -> Path:
    """A synthetic engine folder from a TRT-LLM checkpoint (its tokenizer, model facts and limits). The
    step model sizes the model as the checkpoint's own tensors, or as preset `size_as`'s shapes and engine
    limits (e.g. the 7B's, from a small checkpoint that has its tokenizer)."""
    from build_engine import checkpoint, presets
    from build_engine.tokenization import load_tokenizer

    ckpt, output = Path(ckpt), Path(output)
    ck_manifest = manifest.read(ckpt, "trtllm-checkpoint")
    facts = ck_manifest["model"]
    shapes = checkpoint.validate(ckpt, real_vocab=facts["vocab_size"])
    limits = presets.limits_for(ck_manifest)
    context_length = min(limits.max_seq_len, facts["max_position_embeddings"])
    if size_as:  # the modelled deployment's shapes and limits
        preset = presets.load(size_as)
        arch, weight_bytes = preset.architecture, gpu_specs.bytes_from_shapes(preset.architecture, preset.group_size)
        limits, context_length = preset.engine, preset.engine.max_seq_len
    else:
        cfg = checkpoint.read_config(ckpt)
        arch = {"hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_hidden_layers"],
                "num_attention_heads": cfg["num_attention_heads"],
                "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                "head_dim": cfg.get("head_size")}
        weight_bytes = gpu_specs.bytes_from_checkpoint(ckpt)
    model = step_model(schedule, gpu, arch, weight_bytes, tokens_per_s, efficiency)
    tok = load_tokenizer(ckpt / "tokenizer")
    with manifest.staging(output) as tmp:
        corpus = corpus_ids(tok, facts["end_id"])
        np.save(tmp / CORPUS_FILE, corpus)
        shutil.copytree(ckpt / "tokenizer", tmp / "tokenizer")
        manifest.write(
            tmp, ENGINE_KIND,
            checkpoint={"path": str(ckpt.resolve()), "files": ck_manifest["files"]},
            preset=ck_manifest.get("preset"),
            settings={"step_model": asdict(model), "gpu": gpu if schedule == "roofline" else None,
                      "efficiency": efficiency if schedule == "roofline" else None, "sized_as": size_as or "checkpoint",
                      "context_length": context_length, "sliding_window": facts.get("sliding_window"),
                      # A GPU prefills up to max_num_tokens prompt tokens a step (the CPU engine: 64).
                      "prefill_chunk": limits.max_num_tokens,
                      "corpus": {"source": "pydoc_data.topics", "paragraphs": int((corpus == facts["end_id"]).sum()),
                                 "tokens": int(corpus.size)}},
            limits=vars(limits), model=facts, engine_vocab_size=shapes.vocab_padded)
    return output


class SyntheticDecoder:
    """The CPU engine's decoder interface (build_engine.cpu.decoder.Decoder) without compute: each row
    follows a cursor through the corpus; a row that starts at position 0 begins the next paragraph."""

    def __init__(self, engine_dir: Path, rows: int):
        m = manifest.read(engine_dir, ENGINE_KIND)
        self.model = StepModel(**m["settings"]["step_model"])
        self.corpus = np.load(Path(engine_dir) / CORPUS_FILE).astype(np.int64)
        self.starts = np.flatnonzero(self.corpus == m["model"]["end_id"]) + 1
        self.starts = np.concatenate([[0], self.starts[:-1]])
        self.rows, self.vocab = rows, int(m["engine_vocab_size"])
        self.cursor = np.zeros(rows, dtype=np.int64)
        self._next_paragraph = 0
        self._logits = np.zeros((rows, self.vocab), dtype=np.float32)
        self._set: list[tuple[int, int]] = []  # (row, id) entries of _logits to clear before the next call

    def _proposal(self, row: int) -> tuple[int, int]:
        n = self.corpus.size
        return int(self.corpus[self.cursor[row] % n]), int(self.corpus[(self.cursor[row] + 1) % n])

    def forward(self, start: int, ids: np.ndarray, totals: list[int]) -> np.ndarray:
        """Logits [n, V] for rows start..start+n-1 (ids [n, S]: each row's new tokens; totals: its length
        after them), after holding the step for the step model's time."""
        t0 = time.perf_counter()
        n, new = ids.shape
        for row, entry in self._set:
            self._logits[row, entry] = 0.0
        self._set.clear()
        for i in range(n):
            row, fed = start + i, int(ids[i, -1])
            if totals[i] == new:  # the row's first tokens: a new request
                self.cursor[row] = self.starts[self._next_paragraph % self.starts.size]
                self._next_paragraph += 1
            else:
                target, runner_up = self._proposal(row)
                self.cursor[row] += 1 if fed == target else 2 if fed == runner_up else 0
            target, runner_up = self._proposal(row)
            self._logits[row, runner_up] = RUNNER_UP_LOGIT
            self._logits[row, target] = TARGET_LOGIT
            self._set += [(row, target), (row, runner_up)]
        context = int(sum(totals))
        hold = (self.model.prefill_s(new, context - new) if new > 1 or n == 1 and totals[0] == new
                else self.model.decode_s(context))
        left = hold - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return self._logits[start:start + n]

    def move(self, src: int, dst: int, length: int) -> None:
        self.cursor[dst] = self.cursor[src]

    def release(self, row: int) -> None:
        pass


def describe(engine_dir: Path) -> str:
    """One line on what a synthetic engine models, for logs and the CLI."""
    s = manifest.read(engine_dir, ENGINE_KIND)["settings"]
    m = s["step_model"]
    if m["schedule"] == "rate":
        return f"synthetic engine: {m['tokens_per_s']:g} tokens/s per stream"
    if m["schedule"] == "max":
        return "synthetic engine: as fast as the scheduler goes"
    return (f"synthetic engine: {s['gpu'].upper()} roofline x {s['efficiency']:g}, model sized as {s['sized_as']} "
            f"({m['weight_bytes'] / 1e9:.2f} GB per step)")

