"""`verify` on SmolLM2 at accuracy level 1: the engine reproduces the reference, and AWQ beats RTN."""

import json

from build_engine.__main__ import main as cli


def test_verify_report_on_smollm2(smol_ckpt, smol_engine_fp32, smol_model, tmp_path, capsys):
    from build_engine.cpu import graph

    fast = graph.build(smol_ckpt, tmp_path / "engine-int8-head", accuracy_level=1, lm_head="int8")
    report = tmp_path / "verify.json"
    assert cli(["verify", "--checkpoint", str(smol_ckpt), "--engine", str(smol_engine_fp32),
                "--compare-engine", str(fast), "--report", str(report)]) == 0
    assert "perplexity AWQ" in capsys.readouterr().out
    r = json.loads(report.read_text())
    e = r["engine_vs_reference"]
    assert e["max_rel_logits_error"] <= 1e-4
    assert e["greedy_prompts_identical"] + e["greedy_prompts_near_tie"] == e["greedy_prompts_total"] > 0
    p = r["perplexity"]
    assert p["original"] < p["awq"] <= p["rtn"]
    assert p["awq_over_original"] == p["awq"] / p["original"]
    assert 0 < r["top1_agreement"]["rtn"] <= r["top1_agreement"]["awq"] < 1
    assert r["settings"]["accuracy_level"] == 1 and r["settings"]["group_size"] == 64
    # The exact engine's own perplexity is the reference's (an independent implementation); the
    # int8 lm_head's cost shows beside it: a larger logits error, a perplexity within 1 %.
    exact, int8 = r["engines"][str(smol_engine_fp32)], r["engines"][str(fast)]
    assert exact["lm_head"] == "fp32" and int8["lm_head"] == "int8"
    assert abs(exact["perplexity"] / p["awq"] - 1) < 1e-3
    assert int8["max_rel_logits_error"] > exact["max_rel_logits_error"]
    assert abs(int8["perplexity"] / exact["perplexity"] - 1) < 0.01


def test_verify_refuses_an_engine_from_another_checkpoint(tiny_ckpt, smol_engine_fp32, tmp_path, capsys):
    code = cli(["verify", "--checkpoint", str(tiny_ckpt), "--engine", str(smol_engine_fp32),
                "--report", str(tmp_path / "r.json")])
    assert code == 1 and "not built from checkpoint" in capsys.readouterr().err
