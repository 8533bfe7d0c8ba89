"""Benchmark metrics with a scripted clock and a fake transport; the roofline from shapes."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks import roofline
from benchmarks.metrics import RequestOutput, calculate_metrics
from benchmarks.runner import Workload, one_request
from client import Chunk


class FakeClient:
    """Streams scripted chunks; the scripted clock advances by fixed gaps between them."""

    def __init__(self, chunks, fail=False):
        self.chunks, self.fail = chunks, fail

    async def stream(self, messages, **params):
        self.params = params
        for c in self.chunks:
            yield c
        if self.fail:
            raise RuntimeError("connection reset")


def scripted_clock(times):
    it = iter(times)
    return lambda: next(it)


def test_request_timing_invariants_with_a_scripted_clock():
    chunks = [Chunk("a"), Chunk(" b"), Chunk(" c"), Chunk("", "length", 7, 3)]
    clock = scripted_clock([10.0, 10.5, 10.6, 10.8, 10.8])  # send, then one reading per chunk
    client = FakeClient(chunks)
    out = asyncio.run(one_request(client, "p", Workload(output_len=3, temperature=0.8).sampling(), clock))
    assert client.params == {"max_tokens": 3, "min_tokens": 3, "temperature": 0.8}
    assert out.success and out.ttft_s == pytest.approx(0.5)
    assert out.itl_s == pytest.approx([0.1, 0.2])
    assert out.latency_s - out.ttft_s == pytest.approx(sum(out.itl_s))  # latency - TTFT = sum(ITL)
    assert out.output_tokens == 3 and out.prompt_tokens == 7
    assert out.tpot_s == pytest.approx((0.8 - 0.5) / 2)


def test_every_transport_records_a_request_alike():
    """One recorder: the async path, the blocking path and the engine-only adapter agree on timing and
    token counts for the same chunks (a server's count wins over counting chunks)."""
    from benchmarks.runner import record, record_sync

    for chunks, want_tokens in (([Chunk("a"), Chunk(" b"), Chunk("", "stop", 4, 2)], 2),  # counted by the server
                                ([Chunk("a"), Chunk(""), Chunk(" b"), Chunk(" c")], 3)):  # counted as text chunks
        times = [0.0, 0.2, 0.3, 0.5, 0.5]

        async def agen():
            for c in chunks:
                yield c

        a = asyncio.run(record(agen(), scripted_clock(times)))
        b = record_sync(iter(chunks), scripted_clock(times))
        assert a == b and a.output_tokens == want_tokens and a.success


def test_a_failed_request_is_counted_not_raised():
    out = asyncio.run(one_request(FakeClient([Chunk("a")], fail=True), "p", Workload(output_len=3).sampling(),
                                  scripted_clock([0.0, 0.1])))
    assert not out.success and "connection reset" in out.error
    m = calculate_metrics([out, RequestOutput(True, 0.1, [0.05], 0.2, 5, 3)], duration_s=2.0)
    assert m["completed"] == 1 and m["failed"] == 1


def test_metrics_percentiles_throughput_and_goodput():
    outs = [RequestOutput(True, ttft_s=0.1 * (i + 1), itl_s=[0.01] * 9, latency_s=0.1 * (i + 1) + 0.09,
                          prompt_tokens=10, output_tokens=10) for i in range(10)]
    m = calculate_metrics(outs, duration_s=5.0, slo_ms={"ttft": 500, "tpot": 20})
    assert m["total_output_tokens"] == 100 and m["output_throughput"] == 20.0 and m["request_throughput"] == 2.0
    assert m["median_ttft_ms"] == pytest.approx(550) and m["p99_ttft_ms"] == pytest.approx(991)
    assert m["mean_tpot_ms"] == pytest.approx(10) and m["median_itl_ms"] == pytest.approx(10)
    assert m["goodput"] == pytest.approx(5 / 5.0)  # TTFT <= 500 ms: the first five


def test_empty_series_are_missing_not_zero():
    m = calculate_metrics([RequestOutput(False, error="x")], duration_s=1.0)
    assert m["median_ttft_ms"] is None and m["p99_itl_ms"] is None and m["mean_tpot_ms"] is None
    assert m["completed"] == 0 and m["output_throughput"] == 0.0


def test_roofline_for_the_hermes_preset_from_its_shapes():
    r = roofline.roofline(roofline.preset_bytes("nous-hermes-2-mistral-7b-dpo"), "h100")
    assert r["gb_per_step"] == pytest.approx(3.86, abs=0.01)
    assert r["max_tokens_per_s"] == pytest.approx(868, abs=2)
    assert roofline.roofline(roofline.preset_bytes("nous-hermes-2-mistral-7b-dpo"), "h200")["max_tokens_per_s"] == \
        pytest.approx(1243, abs=3)


def test_roofline_from_a_checkpoint_reads_its_tensors(tiny_ckpt):
    from build_engine import presets

    p = presets.load("tiny-hermes")
    from_tensors = roofline.bytes_from_checkpoint(tiny_ckpt)
    from_shapes = roofline.bytes_from_shapes({**p.architecture, "vocab_size": 32064}, p.group_size)
    assert from_tensors == from_shapes


def test_sweep_against_the_real_server_writes_json_csv_and_plot(smol_server, tmp_path):
    from benchmarks.__main__ import main

    assert main(["serve", "--url", smol_server.grpc_url, "--concurrency", "1,2", "--num-prompts", "4",
                 "--output-len", "8", "--out", str(tmp_path)]) == 0
    import json

    r = json.loads((tmp_path / "serve_c2.json").read_text())
    assert r["metrics"]["completed"] == 4 and r["metrics"]["failed"] == 0
    assert all(q["output_tokens"] == 8 for q in r["requests"])  # fixed output length via min_tokens
    assert (tmp_path / "serve_summary.csv").read_text().count("\n") == 3
    assert (tmp_path / "serve_latency_vs_concurrency.png").stat().st_size > 1000
    assert (tmp_path / "serve_distributions.png").stat().st_size > 1000


def test_engine_only_run_uses_the_same_metrics(smol_engine_fp32):
    from benchmarks import engine
    from benchmarks.runner import Workload

    (r,) = engine.run_sweep(smol_engine_fp32, Workload(num_prompts=2, output_len=6), [2])
    assert r["target"] == {"engine": str(smol_engine_fp32)} and r["concurrency"] == 2
    assert r["metrics"]["completed"] == 2 and r["metrics"]["total_output_tokens"] == 12
    assert r["metrics"]["median_itl_ms"] is not None


def test_compare_prints_ratios_and_missing_values():
    from benchmarks.report import compare

    text = compare({"metrics": {"median_ttft_ms": 10.0, "p99_itl_ms": None}},
                   {"metrics": {"median_ttft_ms": 15.0, "p99_itl_ms": 2.0}})
    assert "1.500x" in text and "missing" in text


def test_sharegpt_prompts_take_the_first_human_turn(tmp_path):
    import json

    from benchmarks.runner import sharegpt_prompts

    f = tmp_path / "sg.json"
    f.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A"}]},
                             {"conversations": [{"from": "gpt", "value": "x"}]}]))
    assert sharegpt_prompts(str(f), 3, 0) == ["Q1", "Q1", "Q1"]


