"""Fidelity report for a checkpoint and its CPU engine.

(a) engine vs reference: the CPU engine's logits against the independent PyTorch reference
    (build_engine.reference), and greedy generations on ChatML prompts;
(b) quantized vs original: perplexity on held-out text (never calibrated on) and top-1 agreement
    with the original model, for the AWQ checkpoint and for plain round-to-nearest (RTN) INT4 at
    the same group size, so the report shows what AWQ bought.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from build_engine import UserError, calibration, manifest

PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a GPU is in one sentence."}],
    [{"role": "user", "content": "Translate 'good morning' into German."}],
    [{"role": "user", "content": "List the first five prime numbers."}],
)


@dataclass(frozen=True)
class VerifySettings:
    greedy_new_tokens: int = 24
    ppl_windows: int = 8
    ppl_seq_len: int = 256
    near_tie: float = 1e-4


def engine_logits(engine_dir: Path, ids: list[int], chunk: int = 1) -> np.ndarray:
    """The engine's logits after each chunk of `ids`, fed through its KV cache as the scheduler
    feeds a prompt: with chunk=1, one row per position [S, V] (every step a decode step), over the
    tokenizer's vocabulary (the padded ids, which the Triton models ban, dropped)."""
    from build_engine.cpu.decoder import Decoder

    vocab = manifest.read(engine_dir, "cpu-engine")["model"]["vocab_size"]
    dec = _DECODERS.get(str(engine_dir))
    if dec is None or dec.capacity < len(ids):
        dec = _DECODERS[str(engine_dir)] = Decoder(engine_dir, rows=1, capacity=max(len(ids), 256))
    rows = []
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        rows.append(dec.forward(0, np.array([ids[start:end]], dtype=np.int64), [end])[0, ..., :vocab].copy())
    dec.release(0)
    return np.stack(rows)


_DECODERS: dict[str, object] = {}


def rtn_quantize_(model, group_size: int) -> None:
    """Round-to-nearest symmetric INT4 (amax/7 per output row and group), in place, lm_head excluded."""
    import torch

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                w = mod.weight.float()
                g = w.reshape(w.shape[0], -1, group_size)
                scale = (g.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-8)
                mod.weight.copy_((g / scale).round().clamp(-8, 7).mul(scale).reshape(w.shape).to(mod.weight.dtype))


