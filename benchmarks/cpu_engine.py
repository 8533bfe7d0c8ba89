"""CPU engine speed: prefill time, batch-1 decode tok/s and total tok/s at batch 4 and 8, for our
engine under its own scheduler (the serving path) at accuracy levels 1 and 4, with the exact fp32
lm_head and the fast int8 and int4 ones, beside onnxruntime-genai's own builder (`-p int4`, same
block size, og.Generator with a static batch) on the original model, and optionally (`--peer`) the
shared peers harness's other runtimes (OpenVINO GenAI, llama.cpp) in the same rounds. Engines are
timed round by round, A B C A B C ..., so drift hits all alike; greedy, fixed lengths (end id
ignored), medians over the rounds. Peak RSS is measured per engine in a fresh process (load,
warm-up, one batch-1 request)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT_TEXT = "The history of computing is long and full of surprises, from {} to the machines of today. "
HARNESS_PROMPT_TOKENS, HARNESS_NEW_TOKENS = 40, 128  # what the peers harness's workers time (its wcommon.py)
SUBJECTS = ("the abacus", "looms", "relays", "valves", "transistors", "chips", "clusters", "phones")


class Ours:
    """The project's engine through CpuEngine (the scheduler the Triton model uses)."""

    def __init__(self, engine_dir: Path, batch_invariant: bool | None = None, tokenizer=None):
        from build_engine.cpu import CpuEngine

        self.engine = CpuEngine(engine_dir, tokenizer, batch_invariant=batch_invariant)
        self.tokenizer = self.engine.tokenizer

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[tuple[float, float, int]]:
        """Per request: (time to first token, time to last token) from the common start, tokens."""
        from build_engine.cpu import Sampling

        t0 = time.perf_counter()
        out = [None] * len(prompts)

        def one(i):
            first, n = None, 0
            for step in self.engine.submit(prompts[i], Sampling(max_tokens=new_tokens, ignore_eos=True)):
                if step.token_id is not None:
                    n += 1
                    first = first or time.perf_counter() - t0
            out[i] = (first, time.perf_counter() - t0, n)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return out

    def close(self):
        self.engine.close()


class OgGenerator:
    """onnxruntime-genai's og.Generator: a static batch, every row the same length."""

    def __init__(self, engine_dir: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(engine_dir))

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[tuple[float, float, int]]:
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompts[0]) + new_tokens, min_length=len(prompts[0]) + new_tokens,
                                  do_sample=False, batch_size=len(prompts))
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(prompts, dtype=np.int32))
        gen.generate_next_token()
        first = time.perf_counter() - t0
        n = 1
        while n < new_tokens and not gen.is_done():
            gen.generate_next_token()
            n += 1
        end = time.perf_counter() - t0
        del gen
        return [(first, end, n)] * len(prompts)

    def close(self):
        pass


class HarnessPeer:
    """A runtime of the shared peers harness (its README: ../shared/peers), run by the harness's own
    worker in the harness's venv and driven through its protocol, one command at a time, in our rounds.
    The worker tokenizes its own 40-token passages and generates 128 tokens each (the shape of our
    default run, which `run` requires of a run with peers)."""

    def __init__(self, harness: Path, name: str, out: Path):
        import importlib

        from build_engine import UserError

        sys.path.insert(0, str(harness))
        try:
            driver, wc = importlib.import_module("driver"), importlib.import_module("wcommon")
        except ImportError:
            raise UserError(f"{harness} is not the peers harness (no driver.py and wcommon.py)") from None
        if (wc.PROMPT_TOKENS, wc.NEW_TOKENS) != (HARNESS_PROMPT_TOKENS, HARNESS_NEW_TOKENS):
            raise UserError(f"the peers harness in {harness} times {wc.PROMPT_TOKENS}-token prompts and "
                            f"{wc.NEW_TOKENS} new tokens, not {HARNESS_PROMPT_TOKENS} and {HARNESS_NEW_TOKENS}")
        if name not in driver.ENGINES:
            raise UserError(f"the peers harness has no engine {name!r}; it has: {', '.join(driver.ENGINES)}")
        try:
            py, model = driver.locate([name])[name]
        except SystemExit as e:  # the harness names what its setup.sh has not made yet
            raise UserError(f"peer {name}: {e}") from None
        self.spawn = lambda: driver.Worker(name, out, py, model)
        self.worker = self.spawn()

    def _ask(self, worker, **msg) -> dict:
        res = worker.ask(**msg)
        if not res.get("ok"):
            raise RuntimeError(f"peer worker failed {msg}: {res.get('error')}")
        return res

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[tuple[float, float, int]]:
        if len(prompts) == 1:
            r = self._ask(self.worker, cmd="b1")
            first = r["prefill_ms"] / 1000
            return [(first, first + (r["new_tokens"] - 1) / r["decode_tok_s"], r["new_tokens"])]
        r = self._ask(self.worker, cmd="batch", n=len(prompts))
        counts = r.get("new_tokens") or [HARNESS_NEW_TOKENS] * len(prompts)
        return [(None, r["wall_s"], n) for n in counts]

    def peak_rss_mib(self) -> float:
        """A fresh worker's peak RSS after one batch-1 run, as `_rss_probe` measures ours."""
        w = self.spawn()
        try:
            self._ask(w, cmd="b1")
            return float(self._ask(w, cmd="rss")["vmhwm_mib"])
        finally:
            w.close()

    def close(self):
        self.worker.close()


