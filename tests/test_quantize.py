"""INT4-AWQ quantization and the W4A16_AWQ TensorRT-LLM checkpoint (DESIGN.md §4-5)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from build_engine import checkpoint, manifest, quantize
from build_engine.__main__ import main as cli

HF_NAMES = {  # TRT-LLM linear -> HF projections it fuses
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}


@pytest.mark.container_versions
def test_checkpoint_config_is_w4a16_awq(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["architecture"] == "MistralForCausalLM"
    assert cfg["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert cfg["quantization"]["group_size"] == 128
    assert cfg["quantization"]["has_zero_point"] is False and cfg["quantization"]["pre_quant_scale"] is True
    assert cfg["quantization"]["exclude_modules"] == ["lm_head"]
    assert cfg["vocab_size"] == 32064  # 32002 padded to a multiple of 64
    assert cfg["rotary_base"] == 10000.0
    assert cfg["mapping"]["tp_size"] == 1


@pytest.mark.container_versions
def test_validator_accepts_the_export_and_padded_rows_are_zero(tiny_ckpt):
    shapes = checkpoint.validate(tiny_ckpt, real_vocab=32002)
    ck = checkpoint.Checkpoint(tiny_ckpt)
    assert shapes.vocab_padded == 32064
    assert not ck.tensor("lm_head.weight")[32002:].any()
    assert not ck.tensor("transformer.vocab_embedding.weight")[32002:].any()


def test_validator_rejects_a_tampered_checkpoint(tiny_ckpt, tmp_path):
    import shutil

    from build_engine import UserError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"]["group_size"] = 64  # no longer matches the scale tensors
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="weights_scaling_factor"):
        checkpoint.validate(bad)


def test_int4_packing_roundtrip():
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(6, 10)).astype(np.int8)
    packed = checkpoint.pack_int4_rows(codes)
    assert packed.shape == (3, 10) and packed.dtype == np.int8
    # even output row in the low nibble
    assert ((packed.view(np.uint8) & 0xF) == (codes[0::2].astype(np.int16) & 0xF)).all()
    assert (checkpoint.unpack_int4_rows(packed) == codes).all()


@pytest.mark.container_versions
def test_codes_and_scales_follow_the_export_rule_from_original_weights(tiny_ckpt, tiny_model):
    """Recompute codes and scales from the original HF weights and the stored pre-quant factor p:
    Wf = W / p, scale = amax(Wf per group) / 7, q = clamp(round(Wf / scale), -8, 7)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ck = checkpoint.Checkpoint(tiny_ckpt)
    g = ck.shapes.group_size
    for layer in range(ck.shapes.layers):
        for name, hf_names in HF_NAMES.items():
            mods = [hf.model.layers[layer].get_submodule(n) for n in hf_names]
            w = torch.cat([m.weight for m in mods]).detach().numpy()
            ql = ck.linear(layer, name)
            wf = w / ql.prequant[None, :]
            scale = np.abs(wf.reshape(w.shape[0], -1, g)).max(-1) / 7
            np.testing.assert_allclose(ql.scale, scale, rtol=2e-3)
            codes = np.clip(np.round(wf.reshape(w.shape[0], -1, g) / ql.scale[:, :, None]), -8, 7).reshape(w.shape)
            assert (codes == ql.codes).mean() > 0.995, f"layer {layer} {name}"
            # The layer's output: (x * p) @ (q * scale)^T approximates x @ W^T within INT4 error.
            x = np.random.default_rng(layer).standard_normal((16, w.shape[1])).astype(np.float32)
            y, yq = x @ w.T, (x * ql.prequant) @ ql.dequantized().T
            assert np.linalg.norm(yq - y) / np.linalg.norm(y) < 0.2