def _nll_and_argmax(logits: np.ndarray, ids: list[int]) -> tuple[float, np.ndarray]:
    x = logits[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    target = np.asarray(ids[1:])
    return float(-logp[np.arange(len(target)), target].sum()), logits[:-1].argmax(-1)


def _reference_runs(ref, tok, end_id: int, settings: VerifySettings) -> list[dict]:
    """Per chat prompt: its ids, the reference's logits and greedy tokens (computed once for every engine)."""
    runs = []
    for msgs in PROMPTS:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        runs.append({"prompt": msgs[-1]["content"], "ids": ids, "logits": ref.logits(ids),
                     "greedy": [t for t in ref.greedy(ids, settings.greedy_new_tokens, end_id) if t != end_id]})
    return runs


def _engine_vs_reference(engine_dir: Path, ref, tok, runs: list[dict], settings: VerifySettings) -> dict:
    """Logits against the reference on the chat prompts, and greedy generations."""
    from build_engine.cpu import CpuEngine, Sampling

    engine = CpuEngine(engine_dir, tok)
    rel_errors, prompts_out = [], []
    try:
        for run in runs:
            ids, lr, ref_toks = run["ids"], run["logits"], run["greedy"]
            le = engine_logits(engine_dir, ids)
            rel_errors.append(float(np.abs(le - lr).max() / np.abs(lr).max()))
            eng_toks, _, _ = engine.generate(ids, Sampling(max_tokens=settings.greedy_new_tokens))
            entry = {"prompt": run["prompt"], "identical": eng_toks == ref_toks,
                     "engine": tok.decode(eng_toks), "reference": tok.decode(ref_toks)}
            if eng_toks != ref_toks:
                k = next((i for i, (a, b) in enumerate(zip(eng_toks, ref_toks)) if a != b),
                         min(len(eng_toks), len(ref_toks)))
                top2 = np.sort(ref.logits(ids + ref_toks[:k])[-1])[-2:]
                entry.update(first_divergence=k, reference_top2_gap=float(top2[1] - top2[0]),
                             near_tie=bool(top2[1] - top2[0] < settings.near_tie))
            prompts_out.append(entry)
    finally:
        engine.close()
    return {
        "max_rel_logits_error": max(rel_errors),
        "greedy_prompts_identical": sum(p["identical"] for p in prompts_out),
        "greedy_prompts_near_tie": sum(bool(p.get("near_tie")) for p in prompts_out),
        "greedy_prompts_total": len(prompts_out),
        "prompts": prompts_out,
    }


def _engine_perplexity(engine_dir: Path, windows: list[list[int]]) -> float:
    """The engine's own perplexity on the held-out windows (equal lengths), all windows decoded
    together, one position per step, over the tokenizer's vocabulary (as engine_logits)."""
    from build_engine.cpu.decoder import Decoder

    vocab = manifest.read(engine_dir, "cpu-engine")["model"]["vocab_size"]
    ids = np.array(windows, dtype=np.int64)
    rows, length = ids.shape
    dec = Decoder(engine_dir, rows=rows, capacity=length)
    nll = 0.0
    for t in range(length - 1):
        x = dec.forward(0, ids[:, t:t + 1], [t + 1] * rows)[..., :vocab].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        nll -= float((x[np.arange(rows), ids[:, t + 1]] - np.log(np.exp(x).sum(-1))).sum())
    return math.exp(nll / (rows * (length - 1)))


def _engine_settings(engine_dir: Path, ckpt: Path, ck_m: dict) -> dict:
    eng_m = manifest.read(engine_dir, "cpu-engine")
    if eng_m["checkpoint"]["files"] != ck_m["files"]:
        raise UserError(f"engine {engine_dir} was not built from checkpoint {ckpt} (hashes differ)")
    return {"accuracy_level": eng_m["settings"]["accuracy_level"], "lm_head": eng_m["settings"].get("lm_head", "fp32")}


def _quantized_vs_original(original_path: Path, ref, windows: list[list[int]], group_size: int,
                           vocab: int) -> tuple[dict[str, float], dict[str, float], int]:
    """Perplexity of the original model, the AWQ checkpoint (its reference) and a round-to-nearest
    quantization of the same group size, and how often each quantized model's top-1 agrees with the
    original's: (perplexities, agreement rates, tokens scored)."""
    import torch
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(original_path, dtype=torch.float32).eval()
    rtn = copy.deepcopy(orig)
    rtn_quantize_(rtn, group_size)
    nll = {"original": 0.0, "awq": 0.0, "rtn": 0.0}
    agree = {"awq": 0, "rtn": 0}
    n_tok = 0
    with torch.no_grad():
        for ids in windows:
            t = torch.tensor([ids])
            outs = {"original": orig(t).logits[0, :, :vocab].numpy(), "awq": ref.logits(ids),
                    "rtn": rtn(t).logits[0, :, :vocab].numpy()}
            arg = {}
            for k, lg in outs.items():
                s, arg[k] = _nll_and_argmax(lg, ids)
                nll[k] += s
            for k in agree:
                agree[k] += int((arg[k] == arg["original"]).sum())
            n_tok += len(ids) - 1
    return ({k: math.exp(v / n_tok) for k, v in nll.items()}, {k: v / n_tok for k, v in agree.items()}, n_tok)


def run(ckpt: Path, engine_dir: Path, report: Path, original: str | None = None,
        settings: VerifySettings = VerifySettings(), compare: tuple[Path, ...] = ()) -> dict:
    """The report for `engine_dir`; every engine in `compare` (e.g. the fast lm_head) gets the
    engine-vs-reference figures and its own perplexity beside it."""
    from build_engine.reference import Reference
    from build_engine.tokenization import load_tokenizer

    ck_m = manifest.read(ckpt, "trtllm-checkpoint")
    facts = ck_m["model"]
    eng_settings = {Path(d): _engine_settings(Path(d), ckpt, ck_m) for d in (engine_dir, *compare)}
    original_path = Path(original or ck_m["source"]["path"])
    if not (original_path / "config.json").is_file():
        raise UserError(f"original model {original_path} is not available; pass --original FOLDER")

    ref = Reference(ckpt, facts["vocab_size"], facts.get("sliding_window"))
    tok = load_tokenizer(Path(engine_dir) / "tokenizer")
    end_id = facts["end_id"]
    text = calibration.pydoc_text(held_out=True)
    windows = calibration.token_batches(tok, [text], settings.ppl_windows, settings.ppl_seq_len, seed=1)

    # (a) engine vs reference, for the engine and each one compared with it
    runs = _reference_runs(ref, tok, end_id, settings)
    engines = {str(d): {**eng_settings[Path(d)], **_engine_vs_reference(Path(d), ref, tok, runs, settings),
                        "perplexity": _engine_perplexity(Path(d), windows)} for d in (engine_dir, *compare)}
    main_engine = engines[str(engine_dir)]

    # (b) quantized vs original, on held-out text
    ppl, agree, n_tok = _quantized_vs_original(original_path, ref, windows, ck_m["quantization"]["group_size"],
                                               facts["vocab_size"])

    result = {
        "checkpoint": str(ckpt), "engine": str(engine_dir), "original": str(original_path),
        "engine_vs_reference": {k: v for k, v in main_engine.items() if k not in ("perplexity", "accuracy_level",
                                                                                 "lm_head")},
        "engines": {d: {k: v for k, v in e.items() if k != "prompts"} for d, e in engines.items()},
        "perplexity": {**ppl, "awq_over_original": ppl["awq"] / ppl["original"],
                       "rtn_over_original": ppl["rtn"] / ppl["original"]},
        "top1_agreement": agree,
        "settings": {"accuracy_level": main_engine["accuracy_level"], "lm_head": main_engine["lm_head"],
                     "group_size": ck_m["quantization"]["group_size"],
                     "heldout_text": "pydoc_data.topics, odd-indexed topics (calibration uses even-indexed)",
                     "heldout_tokens": n_tok, **settings.__dict__},
    }
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    print(summary_table(result))
    return result


def summary_table(r: dict) -> str:
    e, p, a = r["engine_vs_reference"], r["perplexity"], r["top1_agreement"]
    rows = [
        ("engine vs reference: max rel. logits error", f"{e['max_rel_logits_error']:.2e}"),
        ("greedy prompts identical", f"{e['greedy_prompts_identical']}/{e['greedy_prompts_total']}"
                                     f" (+{e['greedy_prompts_near_tie']} near-ties)"),
        ("perplexity original", f"{p['original']:.3f}"),
        ("perplexity AWQ (ratio)", f"{p['awq']:.3f} ({p['awq_over_original']:.4f})"),
        ("perplexity RTN (ratio)", f"{p['rtn']:.3f} ({p['rtn_over_original']:.4f})"),
        ("top-1 agreement AWQ / RTN", f"{a['awq']:.4f} / {a['rtn']:.4f}"),
    ]
    for d, eng in r["engines"].items():  # the engine itself and any compared with it
        rows.append((f"engine a{eng['accuracy_level']} {eng['lm_head']} lm_head: perplexity / max rel. error / greedy",
                     f"{eng['perplexity']:.3f} / {eng['max_rel_logits_error']:.2e} / "
                     f"{eng['greedy_prompts_identical']}/{eng['greedy_prompts_total']}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
