"""Tokenization shared by the CPU engine and the Triton models (the BLS streams text with it on the
GPU too): loading a checkpoint's tokenizer and incremental detokenization."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    from build_engine import UserError

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer from {path}: {e}") from None


def max_prompt_bytes(tokenizer, max_input_len: int) -> int:
    """A prompt size in UTF-8 bytes above which no text can tokenize to `max_input_len` tokens or
    fewer, so that a longer one is refused before the tokenizer runs on it. A token's stored form is
    never shorter than the text it stands for ("▁" for a space, "<0x41>" or "Ġ"-style bytes); the factor
    4 covers normalizers that shrink text (NFKC folds a 3-byte ligature into one letter)."""
    longest = max((len(t.encode("utf-8")) for t in tokenizer.get_vocab()), default=1)
    return 4 * max_input_len * longest


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
