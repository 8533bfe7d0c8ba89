"""ChatML, exactly as the model's chat template renders it, without BOS (the server's tokenizer adds
it), so the server's ids equal apply_chat_template(messages, add_generation_prompt=True, tokenize=True)."""

from __future__ import annotations

from collections.abc import Iterable

from client.types import Message


def format_chatml(messages: Iterable[Message | dict], add_generation_prompt: bool = True) -> str:
    parts = []
    for m in messages:
        m = m if isinstance(m, Message) else Message(**m)
        parts.append(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
