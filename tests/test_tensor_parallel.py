"""Tensor-parallel checkpoints (issue #12): ModelOpt's export shards tiny-hermes over two ranks, the
validator checks every rank, and the CPU engine built from the two shards gives the TP=1 engine's
logits. A TP size that breaks group alignment is refused before calibration, with the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from build_engine import UserError, checkpoint, quantize
from build_engine.verify import engine_logits


def test_the_export_writes_one_file_per_rank_with_the_mapping(tiny_ckpt_tp2):
    cfg = json.loads((tiny_ckpt_tp2 / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert sorted(p.name for p in tiny_ckpt_tp2.glob("rank*.safetensors")) == ["rank0.safetensors",
                                                                                "rank1.safetensors"]
    checkpoint.validate(tiny_ckpt_tp2)
    manifest = json.loads((tiny_ckpt_tp2 / "manifest.json").read_text())
    assert manifest["quantization"]["tp_size"] == 2


def test_reassembled_shards_are_the_tp1_checkpoint(tiny_ckpt, tiny_ckpt_tp2):
    """The same calibration split two ways: the int4 codes, the group scales and the pre-quant
    factors put back together from the ranks equal the single-rank checkpoint's exactly."""
    one, two = checkpoint.Checkpoint(tiny_ckpt), checkpoint.Checkpoint(tiny_ckpt_tp2)
    assert (one.tp, two.tp) == (1, 2)
    for name in ("transformer.vocab_embedding.weight", "lm_head.weight", "transformer.ln_f.weight"):
        np.testing.assert_array_equal(two.tensor(name), one.tensor(name), err_msg=name)
    for layer in range(one.shapes.layers):
        for name in checkpoint.LINEARS:
            a, b = one.linear(layer, name), two.linear(layer, name)
            for field in ("codes", "scale", "prequant"):
                np.testing.assert_array_equal(getattr(b, field), getattr(a, field), err_msg=f"{layer} {name} {field}")
        for name in checkpoint.NORMS:
            np.testing.assert_array_equal(two.norm(layer, name), one.norm(layer, name))


def test_the_tp2_checkpoints_cpu_engine_gives_the_tp1_logits(tiny_engine, tiny_ckpt_tp2):
    from build_engine.cpu import graph

    engine = graph.build(tiny_ckpt_tp2, tiny_ckpt_tp2.parent / "engine-cpu", accuracy_level=1)
    ids = list(range(100, 140))
    want, got = engine_logits(tiny_engine, ids), engine_logits(engine, ids)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel  # fp32 compute on identical weights


def test_a_rank_shard_with_the_wrong_shape_is_named(tiny_ckpt_tp2, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_tp2, bad)
    tensors = load_file(bad / "rank1.safetensors")
    name = "transformer.layers.0.attention.dense.weights_scaling_factor"
    tensors[name] = np.concatenate([tensors[name]] * 2, axis=1)  # as if the groups were not split
    save_file(tensors, bad / "rank1.safetensors")
    with pytest.raises(UserError, match=rf"rank1: {name}: F32\[256, 2\], expected F32\[256, 1\]"):
        checkpoint.validate(bad)
    (bad / "rank1.safetensors").unlink()
    with pytest.raises(UserError, match=r"tp_size 2 needs rank0..rank1.safetensors"):
        checkpoint.validate(bad)


def test_a_tp_size_that_breaks_group_alignment_is_refused_before_calibration(tiny_model, tmp_path):
    # tiny-hermes: hidden 256, group 128 -> 256 / 4 = 64 input features per rank, half a group.
    with pytest.raises(UserError, match=r"in_features 256 / tp 4 = 64 is not a multiple of the group size 128"
                                        r" \(quantize with --group-size 64, or use a smaller tp\)"):
        quantize.run("tiny-hermes", tmp_path / "out", tp_size=4, progress_log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="KV heads do not split over 8 ranks"):
        quantize.run("tiny-hermes", tmp_path / "out", tp_size=8, group_size=64, progress_log=lambda *_: None)


def test_7b_shapes_split_up_to_eight_gpus():
    """Nous-Hermes-2-Mistral-7B (hidden 4096, 32 heads, 8 KV heads, intermediate 14336), group 128."""
    s = checkpoint.Shapes(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                          vocab_padded=32064, group_size=128)
    assert all(s.tp_problems(tp) == [] for tp in checkpoint.TP_SIZES)
    assert s.linear_shapes(2)["attention.qkv"] == ((32 + 16) * 128 // 2, 4096)
    assert s.linear_shapes(8)["mlp.proj"] == (4096, 14336 // 8)
    assert s.tp_problems(3) == [f"tensor parallelism 3 is not one of {checkpoint.TP_SIZES}"]


def test_the_validator_refuses_a_mapping_that_breaks_group_alignment(tiny_ckpt_tp2, tmp_path):
    """A checkpoint that claims four ranks for tiny-hermes (hidden 256, group 128): half a group per
    rank in every linear's input, named before any tensor is read."""
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_tp2, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mapping"] = {"world_size": 4, "tp_size": 4, "pp_size": 1}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"attention.qkv: in_features 256 / tp 4 = 64 is not a multiple of the group "
                                        r"size 128 \(quantize with --group-size 64, or use a smaller tp\)"):
        checkpoint.validate(bad)
    cfg["mapping"] = {"world_size": 2, "tp_size": 2, "pp_size": 2}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="is not world_size = tp_size with pp_size 1"):
        checkpoint.validate(bad)