def _rss_probe(kind: str, engine_dir: str, prompt: list[int], new_tokens: int) -> float:
    """Peak RSS (MiB) of a fresh process that loads the engine and runs one batch-1 request. The
    tokenizer is the `tokenizers` library's own (transformers would add torch's ~280 MiB), as
    og.Generator's is its own: the figure is the engine's."""
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
    code = (f"from benchmarks.cpu_engine import make; e=make({kind!r}, {engine_dir!r}, light=True); "
            f"e.run([{prompt!r}], {new_tokens}); e.close(); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def make(kind: str, engine_dir: str, light: bool = False):
    if kind == "og":
        return OgGenerator(Path(engine_dir))
    tok = None
    if light:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(engine_dir) / "tokenizer" / "tokenizer.json"))
    return Ours(Path(engine_dir), True if kind == "ours-invariant" else None, tok)


def peer_engine(hf_dir: Path, out: Path, block_size: int) -> Path:
    """onnxruntime-genai's own builder: int4 (MatMulNBits, accuracy level 4), CPU. (og 0.18 reads
    `block_size`/`accuracy_level`; the `int4_` spellings are silently ignored.)"""
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "--extra_options", f"block_size={block_size}",
                        "accuracy_level=4"], check=True, capture_output=True)
    return out


def run(checkpoint: Path, out: Path, prompt_tokens: int = 40, new_tokens: int = 128, rounds: int = 3,
        batches: tuple[int, ...] = (4, 8), peers: tuple[str, ...] = (), harness: Path | None = None) -> dict:
    from tqdm.auto import tqdm

    from build_engine import UserError, manifest
    from build_engine.cli import quiet_progress
    from build_engine.cpu import graph

    if peers and (prompt_tokens, new_tokens) != (HARNESS_PROMPT_TOKENS, HARNESS_NEW_TOKENS):
        raise UserError(f"the peers harness times {HARNESS_PROMPT_TOKENS}-token prompts and {HARNESS_NEW_TOKENS} "
                        f"new tokens: run with --prompt-tokens {HARNESS_PROMPT_TOKENS} --new-tokens {HARNESS_NEW_TOKENS}")
    ck = manifest.read(checkpoint, "trtllm-checkpoint")
    group = ck["quantization"]["group_size"]
    work = out / "engines"
    work.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for level, head in ((4, "fp32"), (4, "int8"), (4, "int4"), (1, "fp32")):
        eng = work / f"hermes-a{level}-lm-head-{head}"
        if not (eng / "manifest.json").is_file():
            graph.build(checkpoint, eng, accuracy_level=level, lm_head=head)
        dirs[f"hermes-trtllm a{level} {head} lm_head (scheduler)"] = ("ours", eng)
    dirs["hermes-trtllm a4 int8 lm_head (batch-invariant)"] = ("ours-invariant", work / "hermes-a4-lm-head-int8")
    dirs[f"onnxruntime-genai builder int4 g{group} (og.Generator)"] = (
        "og", peer_engine(Path(ck["source"]["path"]), work / f"og-builder-g{group}", group))
    engines = {name: make(kind, str(d)) for name, (kind, d) in dirs.items()}
    tok = next(iter(engines.values())).tokenizer
    for peer in peers:
        engines[f"{peer} (peers harness)"] = p = HarnessPeer(Path(harness), peer, out)
        dirs[f"{peer} (peers harness)"] = ("harness", p)
    prompts = [tok(PROMPT_TEXT.format(s) * 8, add_special_tokens=False)["input_ids"][:prompt_tokens] for s in SUBJECTS]
    phases = [1, *batches]
    raw = {name: {b: [] for b in phases} for name in engines}
    try:
        for e in engines.values():
            e.run(prompts[:1], 8)  # warm-up
        for _ in tqdm(range(rounds), desc="interleaved rounds", disable=quiet_progress()):
            for b in phases:
                for name, e in engines.items():
                    time.sleep(0.5)  # the previous engine's spinning worker threads go idle first
                    raw[name][b].append(e.run(prompts[:b], new_tokens))
    finally:
        for e in engines.values():
            e.close()
    rows = {}
    for name, (kind, d) in dirs.items():
        b1 = raw[name][1]
        row = {"prefill_ms": 1000 * statistics.median(r[0][0] for r in b1),
               "decode_tok_s": statistics.median((r[0][2] - 1) / (r[0][1] - r[0][0]) for r in b1),
               "peak_rss_mib": d.peak_rss_mib() if kind == "harness" else _rss_probe(kind, str(d), prompts[0], new_tokens)}
        for b in batches:
            row[f"total_tok_s_b{b}"] = statistics.median(sum(x[2] for x in r) / max(x[1] for x in r)
                                                         for r in raw[name][b])
        row["tokens_per_request"] = sorted({x[2] for b in phases for r in raw[name][b] for x in r})
        rows[name] = row
    result = {"checkpoint": str(checkpoint), "model": ck["source"]["model"], "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "rounds": rounds, "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_engine.json").write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    keys = [k for k in next(iter(result["results"].values())) if k not in ("peak_rss_mib", "tokens_per_request")]
    keys.append("peak_rss_mib")
    w = max(len(n) for n in result["results"])
    lines = [f"{'engine':<{w}} " + " ".join(f"{k:>15}" for k in keys)]
    for name, r in result["results"].items():
        lines.append(f"{name:<{w}} " + " ".join(f"{r[k]:>15.1f}" for k in keys))
    return "\n".join(lines)
