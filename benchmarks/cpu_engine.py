"""CPU engine speed at batch 1: prefill time and decode tok/s for our engine at accuracy levels 1 and
4, beside onnxruntime-genai's own builder (`-p int4`, same block size) on the original model as the
peer, all measured by one harness (og.Generator, greedy, fixed lengths, median of repeats)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(engine_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(engine_dir))
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first run warms up
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False, min_length=0)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt_ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        n = 1
        while n < new_tokens and not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append((n - 1) / (t2 - t1) if n > 1 else float("nan"))
        del gen
    return {"prefill_ms": 1000 * statistics.median(prefill[1:]), "decode_tok_s": statistics.median(decode[1:]),
            "runs": repeats, "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens}


def peer_engine(hf_dir: Path, out: Path, block_size: int) -> Path:
    """onnxruntime-genai's own builder: int4 (MatMulNBits, accuracy level 4), CPU."""
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "--extra_options", f"int4_block_size={block_size}",
                        "int4_accuracy_level=4"], check=True, capture_output=True)
    return out


def block_sizes(engine_dir: Path) -> list[int]:
    import onnx

    m = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)
    return sorted({a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                   if a.name == "block_size"})


def run(checkpoint: Path, out: Path, prompt_tokens: int = 40, new_tokens: int = 128, repeats: int = 3) -> dict:
    from build_engine import manifest
    from build_engine.cpu import graph

    ck = manifest.read(checkpoint, "trtllm-checkpoint")
    group = ck["quantization"]["group_size"]
    work = out / "engines"
    work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    text = "The history of computing is long and full of surprises. " * 20
    ids = tok(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
    rows = {}
    for level in (1, 4):
        eng = work / f"hermes-level{level}"
        if not (eng / "manifest.json").is_file():
            graph.build(checkpoint, eng, accuracy_level=level)
        rows[f"hermes-trtllm int4 g{group} accuracy {level}"] = {**measure(eng, ids, new_tokens, repeats),
                                                                 "block_sizes": block_sizes(eng)}
    peer = peer_engine(Path(ck["source"]["path"]), work / "og-builder", group)
    rows["onnxruntime-genai builder int4 (accuracy 4)"] = {**measure(peer, ids, new_tokens, repeats),
                                                          "block_sizes": block_sizes(peer)}
    result = {"checkpoint": str(checkpoint), "model": ck["source"]["model"], "batch": 1, "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_engine.json").write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    lines = [f"{'engine':<46} {'prefill ms':>10} {'decode tok/s':>12}  block sizes"]
    for name, r in result["results"].items():
        lines.append(f"{name:<46} {r['prefill_ms']:>10.1f} {r['decode_tok_s']:>12.1f}  {r['block_sizes']}")
    return "\n".join(lines)
