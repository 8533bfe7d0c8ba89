"""Calibration text -> token batches for AWQ.

Offline default: the English technical prose that ships with Python (pydoc_data.topics). Online,
TensorRT-LLM's own recipe uses cnn_dailymail 3.0.0 articles or pile-val; both are loaded through
`datasets` when it is installed and the hub is reachable, and fail with a clear message otherwise.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from build_engine import UserError



def pydoc_text(held_out: bool = False) -> str:
    """Python's bundled documentation topics. Topics are split by sorted name: even-indexed topics
    calibrate, odd-indexed ones are held out for perplexity (never calibrated on)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[int(held_out)::2]
    return "\n\n".join(topics[k] for k in keys)


# Hub ids and text fields of the online calibration sets. cnn_dailymail is TensorRT-LLM's AWQ recipe
# (32 articles x 512 tokens); `abisee/cnn_dailymail` is the id modelopt 0.47 uses (0.37 still says
# `cnn_dailymail`, the hub's redirect to it).
HUB_DATASETS = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "train", "article"),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
}
DOCS_PER_SAMPLE = 4  # documents read per calibration sample: short ones may not fill a window


DATASETS = ("pydoc", *HUB_DATASETS)


def load_text(dataset: str | None = None, text_file: str | Path | None = None, samples: int = 32) -> list[str]:
    """Documents to calibrate on, from a file (documents separated by blank lines) or a dataset.
    For a hub dataset, the first `samples` x DOCS_PER_SAMPLE documents of the split are streamed."""
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read calibration text {text_file}: {e}") from None
        docs = [d for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise UserError(f"calibration text {text_file} is empty")
        return docs
    dataset = dataset or "pydoc"
    if dataset == "pydoc":
        return [pydoc_text()]
    if dataset not in HUB_DATASETS:
        raise UserError(f"unknown calibration dataset {dataset!r}; choose one of {', '.join(DATASETS)} or --calib-text")
    try:
        import datasets
    except ImportError:
        raise UserError(f"calibration dataset {dataset} needs `pip install datasets`, or use --calib-text FILE") from None
    hub_id, config, split, field = HUB_DATASETS[dataset]
    try:
        # Streamed: only the documents read are downloaded, never the whole split.
        ds = datasets.load_dataset(hub_id, config, split=split, streaming=True)
        return [r[field] for r in itertools.islice(ds, samples * DOCS_PER_SAMPLE)]
    except Exception as e:
        raise UserError(f"cannot load calibration dataset {hub_id} ({type(e).__name__}: offline?); "
                        "use --calib-text FILE or --calib-dataset pydoc") from None


def token_batches(tokenizer, docs: list[str], size: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """`size` windows of exactly `seq_len` tokens, drawn reproducibly from the concatenated documents."""
    if size < 1 or seq_len < 2:
        raise UserError(f"calibration needs size >= 1 and seq_len >= 2 (got {size}, {seq_len})")
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    if len(ids) < seq_len:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    starts = list(range(0, len(ids) - seq_len + 1, seq_len))
    random.Random(seed).shuffle(starts)
    if len(starts) < size:
        raise UserError(f"calibration text has {len(starts)} windows of {seq_len} tokens; {size} requested")
    return [ids[s : s + seq_len] for s in sorted(starts[:size])]
