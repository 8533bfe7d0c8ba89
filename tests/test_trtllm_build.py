"""The GPU engine command (trtllm-build) as data, and its clear failure without a GPU."""

import shlex

import pytest

from build_engine import presets, trtllm
from build_engine.__main__ import main as cli


def test_dry_run_prints_the_fused_attention_build(capsys, tiny_ckpt, tmp_path):
    assert cli(["build", "--checkpoint", str(tiny_ckpt), "--output", str(tmp_path / "eng"), "--target", "gpu",
                "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv[0] == "trtllm-build"
    flags = dict(zip(argv[1::2], argv[2::2]))
    limits = presets.load("tiny-hermes").engine
    assert flags == {
        "--checkpoint_dir": str(tiny_ckpt), "--output_dir": str(tmp_path / "eng"),
        "--gpt_attention_plugin": "auto", "--context_fmha": "enable", "--use_paged_context_fmha": "enable",
        "--kv_cache_type": "paged", "--remove_input_padding": "enable", "--gemm_plugin": "auto",
        "--max_batch_size": str(limits.max_batch_size), "--max_input_len": str(limits.max_input_len),
        "--max_seq_len": str(limits.max_seq_len), "--max_num_tokens": str(limits.max_num_tokens),
        "--workers": "1",
    }
    assert not (tmp_path / "eng").exists()


def test_hermes_preset_limits_reach_the_command(tmp_path):
    p = presets.load("nous-hermes-2-mistral-7b-dpo")
    cmd = trtllm.build_command(tmp_path / "c", tmp_path / "e", p.engine)
    assert cmd[cmd.index("--max_seq_len") + 1] == str(p.engine.max_seq_len)
    assert p.group_size == 128 and p.architecture["vocab_size"] == 32002
    # Deprecated in 1.2 (trtllm-build): paged KV is chosen with --kv_cache_type.
    assert "--paged_kv_cache" not in cmd and cmd[cmd.index("--kv_cache_type") + 1] == "paged"


def test_every_preset_names_a_container_that_ships_tensorrt_llm_1_2_1():
    from build_engine import container

    for name in presets.names():
        image = container.image(presets.load(name).triton_image)
        assert image.tensorrt_llm == "1.2.1" and image.tensorrt.startswith("10.14")
    # 26.02 ships TensorRT-LLM 1.1.0 (Triton's compatibility matrix): not an image this project may use.
    with pytest.raises(KeyError):
        container.image("nvcr.io/nvidia/tritonserver:26.02-trtllm-python-py3")


def test_build_without_gpu_fails_with_the_container_to_use(capsys, tiny_ckpt, tmp_path):
    code = cli(["build", "--checkpoint", str(tiny_ckpt), "--output", str(tmp_path / "eng"), "--target", "gpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert "trtllm-build" in err and presets.load("tiny-hermes").triton_image in err
    assert not list(tmp_path.glob(".eng.partial-*"))
    assert not (tmp_path / "eng").exists()
