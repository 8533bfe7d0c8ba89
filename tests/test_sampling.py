"""The CPU engine's sampler against direct numpy computations of each rule."""

from __future__ import annotations

import numpy as np
import pytest

from build_engine.cpu.sampling import Sampler, Sampling

V, END = 50, 49


def logits(seed=0):
    return np.random.default_rng(seed).normal(size=V).astype(np.float32)


def test_greedy_is_the_argmax():
    x = logits()
    assert Sampler(Sampling(), [1, 2], V, END).next_token(x) == int(np.argmax(x))


def test_temperature_then_penalties_as_tensorrt_llms_kernel():
    """batchApplyPenalty (TensorRT-LLM penaltyKernels.cu): logits scaled by 1/temperature first; then for each
    token occurring in the prompt or the output, repetition by sign, presence once, frequency per occurrence."""
    x = logits(1)
    prompt, out = [3, 4, 4], [5, 5, 6, 3]
    s = Sampler(Sampling(temperature=0.5, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
                prompt, V, END)
    for t in out:
        s.record(t)
    want = x / 0.5
    counts = np.bincount(prompt + out, minlength=V)
    seen = counts > 0
    want[seen] = np.where(want[seen] > 0, want[seen] / 1.3, want[seen] * 1.3)
    want -= 0.5 * seen + 0.25 * counts
    np.testing.assert_allclose(s._adjust(x), want, rtol=1e-6)
    assert want[4] == pytest.approx(x[4] / 0.5 / 1.3 ** np.sign(x[4]) - 0.5 - 0.25 * 2)  # twice in the prompt


def test_min_tokens_bans_every_end_id_until_reached():
    x = np.zeros(V, dtype=np.float32)
    x[END], x[7] = 10, 9
    s = Sampler(Sampling(min_tokens=2, stop_token_ids=(7,)), [1], V, END)
    x[8] = 1
    assert [s.next_token(x), s.next_token(x), s.next_token(x)] == [8, 8, END]


def test_bad_words_ban_the_token_that_would_complete_them():
    x = np.zeros(V, dtype=np.float32)
    x[10], x[11] = 5, 4
    s = Sampler(Sampling(bad_words=((2, 10),)), [1, 2], V, END)
    assert s.next_token(x) == 11  # history ends with 2: 10 would complete [2, 10]
    assert s.next_token(x) == 10  # history now ends with 11


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.7)])
def test_draws_stay_inside_top_k_and_the_nucleus(top_k, top_p):
    x = logits(2)
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-p)
    allowed = set(order[: top_k or V].tolist())
    nucleus = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    allowed &= set(nucleus.tolist()) if top_p < 1 else allowed
    s = Sampler(Sampling(temperature=1.0, top_k=top_k, top_p=top_p, seed=3, max_tokens=400), [1], V, END)
    drawn = {s.next_token(x) for _ in range(300)}
    assert drawn <= allowed and len(drawn) > 1


def test_a_seed_reproduces_and_frequencies_follow_the_distribution():
    x = logits(4)
    mk = lambda seed: Sampler(Sampling(temperature=0.7, seed=seed, max_tokens=5000), [1], V, END)
    a, b = mk(9), mk(9)
    draws = [a.next_token(x) for _ in range(4000)]
    assert draws[:50] == [b.next_token(x) for _ in range(50)]
    p = np.exp(x / 0.7 - (x / 0.7).max())
    p /= p.sum()
    freq = np.bincount(draws, minlength=V) / len(draws)
    assert np.abs(freq - p).max() < 0.03


@pytest.mark.parametrize("scale", [0.3, 1.0, 8.0], ids=["flat", "normal", "peaked"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_the_nucleus_without_a_full_sort_is_the_full_sorts_nucleus(scale, top_p):
    """On a vocabulary large enough for the partial sorts: the same tokens as sorting everything."""
    from build_engine.cpu.sampling import _nucleus

    z = (np.random.default_rng(11).normal(size=32064) * scale).astype(np.float32)
    p = np.exp(z - z.max())
    order = np.argsort(-p.astype(np.float64), kind="stable")
    mass = np.cumsum(p[order].astype(np.float64)) / p.sum(dtype=np.float64)
    want = order[: int(np.searchsorted(mass, top_p)) + 1]
    got = _nucleus(z, p, top_p)
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert np.all(np.diff(p[got]) <= 0)  # most likely first


@pytest.mark.parametrize("size", [7, 256, 32064, 49152])
def test_the_blockwise_draw_is_the_inverse_cdf_and_never_picks_a_banned_token(size):
    """pick() against one float64 running sum over all weights; zero weights (banned ids, the padded
    vocabulary's tail) stay out even for a u that rounds to the total."""
    from build_engine.cpu.sampling import pick

    rng = np.random.default_rng(size)
    w = np.exp(rng.normal(size=size) * 2).astype(np.float32)
    w[rng.random(size) < 0.3] = 0  # banned
    w[-min(62, size - 1):] = 0  # the padded tail: whole blocks of zeros at the larger sizes
    cum = np.cumsum(w.astype(np.float64))
    us = np.concatenate([rng.random(3000), [0.0, np.nextafter(1.0, 0.0)]])
    got = [pick(w, u) for u in us]
    assert got[:-1] == [int(np.searchsorted(cum, u * cum[-1], side="right")) for u in us[:-1]]
    assert all(w[i] > 0 for i in got) and got[-1] == int(np.flatnonzero(w)[-1])
