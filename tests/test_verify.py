"""`verify` on SmolLM2 at accuracy level 1: the engine reproduces the reference, and AWQ beats RTN."""

import json

from build_engine.__main__ import main as cli


def test_verify_report_on_smollm2(smol_ckpt, smol_engine_fp32, smol_model, tmp_path, capsys):
    from build_engine.cpu import graph

    fast = graph.build(smol_ckpt, tmp_path / "engine-int8-head", accuracy_level=1, lm_head="int8")
    fastest = graph.build(smol_ckpt, tmp_path / "engine-int4-head", accuracy_level=1, lm_head="int4")
    report = tmp_path / "verify.json"
    assert cli(["verify", "--checkpoint", str(smol_ckpt), "--engine", str(smol_engine_fp32),
                "--compare-engine", str(fast), "--compare-engine", str(fastest), "--report", str(report)]) == 0
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
    # The exact engine's own perplexity is the reference's (an independent implementation); the fast
    # lm_heads' cost shows beside it: int8 a larger logits error and a perplexity within 1 %, int4 larger
    # still (measured +9.0 % on SmolLM2; a mis-packed int4 head would give noise, a perplexity in the
    # thousands).
    exact, int8, int4 = (r["engines"][str(e)] for e in (smol_engine_fp32, fast, fastest))
    assert (exact["lm_head"], int8["lm_head"], int4["lm_head"]) == ("fp32", "int8", "int4")
    assert abs(exact["perplexity"] / p["awq"] - 1) < 1e-3
    assert exact["max_rel_logits_error"] < int8["max_rel_logits_error"] < int4["max_rel_logits_error"]
    assert abs(int8["perplexity"] / exact["perplexity"] - 1) < 0.01
    assert 1 < int4["perplexity"] / exact["perplexity"] < 1.15


def test_the_cli_offers_every_lm_head_the_graph_writer_builds():
    from build_engine.__main__ import parser
    from build_engine.cpu import graph

    build = parser()._subparsers._group_actions[0].choices["build"]
    [lm_head] = [a for a in build._actions if a.dest == "lm_head"]
    assert tuple(lm_head.choices) == graph.LM_HEADS


def test_verify_refuses_an_engine_from_another_checkpoint(tiny_ckpt, smol_engine_fp32, tmp_path, capsys):
    code = cli(["verify", "--checkpoint", str(tiny_ckpt), "--engine", str(smol_engine_fp32),
                "--report", str(tmp_path / "r.json")])
    assert code == 1 and "not built from checkpoint" in capsys.readouterr().err