def test_http_and_ensemble_runs_complete(smol_server, tmp_path):
    import asyncio

    from benchmarks.runner import Target, Workload, run

    for target, workload, c in ((Target(smol_server.http_url, protocol="http"), Workload(2, output_len=6), 2),
                                (Target(smol_server.grpc_url, model="ensemble"),
                                 Workload(2, output_len=6, request_rate=50.0), 1)):
        outputs, duration = asyncio.run(run(target, workload, c))
        assert all(o.success for o in outputs), [o.error for o in outputs]
        assert all(o.output_tokens >= 1 and len(o.itl_s) >= 1 for o in outputs)


def test_exact_length_prompts_have_exactly_that_many_tokens(hermes_tokenizer):
    from benchmarks.runner import exact_length_prompts
    from client import Message, format_chatml

    for p in exact_length_prompts(hermes_tokenizer, 5, 40, seed=0):
        assert len(hermes_tokenizer(format_chatml([Message("user", p)]))["input_ids"]) == 40


def test_roofline_per_gpu_under_tensor_parallelism(tiny_ckpt, tiny_ckpt_tp2):
    from build_engine import presets

    assert roofline.bytes_from_checkpoint(tiny_ckpt_tp2) == roofline.bytes_from_checkpoint(tiny_ckpt)
    arch = presets.load("nous-hermes-2-mistral-7b-dpo").architecture
    b = roofline.preset_bytes("nous-hermes-2-mistral-7b-dpo")
    one, two = roofline.roofline(b, "h100", arch=arch), roofline.roofline(b, "h100", tp=2, arch=arch)
    assert two["gb_per_step_per_gpu"] == pytest.approx(one["gb_per_step"] / 2)
    assert two["max_tokens_per_s"] == pytest.approx(2 * one["max_tokens_per_s"])
    assert "allreduces_per_step" not in one
    # 32 layers x 2 all-reduces of 4096 fp16 activations, a ring sending 2 (tp-1)/tp of each, plus
    # half of the fp16 logits gathered.
    assert two["allreduces_per_step"] == 64
    assert two["allreduce_bytes_per_token_per_gpu"] == 64 * 4096 * 2 + arch["vocab_size"]


