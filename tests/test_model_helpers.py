"""The python models' shared helpers (model_repo.triton_models.common), offline: the BLS's stop-sequence cut,
TensorRT-LLM's words lists, the CPU server's cancel channel."""

import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from model_repo.triton_models.common import (CancelListener, CancelSender, InnerRequestIds, StopText, engine_sampling,
                                             from_words_list, tensorrt_llm_search, to_words_list)

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


def test_words_lists_have_tensorrt_llms_layout_and_round_trip(hermes_tokenizer):
    """TensorRT-LLM's [2, L] words list: row 0 every word's ids one after another, row 1 the offsets where
    each word ends, padded with -1 (TensorRT-LLM triton_backend/all_models/inflight_batcher_llm/preprocessing/
    1/model.py, _to_word_list_format; it pads row 0 with 0, which the backend never reads)."""
    words = ["<|im_end|>", "Paris", " the end"]
    ids = [hermes_tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    arr = to_words_list(hermes_tokenizer, words)
    flat = [i for w in ids for i in w]
    assert arr.dtype == np.int32 and arr.shape == (2, len(flat))
    assert arr[0].tolist() == flat
    ends = np.cumsum([len(w) for w in ids]).tolist()
    assert arr[1].tolist() == ends + [-1] * (len(flat) - len(ends))
    assert from_words_list(arr) == ids
    assert from_words_list(to_words_list(hermes_tokenizer, [])) == []


def test_the_cancel_channel_reaches_the_listener_and_says_when_nobody_listens():
    got, seen = [], threading.Event()
    listener = CancelListener("test-model", lambda rid: (got.append(rid), seen.set()))
    try:
        with pytest.raises(RuntimeError, match="one instance"):  # one listener per server and model
            CancelListener("test-model", lambda rid: None)
        assert CancelSender("test-model").send("req-1#7~failure-marker")
        assert seen.wait(5) and got == ["req-1#7~failure-marker"]
    finally:
        listener.close()
    assert not CancelSender("test-model").send("req-2")  # then the BLS falls back to a stop request
    assert not CancelSender("other-model").send("req-3")


def test_the_cancel_channel_takes_datagrams_only_from_stubs_of_the_same_server():
    """The socket is abstract (no file permissions): a process with another parent is ignored."""
    import subprocess
    import sys

    got = []
    listener = CancelListener("test-model-2", got.append)
    try:
        code = ("from model_repo.triton_models.common import CancelSender, cancel_address\n"
                "import os, socket\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                f"s.sendto(b'victim#1', b'\\0hermes-trtllm-cancel-{os.getppid()}-test-model-2')\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # its parent: this process
        deadline = time.monotonic() + 5
        while listener.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.refused == 1 and got == []
        assert CancelSender("test-model-2").send("mine#1")
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == ["mine#1"]
    finally:
        listener.close()


def test_greedy_reaches_the_engine_as_top_k_1_without_a_temperature():
    """TensorRT-LLM scales logits by 1 / (temperature + 1e-6): temperature 0 must not reach it."""
    for given in ({"temperature": 0.0, "top_p": 0.9, "seed": 7}, {"seed": 7},
                  {"temperature": 0.8, "top_k": 1, "seed": 7}):
        greedy = engine_sampling(given)
        assert set(greedy) == {"runtime_top_k", "seed"}, given
        assert greedy["runtime_top_k"].tolist() == [[1]] and greedy["runtime_top_k"].dtype == np.int32
        assert greedy["seed"].dtype == np.uint64
        assert tensorrt_llm_search(1.0, 1, None) == {"temperature": 1.0, "top_k": 1, "top_p": 1.0}


def test_sampling_carries_temperature_top_k_and_top_p_so_the_engine_cannot_read_it_as_greedy():
    """A temperature alone would be greedy under TensorRT-LLM's defaults (top-k 0, top-p 0)."""
    sampled = {k: v.item() for k, v in engine_sampling({"temperature": 0.7}).items()}
    seed = sampled.pop("seed")  # a fresh one: TensorRT-LLM would seed every request with 0
    assert sampled == {"temperature": np.float32(0.7), "runtime_top_k": 0, "runtime_top_p": 1.0}
    assert engine_sampling({"temperature": 0.7})["seed"].item() != seed
    assert engine_sampling({"temperature": 0.7, "seed": 5})["seed"].item() == 5
    assert tensorrt_llm_search(0.7, 0, None) == {"temperature": 0.0}  # what the engine makes of a temperature alone
    assert tensorrt_llm_search(0.7, 0, 1.0) == {"temperature": 0.7, "top_k": 0, "top_p": 1.0}
    assert tensorrt_llm_search(0.7, 40, None) == {"temperature": 0.7, "top_k": 40, "top_p": 1.0}  # plain top-k
    assert tensorrt_llm_search(0.7, 0, 0.0) == tensorrt_llm_search(0.7, 0, -1.0) == {"temperature": 0.0}  # <= 0: absent
    for refused in (-1.0, float("nan"), float("inf")):  # even where greedy would not use it
        with pytest.raises(ValueError, match="temperature"):
            tensorrt_llm_search(refused, 0, None)


def test_inner_request_ids_differ_between_bls_instances_for_one_caller_id():
    """Each BLS instance is a process; the backend's stop request is keyed by the inner id alone."""
    code = "from model_repo.triton_models.common import InnerRequestIds; print(InnerRequestIds().next('same'))"
    others = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
              for _ in range(2)}
    ids = InnerRequestIds()
    here = [ids.next("same"), ids.next("same"), ids.next(None)]
    assert len(others | set(here)) == 5
    assert all(i.startswith("same#") for i in [*others, *here[:2]]) and here[2].startswith("bls#")
