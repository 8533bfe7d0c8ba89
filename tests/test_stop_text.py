"""The BLS's stop-sequence cut, offline: however the text is split into deltas, the deltas join to the
text up to the first stop sequence and never show a piece of one."""

import random

import pytest

from model_repo.triton_models.common import StopText

TEXT = "The capital of France is Paris. Paris is big.\nEnd of story."


@pytest.mark.parametrize("stops,want", [
    (["Paris"], "The capital of France is "),
    (["\n", "big"], "The capital of France is Paris. Paris is "),
    (["nowhere"], TEXT),
    (["story.", "End"], "The capital of France is Paris. Paris is big.\n"),
])
def test_deltas_join_to_the_text_before_the_first_stop(stops, want):
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(0, 12)))
        pieces = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)])]
        cut = StopText(stops)
        out = [cut.push(p) for p in pieces]
        out.append(cut.flush())
        assert "".join(out) == want  # every delta is a piece of `want`: nothing past the cut leaked
        assert cut.stopped == (want != TEXT)