def test_overhead_pairs_runs_by_concurrency_and_flags_a_negative_difference():
    from benchmarks.report import format_overhead, overhead

    def run(c, itl, ttft):
        return {"concurrency": c, "metrics": {"median_itl_ms": itl, "median_ttft_ms": ttft, "median_e2el_ms": None}}

    ov = overhead([run(1, 10.0, 50.0), run(4, 9.0, 80.0)], [run(1, 9.5, 45.0), run(4, 9.2, 70.0)])
    assert ov[1]["negative"] == [] and ov[4]["negative"] == ["median_itl_ms"]
    text = format_overhead(ov, rounds=2)
    assert "c=4" in text and "negative median_itl_ms" in text and "missing" in text
    with pytest.raises(ValueError, match="c=1 paired with engine c=4"):
        overhead([run(1, 1.0, 1.0)], [run(4, 1.0, 1.0)])


# The serving path's CPU per streamed token (benchmarks.procstat, benchmarks.ceiling).

STUB = "/cache/triton-backends-py3.11/python/triton_python_backend_stub"


def stub_cmdline(model: str, instance: int = 0) -> list[str]:
    """A python-backend stub's command line as Triton 2.51 starts it."""
    return [STUB, f"/repo/{model}/1/model.py", "triton_python_backend_shm_region_0ea6", "1048576", "1048576",
            "3902", "/cache/triton-backends-py3.11/python", "336", f"{model}_0_{instance}", "DEFAULT"]


def test_cpu_per_token_is_each_process_cpu_over_the_window_per_streamed_token():
    from benchmarks.procstat import cpu_per_token, total_us_per_token

    before, after = {"tritonserver": 10.0, "tensorrt_llm_bls": 5.0}, {"tritonserver": 10.5, "tensorrt_llm_bls": 5.25}
    per = cpu_per_token(before, after, tokens=1000)
    assert per["tritonserver"] == pytest.approx({"cpu_s": 0.5, "us_per_token": 500.0})
    assert per["tensorrt_llm_bls"] == pytest.approx({"cpu_s": 0.25, "us_per_token": 250.0})
    assert total_us_per_token(per) == pytest.approx(750.0)


