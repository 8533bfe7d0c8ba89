"""Session fixtures: the heavy artifacts (models, checkpoints, engines, a Triton server) are built
once per test session and shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Built-in models are materialized into a per-session cache, so tests never see a stale one."""
    d = tmp_path_factory.mktemp("hermes-cache")
    os.environ["HERMES_CACHE"] = str(d)
    os.environ.setdefault("HERMES_QUIET", "1")
    return d


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    from build_engine import sources

    return sources.resolve("tiny-hermes").path


@pytest.fixture(scope="session")
def smol_model(cache_dir) -> Path:
    from build_engine import sources

    return sources.resolve("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    from build_engine import quantize

    return quantize.run("tiny-hermes", tmp_path_factory.mktemp("tiny") / "checkpoint", progress_log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_ckpt_tp2(tiny_model, tmp_path_factory) -> Path:
    """tiny-hermes split over two tensor-parallel ranks by ModelOpt's export."""
    from build_engine import quantize

    return quantize.run("tiny-hermes", tmp_path_factory.mktemp("tiny-tp2") / "checkpoint", tp_size=2,
                        progress_log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt) -> Path:
    from build_engine.cpu import graph

    return graph.build(tiny_ckpt, tiny_ckpt.parent / "engine-cpu", accuracy_level=1)


@pytest.fixture(scope="session")
def smol_ckpt(smol_model, tmp_path_factory) -> Path:
    """SmolLM2 with the preset's calibration (8 x 128 tokens), as `make demo` builds it. (4 x 64
    tokens was tried: the model then no longer knows the capital of France.)"""
    from build_engine import quantize

    return quantize.run("smollm2-135m-instruct", tmp_path_factory.mktemp("smol") / "checkpoint",
                        progress_log=lambda *_: None)


@pytest.fixture(scope="session")
def smol_engine(smol_ckpt) -> Path:
    """The serving engine: accuracy level 4 (int8 activations), the default."""
    from build_engine.cpu import graph

    return graph.build(smol_ckpt, smol_ckpt.parent / "engine-cpu", accuracy_level=4)


@pytest.fixture(scope="session")
def smol_engine_fp32(smol_ckpt) -> Path:
    from build_engine.cpu import graph

    return graph.build(smol_ckpt, smol_ckpt.parent / "engine-cpu-fp32", accuracy_level=1)


@pytest.fixture(scope="session")
def smol_runtime(smol_engine_fp32):
    """The runner on the fp32-compute engine: batch-invariant, so concurrent greedy requests give
    exactly their solo results (at accuracy level 4, int8 activations take different kernel paths
    for one row and for a batch, and near-ties can flip)."""
    from build_engine.cpu import CpuEngine

    engine = CpuEngine(smol_engine_fp32)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hermes_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from build_engine import sources

    d = tmp_path_factory.mktemp("hermes-tok")
    sources.write_hermes_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def _serve(engine: Path, name: str):
    from model_repo.generate import generate
    from model_repo.server import TritonServer

    repo = generate(engine, engine.parent / f"repo-{name}")
    server = TritonServer(repo, log_verbose=0).start()
    return server


@pytest.fixture(scope="session")
def smol_server(smol_engine_fp32):
    """The real Triton server on the SmolLM2 CPU engine (fp32 compute: batch-invariant)."""
    server = _serve(smol_engine_fp32, "smol")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_engine):
    server = _serve(tiny_engine, "tiny")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def paced_synthetic_server(tiny_ckpt, tmp_path_factory):
    """A synthetic engine at 50 tokens/s per stream (a 400-token reply takes 8 s), served: for tests of
    what happens while a request runs (cancellation, disconnects), without compute."""
    from build_engine import synthetic
    from model_repo.generate import generate
    from model_repo.server import TritonServer

    d = tmp_path_factory.mktemp("paced")
    engine = synthetic.build(tiny_ckpt, d / "engine", schedule="rate", tokens_per_s=50)
    with TritonServer(generate(engine, d / "repo")) as server:
        yield server
