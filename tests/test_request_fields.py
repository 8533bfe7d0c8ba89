"""The public request is declared once (common.request): every field walks through the client's request,
the ensemble's and the BLS's configs, the ensemble's hand-over to tensorrt_llm, the BLS's inner request,
the backend contract the CPU stand-in reads and the OpenAI mapping, with one name, dtype and default."""

from __future__ import annotations

import dataclasses

import pytest

from common import request
from model_repo import backend_contract


@pytest.fixture(scope="module")
def configs(tiny_engine, tmp_path_factory):
    from model_repo.config import parse
    from model_repo.generate import generate

    repo = generate(tiny_engine, tmp_path_factory.mktemp("fields") / "repo")
    return {m: parse((repo / m / "config.pbtxt").read_text()) for m in ("ensemble", "tensorrt_llm_bls")}


def non_default(f: request.RequestField):
    return {"FP32": 0.5, "INT32": 3, "UINT64": 7, "BOOL": True, "BYTES": ["x"] if f.many else "x"}[f.wire]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_the_text_models_declare_every_field_with_its_type(configs, model):
    from tritonclient.grpc import model_config_pb2 as pb

    declared = {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional) for t in configs[model].input}
    want = {f.name: (f.config_dtype, [-1] if f.many else [1], True) for f in request.OPTIONAL}
    assert {n: declared[n] for n in want} == want
    assert set(declared) == {f.name for f in request.FIELDS}


def test_the_ensemble_hands_each_engine_field_to_the_backend_input_of_the_same_type(configs):
    step = next(s for s in configs["ensemble"].ensemble_scheduling.step if s.model_name == "tensorrt_llm")
    backend = {t.name: t.dtype for t in backend_contract.INPUTS}
    for f in request.OPTIONAL:
        if f.engine:
            assert step.input_map[f.engine] == f.name
            assert backend[f.engine] == f.config_dtype, f.name


def test_the_client_sends_every_sampling_field_with_its_wire_type_and_default():
    from client import SamplingParams
    from client.client import request_fields

    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    for f in (request.MAX_TOKENS, *request.SAMPLING):
        assert SamplingParams.__dataclass_fields__[f.name].default == f.default, f.name
    assert defaults["stop"] == request.STOP.default
    plain = request_fields("hi", SamplingParams())
    assert {n for n in plain} == {f.name for f in (request.PROMPT, request.MAX_TOKENS, request.STREAM,
                                                  *request.SAMPLING) if f.always}
    every = SamplingParams(max_tokens=8, stop=("x",), temperature=0.5, top_p=0.5, top_k=3, repetition_penalty=0.5,
                           presence_penalty=0.5, frequency_penalty=0.5, min_tokens=3, seed=7)
    sent = request_fields("hi", every)
    for f in (*request.SAMPLING, request.STOP):
        assert sent[f.name][0] == f.wire, f.name


def test_the_bls_inner_request_carries_every_sampling_field_to_its_engine_input():
    import numpy as np

    from model_repo.triton_models.common import NUMPY, engine_sampling

    given = {f.name: non_default(f) for f in request.SAMPLING}
    tensors = engine_sampling(given)
    assert set(tensors) == {f.engine for f in request.SAMPLING}
    for f in request.SAMPLING:
        assert tensors[f.engine].dtype == np.dtype(NUMPY[f.wire]) and tensors[f.engine].shape == (1, 1)
        assert tensors[f.engine].item() == pytest.approx(given[f.name])


def test_every_openai_parameter_reaches_its_field():
    from model_repo.openai_api import ChatRequest

    mapped = [f for f in (*request.SAMPLING,) if f.openai]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            **{f.openai: non_default(f) for f in mapped}, "max_tokens": 9, "stop": ["x"]}
    params = ChatRequest(**body).sampling(body["max_tokens"], 256)
    for f in mapped:
        assert getattr(params, f.name) == pytest.approx(body[f.openai]), f.name
    assert params.max_tokens == 9 and params.stop == ("x",)
    assert ChatRequest(model="m", messages=body["messages"]).sampling(None, 256) == \
        type(params)(max_tokens=256)  # absent parameters keep the declared defaults
