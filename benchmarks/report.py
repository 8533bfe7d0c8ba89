"""Benchmark results: JSON per run, a summary CSV and plots (write_results), the console table (summary),
ratios between two runs (compare), and serving overhead (overhead)."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

KEYS = ("completed", "failed", "total_input_tokens", "request_throughput", "output_throughput", "median_ttft_ms",
        "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms", "median_e2el_ms")


def environment() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}


def write_results(results: list[dict], out: Path, prefix: str = "serve") -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    for r in results:
        c = r["concurrency"]
        (out / f"{prefix}_c{c}.json").write_text(json.dumps({**r, "environment": env}, indent=2))
    with open(out / f"{prefix}_summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concurrency", *KEYS])
        for r in results:
            w.writerow([r["concurrency"], *[r["metrics"].get(k) for k in KEYS]])
    plot(results, out / f"{prefix}_latency_vs_concurrency.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms"):
        a.plot(cs, [r["metrics"][key] for r in results], marker="o", label=key)
    a.set_xlabel("concurrency"), a.set_ylabel("ms (log)"), a.set_xscale("log", base=2), a.set_yscale("log")
    a.legend()
    b.plot([r["metrics"]["median_ttft_ms"] for r in results], [r["metrics"]["output_throughput"] for r in results],
           marker="o")
    for c, r in zip(cs, results):
        b.annotate(f"c={c}", (r["metrics"]["median_ttft_ms"], r["metrics"]["output_throughput"]))
    b.set_xlabel("median TTFT (ms)"), b.set_ylabel("output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        reqs = [q for q in r["requests"] if q["success"]]
        label = f"c={r['concurrency']}"
        a.hist([1000 * q["ttft_s"] for q in reqs], bins=20, alpha=0.5, label=label)
        b.hist([1000 * g for q in reqs for g in q["itl_s"]], bins=40, alpha=0.5, label=label)
    a.set_xlabel("TTFT (ms)"), b.set_xlabel("ITL (ms)"), a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path.with_name(path.name.replace("latency_vs_concurrency", "distributions")), dpi=100)
    plt.close(fig)


def cpu_processes(results: list[dict]) -> list[str]:
    """The server processes whose CPU any run measured, in the order first seen."""
    return list(dict.fromkeys(name for r in results for name in (r.get("server_cpu") or {})))


def cpu_us_per_token(r: dict, process: str | None = None) -> float | None:
    """A run's server CPU µs per streamed token: one process's, or the total (None: missing)."""
    if process is None:
        return r.get("server_cpu_total_us_per_token")
    return ((r.get("server_cpu") or {}).get(process) or {}).get("us_per_token")


def summary(results: list[dict]) -> str:
    def fmt(v):
        return "missing" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    # Server CPU columns only for runs that measured it (a served target; not the engine alone).
    procs = cpu_processes(results)
    cpu_cols = [*procs, None] if any("server_cpu" in r for r in results) else []
    header = ["concurrency", *KEYS, *(f"{p or 'server total'} us/tok" for p in cpu_cols)]
    rows = [header] + [[str(r["concurrency"]), *[fmt(r["metrics"].get(k)) for k in KEYS],
                        *[fmt(cpu_us_per_token(r, p)) for p in cpu_cols]] for r in results]
    missing = sorted({r["server_cpu_missing"] for r in results if r.get("server_cpu_missing")})
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
                     + [f"server CPU not measured: {m}" for m in missing])


def compare(a: dict, b: dict) -> str:
    """Ratios B / A for every numeric metric both runs report."""
    rows = []
    for k, va in a["metrics"].items():
        vb = b["metrics"].get(k)
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va:
            rows.append(f"{k:<24} {va:>12.3f} {vb:>12.3f} {vb / va:>8.3f}x")
        elif va is None or vb is None:
            rows.append(f"{k:<24} {'missing' if va is None else f'{va:.3f}':>12} "
                        f"{'missing' if vb is None else f'{vb:.3f}':>12}")
    return f"{'metric':<24} {'A':>12} {'B':>12} {'B/A':>9}\n" + "\n".join(rows)


OVERHEAD_KEYS = ("median_itl_ms", "median_ttft_ms", "median_e2el_ms")


def overhead(served: list[dict], engine_only: list[dict]) -> dict:
    """Serving overhead at each concurrency: served minus engine-only, per token (ITL), per request (TTFT)
    and end to end. The runs must be interleaved (benchmarks.engine.served_vs_engine), so that drift hits
    both alike; a negative difference is still possible when the overhead is below the noise, and is
    listed under "negative" rather than reported as a speed-up."""
    out = {}
    for s, e in zip(served, engine_only, strict=True):
        if s["concurrency"] != e["concurrency"]:
            raise ValueError(f"overhead: served c={s['concurrency']} paired with engine c={e['concurrency']}")
        sm, em = s["metrics"], e["metrics"]
        diff = {k: None if sm.get(k) is None or em.get(k) is None else sm[k] - em[k] for k in OVERHEAD_KEYS}
        out[s["concurrency"]] = {**diff, "negative": [k for k, v in diff.items() if v is not None and v < 0]}
    return out


def format_overhead(ov: dict, rounds: int) -> str:
    def ms(v, digits):
        return "missing" if v is None else f"{v:+.{digits}f}"

    lines = [f"serving overhead (served - engine, {rounds} interleaved rounds), ms:"]
    for c, v in ov.items():
        line = (f"  c={c}: per token (median ITL) {ms(v['median_itl_ms'], 3)}, per request (median TTFT) "
                f"{ms(v['median_ttft_ms'], 2)}, E2E {ms(v['median_e2el_ms'], 2)}")
        if v["negative"]:
            line += f"  [negative {', '.join(v['negative'])}: below this run's noise, not a speed-up]"
        lines.append(line)
    return "\n".join(lines)