def test_cpu_per_token_without_tokens_or_a_vanished_process_is_missing_not_zero():
    from benchmarks.procstat import cpu_per_token, total_us_per_token

    none_streamed = cpu_per_token({"tritonserver": 1.0}, {"tritonserver": 1.2}, tokens=0)
    assert none_streamed["tritonserver"]["us_per_token"] is None
    assert none_streamed["tritonserver"]["cpu_s"] == pytest.approx(0.2)  # the CPU was used all the same
    gone = cpu_per_token({"tritonserver": 1.0, "postprocessing": 2.0}, {"tritonserver": 1.1}, tokens=100)
    assert gone["postprocessing"] == {"cpu_s": None, "us_per_token": None}
    assert total_us_per_token(gone) is None and total_us_per_token({}) is None


def test_stubs_are_named_by_model_with_an_instance_suffix_when_a_model_has_several():
    from benchmarks.procstat import base_name, child_names, stub_model

    assert stub_model(stub_cmdline("tensorrt_llm_bls")) == "tensorrt_llm_bls"
    assert stub_model(["/usr/bin/python3", "/repo/x/1/model.py"]) is None
    names = child_names([(30, "triton_python_backend_stub", stub_cmdline("tensorrt_llm_bls", 1)),
                         (20, "triton_python_backend_stub", stub_cmdline("tensorrt_llm_bls", 0)),
                         (10, "triton_python_backend_stub", stub_cmdline("postprocessing")),
                         (40, "sh", ["/bin/sh", "-c", "true"])])
    assert names == {10: "postprocessing", 20: "tensorrt_llm_bls#1", 30: "tensorrt_llm_bls#2", 40: "other:sh"}
    assert base_name("tensorrt_llm_bls#2") == "tensorrt_llm_bls"


def test_no_server_processes_are_found_for_a_remote_host_or_a_closed_port():
    from benchmarks.procstat import ServerProcesses
    from model_repo.server import free_port

    found, why = ServerProcesses.find("192.0.2.1:8001")  # TEST-NET-1: never this machine
    assert found is None and "192.0.2.1 is not this machine" in why
    port = free_port()
    found, why = ServerProcesses.find(f"127.0.0.1:{port}", f"http://localhost:{port}/v1")
    assert found is None and why.count(f"nothing listens on port {port}") == 2
    assert ServerProcesses.find(None) == (None, "no server address or pid given")


def canned_run(path: str, concurrency: int, server_cpu_s: dict | None, tokens_per_stream: int = 4,
               failed: int = 0) -> dict:
    """A results record as benchmarks.runner.measure writes one: `concurrency` streams of
    `tokens_per_stream` tokens (the last one short) plus `failed` failed ones, over 1 s."""
    from benchmarks.procstat import cpu_per_token, total_us_per_token
    from benchmarks.runner import result

    outputs = [RequestOutput(True, 0.01 * (i + 1), [0.002] * 3, 0.02, 8, tokens_per_stream - (i == concurrency - 1))
               for i in range(concurrency)] + [RequestOutput(False, error="APIConnectionError: boom")] * failed
    r = result({"url": "u", "model": "m", "protocol": "grpc"}, Workload(output_len=tokens_per_stream),
               concurrency, outputs, 1.0, path=path)
    if server_cpu_s is None:
        return {**r, "server_cpu": None, "server_cpu_missing": "nothing listens on port 1"}
    per = cpu_per_token(dict.fromkeys(server_cpu_s, 0.0), server_cpu_s, r["metrics"]["total_output_tokens"])
    return {**r, "server_cpu": per, "server_cpu_total_us_per_token": total_us_per_token(per)}