def test_packed_weights_equal_modelopt_fake_quant(tiny_model):
    """Dequantize the exported codes independently and compare with ModelOpt's own fake-quantized
    weights of the same (non-fused) projections, after the same pre-quant scale."""
    settings, _ = quantize.default_settings("tiny-hermes")
    model, tok = quantize.load_model(tiny_model)
    quantize.quantize_model(model, tok, settings)
    fake = {}
    for layer, block in enumerate(model.model.layers):
        for trt, (hf,) in (("attention.dense", ("self_attn.o_proj",)), ("mlp.proj", ("mlp.down_proj",))):
            mod = block.get_submodule(hf)
            with torch.no_grad():
                w_fq = mod.weight_quantizer(mod.weight.float()).numpy()  # fake-quant of W / p
            fake[(layer, trt)] = (w_fq, mod.input_quantizer.pre_quant_scale.float().numpy())
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        quantize.export(copy.deepcopy(model), Path(d))
        ck = checkpoint.Checkpoint(Path(d))
        for (layer, trt), (w_fq, p) in fake.items():
            ql = ck.linear(layer, trt)
            np.testing.assert_allclose(ql.prequant, p, rtol=1e-3)  # fp16-rounded p
            deq = ql.dequantized()
            err = np.abs(deq - w_fq).max() / np.abs(w_fq).max()
            assert err < 2e-3, f"layer {layer} {trt}: {err}"


@pytest.mark.container_versions
def test_manifest_records_inputs_settings_versions_and_hashes(tiny_ckpt):
    m = manifest.read(tiny_ckpt, "trtllm-checkpoint")
    assert m["source"]["model"] == "tiny-hermes" and m["source"]["files"]["config.json"]["sha256"]
    assert m["preset"] == "tiny-hermes"
    assert m["quantization"] == {"algorithm": "awq_lite", "quant_algo": "W4A16_AWQ", "group_size": 128,
                                 "tool": "nvidia-modelopt", "tp_size": 1}
    assert m["calibration"]["calib_dataset"] == "pydoc"
    assert m["model"]["end_id"] == 32000 and m["model"]["sliding_window"] == 64
    import importlib.metadata

    assert m["versions"]["nvidia-modelopt"] == importlib.metadata.version("nvidia-modelopt")
    assert set(m["files"]) >= {"config.json", "rank0.safetensors", "tokenizer/tokenizer_config.json"}
    assert manifest.verify_files(tiny_ckpt) == []


