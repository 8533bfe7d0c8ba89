"""The BLS's text assembly (common.ReplyText), without Triton: a delta that carries several tokens (what
piled up while the last one was sent) yields exactly the text, token count and stop of one-token deltas."""

from __future__ import annotations

import random

import pytest

from model_repo.triton_models.common import ReplyText, UnknownToken

END_ID = 32000
REPLY = "Sure — the café’s menu: 東京 ramen 🍜, crème brûlée. Done!<|im_end|>"


def deltas(tok, ids, sizes, stops=()):
    text = ReplyText(tok, END_ID, list(stops), len(tok))
    out, i = [], 0
    for n in sizes:
        if i >= len(ids) or text.stopped:
            break
        out.append(text.push(ids[i:i + n]))
        i += n
    out.append(text.finish())
    return out, text


def batchings(n: int, seed: int):
    rng = random.Random(seed)
    yield [1] * n
    yield [n]
    for _ in range(20):
        yield [rng.randint(1, 6) for _ in range(n)]


def reply_ids(tok):
    """The reply's ids as the engine produces them: tokenized in context after the generation prompt."""
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    both = tok("<|im_start|>assistant\n" + REPLY, add_special_tokens=False)["input_ids"]
    assert both[:len(prompt)] == prompt
    return both[len(prompt):]


@pytest.mark.parametrize("stops", [(), ("ramen 🍜",), ("brûl",), ("é",), ("Done!", "menu")])
def test_multi_token_deltas_give_the_text_count_and_stop_of_single_token_deltas(hermes_tokenizer, stops):
    ids = reply_ids(hermes_tokenizer)
    one, one_text = deltas(hermes_tokenizer, ids, [1] * len(ids), stops)
    assert "\ufffd" not in "".join(one)
    if not stops:
        assert "".join(one) == REPLY.replace("<|im_end|>", "") and one_text.tokens == len(ids)
    else:
        first = min(REPLY.find(s) for s in stops)
        assert "".join(one) == REPLY[:first] and one_text.stopped
    for k, sizes in enumerate(batchings(len(ids), seed=len(stops))):
        got, text = deltas(hermes_tokenizer, ids, sizes, stops)
        assert "".join(got) == "".join(one), sizes
        assert (text.tokens, text.stopped, text.text) == (one_text.tokens, one_text.stopped, one_text.text), sizes
        # No delta shows part of a stop string or half a character.
        assert all(s not in d for s in stops for d in got) and all("\ufffd" not in d for d in got)


def test_tokens_after_the_stop_string_in_the_same_delta_are_not_counted(hermes_tokenizer):
    ids = reply_ids(hermes_tokenizer)
    _, text = deltas(hermes_tokenizer, ids, [len(ids)], stops=("menu",))
    upto = next(n for n in range(1, len(ids) + 1) if "menu" in hermes_tokenizer.decode(ids[:n]))
    assert text.stopped and text.tokens == upto < len(ids)


def test_an_id_the_tokenizer_lacks_is_an_error_not_a_silent_gap(hermes_tokenizer):
    text = ReplyText(hermes_tokenizer, END_ID, [], len(hermes_tokenizer))
    with pytest.raises(UnknownToken, match="token id 32010"):
        text.push([415, 32010])