def test_ceiling_table_and_plot_from_canned_results(tmp_path):
    from benchmarks import ceiling

    results = [  # 4 streams: 4 + 4 + 4 + 3 = 15 tokens; BLS with two instances, one 1.5x the other
        canned_run("bls", 4, {"tritonserver": 0.003, "tensorrt_llm_bls#1": 0.003, "tensorrt_llm_bls#2": 0.0045,
                              "postprocessing": 0.0, "preprocessing": 0.0, "tensorrt_llm": 0.03}),
        canned_run("openai", 4, {"tritonserver": 0.003, "tensorrt_llm_bls": 0.003, "tensorrt_llm": 0.03,
                                 "frontend": 0.006}, failed=1),
        canned_run("ensemble", 4, None),
    ]
    assert ceiling.implied_ceiling(results[0]) == pytest.approx(1e6 / 300)  # the busier BLS instance
    assert ceiling.implied_ceiling(results[1]) == pytest.approx(1e6 / 400)  # the frontend, not the engine
    assert ceiling.implied_ceiling(results[2]) is None
    md = ceiling.write(results, ceiling.CeilingConfig(concurrencies=(4,)), tmp_path / "repo", tmp_path)
    lines = md.read_text().splitlines()
    head = next(line for line in lines if line.startswith("| path"))
    for column in ("output tok/s", "median TTFT ms", "median ITL ms", "failed / short", "tritonserver µs/token",
                   "tensorrt_llm_bls µs/token", "postprocessing µs/token", "preprocessing µs/token",
                   "engine stand-in µs/token", "frontend µs/token", "implied single-GIL ceiling tok/s"):
        assert f"| {column} |" in head
    rows = {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("| ").split(" | ")]
            for line in lines if line.startswith("| ") and not line.startswith("| path")}
    assert rows["bls"] == ["bls", "4", "15.0", "25.0", "2.00", "0 / 1", "200", "200 + 300", "0", "0", "2,000", "–",
                           "3,333"]
    assert rows["openai"][5:] == ["1 / 1", "200", "200", "–", "–", "2,000", "400", "2,500"]
    assert rows["ensemble"][5:] == ["0 / –", *["missing"] * 6, "missing"]  # short: counted in chunks there
    assert "openai c=4: 1 x APIConnectionError" in md.read_text()
    assert "server CPU not measured: ensemble c=4: nothing listens on port 1" in md.read_text()
    saved = json.loads((tmp_path / "ceiling.json").read_text())
    assert saved["runs"][0]["server_cpu"]["tensorrt_llm_bls#2"]["cpu_s"] == pytest.approx(0.0045)
    assert (tmp_path / "ceiling.png").stat().st_size > 1000


def test_the_summary_prints_each_server_process_cpu_per_token_and_why_it_is_missing():
    from benchmarks.report import summary

    text = summary([canned_run("bls", 4, {"tritonserver": 0.003, "tensorrt_llm_bls": 0.0045}),
                    canned_run("bls", 2, None)])
    head, measured, missing, note = text.splitlines()
    assert "tritonserver us/tok" in head and "tensorrt_llm_bls us/tok" in head and "server total us/tok" in head
    assert measured.split()[-3:] == ["200.00", "300.00", "500.00"]
    assert missing.split()[-3:] == ["missing"] * 3
    assert note == "server CPU not measured: nothing listens on port 1"
    assert "us/tok" not in summary([{"concurrency": 1, "metrics": {}}])  # the engine alone: no server


def test_a_served_sweep_records_the_cpu_per_token_of_tritonserver_and_each_stub(tiny_server, tmp_path):
    from benchmarks.__main__ import main

    assert main(["serve", "--url", tiny_server.grpc_url, "--concurrency", "2", "--num-prompts", "2",
                 "--output-len", "8", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "serve_c2.json").read_text())
    cpu = r["server_cpu"]
    assert set(cpu) == {"tritonserver", "tensorrt_llm_bls", "preprocessing", "postprocessing", "tensorrt_llm"}
    assert cpu["tensorrt_llm_bls"]["cpu_s"] >= 0 and cpu["tritonserver"]["us_per_token"] is not None
    assert r["server_cpu_total_us_per_token"] == pytest.approx(sum(v["us_per_token"] for v in cpu.values()))