@pytest.mark.container_versions
def test_smollm2_quantizes_with_group_64(smol_ckpt):
    cfg = json.loads((smol_ckpt / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM"
    assert cfg["quantization"]["group_size"] == 64 and cfg["vocab_size"] == 49152
    assert cfg["rotary_base"] == 100000.0
    assert manifest.read(smol_ckpt)["model"]["end_id"] == 2


# -- bad input: one line, exit code 1, nothing left that looks valid ---------------------------

def _run_cli(capsys, *argv):
    code = cli(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_model_folder_is_a_one_line_error(capsys, tmp_path):
    code, err = _run_cli(capsys, "quantize", "--model", str(tmp_path / "nope" / "x"), "--output", str(tmp_path / "o"))
    assert code == 1 and err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_folder_without_config_is_rejected(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, err = _run_cli(capsys, "quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o"))
    assert code == 1 and "no config.json" in err
    assert not (tmp_path / "o").exists()


def test_group_size_that_does_not_divide_a_layer_is_rejected(capsys, smol_model, tmp_path):
    code, err = _run_cli(capsys, "quantize", "--model", str(smol_model), "--output", str(tmp_path / "o"),
                         "--group-size", "128")
    assert code == 1 and "group size 128 must divide in_features 576" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def test_unsupported_group_size_is_rejected(capsys, tmp_path):
    code, err = _run_cli(capsys, "quantize", "--model", "tiny-hermes", "--output", str(tmp_path / "o"),
                         "--group-size", "96")
    assert code == 1 and "group size 96 is not supported" in err


def test_unreadable_calibration_file_is_rejected(capsys, tiny_model, tmp_path):
    code, err = _run_cli(capsys, "quantize", "--model", str(tiny_model), "--output", str(tmp_path / "o"),
                         "--calib-text", str(tmp_path / "missing.txt"))
    assert code == 1 and "cannot read calibration text" in err
    assert not (tmp_path / "o").exists()


def test_unknown_preset_is_rejected(capsys, tmp_path):
    code, err = _run_cli(capsys, "quantize", "--model", "tiny-hermes", "--output", str(tmp_path / "o"),
                         "--preset", "nope")
    assert code == 1 and "unknown preset 'nope'; known presets: nous-hermes-2-mistral-7b-dpo" in err
    assert not (tmp_path / "o").exists()


def test_calibration_text_file_is_used(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from build_engine import calibration

    f = tmp_path / "calib.txt"
    f.write_text("first document " * 50 + "\n\n" + "second document " * 50)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    batches = calibration.token_batches(tok, calibration.load_text(text_file=f), size=2, seq_len=32)
    assert len(batches) == 2 and all(len(b) == 32 for b in batches)
    assert "document" in tok.decode(batches[0])


def test_hub_calibration_streams_only_the_documents_it_needs_from_modelopts_id(monkeypatch):
    """cnn_dailymail as TensorRT-LLM's recipe calibrates on it: modelopt's hub id, streamed, and only
    the documents needed read (never the whole split downloaded)."""
    import itertools

    import datasets

    from build_engine import calibration

    calls, served = [], itertools.count()

    def load_dataset(*a, **k):
        calls.append((a, k))
        return ({"article": f"story {next(served)}"} for _ in itertools.count())  # an endless stream

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    docs = calibration.load_text("cnn_dailymail", samples=3)
    assert calls == [(("abisee/cnn_dailymail", "3.0.0"), {"split": "train", "streaming": True})]
    assert docs == [f"story {i}" for i in range(3 * calibration.DOCS_PER_SAMPLE)]


def test_unreachable_calibration_dataset_fails_before_the_model_is_fetched(capsys, tmp_path, monkeypatch):
    import datasets

    from build_engine import sources

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'abisee/cnn_dailymail' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(sources, "resolve", lambda *a, **k: pytest.fail("the model was fetched first"))
    code, err = _run_cli(capsys, "quantize", "--model", "nous-hermes-2-mistral-7b-dpo", "--output", str(tmp_path / "c"))
    assert code == 1 and "abisee/cnn_dailymail" in err and "--calib-text" in err and "\n" not in err
    assert not (tmp_path / "c").exists()


def test_awq_config_sets_the_group_size_in_either_modelopt_form(monkeypatch):
    """modelopt 0.37 (TensorRT-LLM 1.2.1's container) keeps quant_cfg as a dict, 0.47 as a list."""
    import modelopt.torch.quantization as mtq

    weight = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}, "enable": True}
    forms = {
        "0.37": {"quant_cfg": {"*weight_quantizer": weight, "*input_quantizer": {"enable": False}},
                 "algorithm": {"method": "awq_lite", "alpha_step": 0.1}},
        "0.47": {"quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": weight},
                               {"quantizer_name": "*input_quantizer", "cfg": {"enable": False}}],
                 "algorithm": "awq_lite"},
    }
    for form in forms.values():
        monkeypatch.setattr(mtq, "INT4_AWQ_CFG", form)
        cfg = quantize.awq_config(64, "awq_full")
        blocks = [c for c in (cfg["quant_cfg"].values() if isinstance(cfg["quant_cfg"], dict)
                              else (e["cfg"] for e in cfg["quant_cfg"])) if "block_sizes" in c]
        assert [b["block_sizes"][-1] for b in blocks] == [64] and cfg["algorithm"] == {"method": "awq_full"}
        assert weight["block_sizes"][-1] == 128  # the library's own config is left alone
