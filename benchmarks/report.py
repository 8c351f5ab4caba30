"""The results as Markdown, and the targets the suite checks."""

from __future__ import annotations

import datetime as dt
from typing import Any

RATIO_TARGET = 1.25  # Bastion in process p50 ≤ 1.25 × raw DuckDB p50, on every workload of the largest table
# Tighter targets of some workloads: COUNT(*) is almost all fixed cost, grouped queries almost all DuckDB's work.
RATIO_TARGETS = {"count": 3.0, "grouped_count_avg": 1.1, "sum_two_keys": 1.1}
TARGET_ROWS = 10_000_000
SMARTNOISE_SPEEDUP = 50.0  # ≥ 50 × faster than SmartNoise SQL on 1M rows
SMARTNOISE_ROWS = 1_000_000
HTTP_OVERHEAD_MS = 5.0
CACHED_QPS = 500.0
REGISTRATION_S = 30.0

# The accuracy benchmark's section of RESULTS.md (benchmarks.accuracy), kept when the suite rewrites the file.
ACCURACY_START = "<!-- accuracy:start -->"
ACCURACY_END = "<!-- accuracy:end -->"

ENGINE_TITLES = {
    "raw": "raw DuckDB",
    "bastion": "Bastion in process",
    "http": "Bastion HTTP",
    "smartnoise": "SmartNoise SQL",
}


def accuracy_section(text: str) -> str:
    """The accuracy benchmark's section of a RESULTS.md text, with its markers; "" if it has none."""
    if ACCURACY_START not in text or ACCURACY_END not in text:
        return ""
    return ACCURACY_START + text.split(ACCURACY_START, 1)[1].split(ACCURACY_END, 1)[0] + ACCURACY_END + "\n"


def with_accuracy_section(text: str, section: str) -> str:
    """`text` with its accuracy section replaced by `section` (Markdown, without markers), or with it appended."""
    block = f"{ACCURACY_START}\n{section.rstrip()}\n{ACCURACY_END}\n"
    old = accuracy_section(text)
    if old:
        return text.replace(old, block, 1)
    return text.rstrip("\n") + "\n\n" + block


def _p50(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else entry.get("p50_ms")


def _run(results: dict[str, Any], rows: int) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if r["rows"] == rows), None)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target: its figure and whether it was met (None when this run did not measure it)."""
    out: list[dict[str, Any]] = []
    runs = results["runs"]
    if not runs:
        return out
    largest = max(runs, key=lambda r: r["rows"])
    note = "" if largest["rows"] >= TARGET_ROWS else f" (measured on {largest['rows']:,} rows, the largest run)"
    for name, w in largest["workloads"].items():
        raw, bas = _p50(w["raw"]), _p50(w["bastion"])
        ratio = bas / raw if raw and bas else None
        target = RATIO_TARGETS.get(name, RATIO_TARGET)
        floor = _floor_ratio(largest) if name == "count" else None
        out.append(
            {
                "target": f"in process ≤ {target:g}× raw DuckDB, {name}{note}"
                + (f" (floor with durable writes alone: {floor:.2f}×)" if floor else ""),
                "workload": name,
                "kind": "ratio_to_raw",
                "figure": ratio,
                "unit": "×",
                "met": None if ratio is None else ratio <= target,
            }
        )
    sn_run = _run(results, SMARTNOISE_ROWS) or min(runs, key=lambda r: r["rows"])
    sn_note = "" if sn_run["rows"] == SMARTNOISE_ROWS else f" (on {sn_run['rows']:,} rows)"
    for name, w in sn_run["workloads"].items():
        bas, sn = _p50(w["bastion"]), _p50(w["smartnoise"])
        speedup = sn / bas if sn and bas else None
        out.append(
            {
                "target": f"≥ {SMARTNOISE_SPEEDUP:g}× faster than SmartNoise SQL, {name}{sn_note}",
                "workload": name,
                "kind": "speedup_vs_smartnoise",
                "figure": speedup,
                "unit": "×",
                "met": None if speedup is None else speedup >= SMARTNOISE_SPEEDUP,
                "why_not_measured": None if speedup else w["smartnoise"].get("reason"),
            }
        )
    worst = None
    for r in runs:
        for name, w in r["workloads"].items():
            bas, http = _p50(w["bastion"]), _p50(w["http"])
            if bas is not None and http is not None:
                extra = http - bas
                if worst is None or extra > worst[0]:
                    worst = (extra, name, r["rows"])
    out.append(
        {
            "target": f"HTTP adds ≤ {HTTP_OVERHEAD_MS:g} ms to the in-process p50 (worst workload"
            + (f": {worst[1]}, {worst[2]:,} rows)" if worst else ")"),
            "kind": "http_overhead",
            "figure": worst[0] if worst else None,
            "unit": "ms",
            "met": None if worst is None else worst[0] <= HTTP_OVERHEAD_MS,
        }
    )
    tp = results.get("throughput") or {}
    qps = (tp.get("cached") or {}).get("qps")
    out.append(
        {
            "target": f"cached answers ≥ {CACHED_QPS:g} q/s through HTTP",
            "kind": "cached_qps",
            "figure": qps,
            "unit": "q/s",
            "met": None if qps is None else qps >= CACHED_QPS,
        }
    )
    reg = _run(results, TARGET_ROWS) or largest
    reg_note = "" if reg["rows"] == TARGET_ROWS else f" (on {reg['rows']:,} rows)"
    out.append(
        {
            "target": f"registering 10M rows < {REGISTRATION_S:g} s{reg_note}",
            "kind": "registration",
            "figure": reg["registration_s"],
            "unit": "s",
            "met": reg["registration_s"] < REGISTRATION_S,
        }
    )
    return out


def _floor_ratio(run: dict[str, Any]) -> float | None:
    """(raw DuckDB + the durable writes alone) ÷ raw DuckDB, for the workload the writes were timed with."""
    floor = run.get("durable_floor") or {}
    raw = _p50((run["workloads"].get(floor.get("workload", "")) or {}).get("raw"))
    return (raw + floor["p50_ms"]) / raw if raw and floor.get("p50_ms") is not None else None


def _ms(entry: dict[str, Any] | None) -> str:
    if entry is None or entry.get("p50_ms") is None:
        status = (entry or {}).get("status", "n/a")
        return {"unsupported": "unsupported", "skipped": "not run", "error": "error"}.get(status, "n/a")
    p50, p95 = entry["p50_ms"], entry["p95_ms"]
    fmt = (lambda x: f"{x:,.0f}") if p50 >= 100 else (lambda x: f"{x:.1f}")
    return f"{fmt(p50)} / {fmt(p95)}"


def _fig(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if unit == "×":
        return f"{x:,.0f}×" if x >= 10 else f"{x:.2f}×"
    if unit == "q/s":
        return f"{x:,.0f} q/s"
    return f"{x:.1f} {unit}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m.get("versions", {})
    sn = results.get("smartnoise") or {}
    cfg = results["config"]
    titles = {w["name"]: w["title"] for w in results["workloads"]}
    lines = [
        "# Bastion benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"DuckDB {v.get('duckdb', '?')}, OpenDP {v.get('opendp', '?')}"
        + (
            f"; SmartNoise SQL {sn['version']} (OpenDP {sn.get('opendp_version', '?')}, own venv)"
            if sn.get("version")
            else ""
        )
        + f". Run {results.get('finished_at') or f'{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC'}, {cfg['reps']} "
        "timed repetitions per workload and engine (SmartNoise: fewer, see the JSON), max 5 rows per privacy unit. "
        "The machine is shared with other work: raw, in-process and HTTP run interleaved so that their ratios are "
        "comparable; absolute figures vary from run to run.",
        "",
        "Command: `"
        + (cfg.get("command") or ".venv/bin/python -m benchmarks.run --rows " + " ".join(str(r) for r in cfg["rows"]))
        + "`",
        "",
        "Latency in ms, p50 / p95. *raw DuckDB* runs the plain SQL on the same pre-bounded table (no privacy: the "
        "floor); *Bastion in process* is `Bastion.query`, every timed query a new one ("
        + ("a distinct SQL text at ε = 1" if cfg.get("fresh", "sql") == "sql" else "the same SQL at a new ε")
        + ", so none is served from the cache: planner, ledger charge, audit admitted and released, OpenDP noise); "
        "*Bastion HTTP* adds the Python client and the uvicorn server on "
        "127.0.0.1; *SmartNoise SQL* runs on the same data with the same unit, max_ids and bounds. "
        "×raw = Bastion in process p50 ÷ raw p50; SN÷B = SmartNoise p50 ÷ Bastion in-process p50.",
    ]
    if sn.get("status") not in (None, "ok"):
        lines += ["", f"SmartNoise SQL: {sn.get('status')}" + (f" — {sn['reason']}" if sn.get("reason") else "")]
    for r in results["runs"]:
        lines += [
            "",
            f"### {r['rows']:,} rows ({r['units']:,} users, {r['bounded_rows']:,} rows after bounding)",
            "",
            "| workload | raw DuckDB | Bastion in process | ×raw | Bastion HTTP | HTTP +ms | SmartNoise SQL | SN÷B |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, w in r["workloads"].items():
            raw, bas, http, s = _p50(w["raw"]), _p50(w["bastion"]), _p50(w["http"]), _p50(w["smartnoise"])
            ratio = f"{bas / raw:.2f}" if raw and bas else "n/a"
            extra = f"{http - bas:+.1f}" if http is not None and bas is not None else "n/a"
            speed = f"{s / bas:,.0f}×" if s and bas else "n/a"
            lines.append(
                f"| {titles.get(name, name)} | {_ms(w['raw'])} | {_ms(w['bastion'])} | {ratio} | "
                f"{_ms(w['http'])} | {extra} | {_ms(w['smartnoise'])} | {speed} |"
            )
        floor, floor_ratio = r.get("durable_floor"), _floor_ratio(r)
        if floor and floor_ratio is not None:
            lines += [
                "",
                f"Durable writes alone of one charged query on this disk (one SQLite commit at synchronous=FULL, two "
                f"appended records with fsync; no Bastion code), interleaved with {floor['workload']}, p50 / p95: "
                f"{_ms(floor)} ms. Raw DuckDB plus these, the floor of that workload's cost that keeps every "
                f"durability guarantee, is {floor_ratio:.2f}× raw (p50).",
            ]
    lines += ["", "### Throughput, memory, registration", "", "| measure | value |", "|---|---:|"]
    tp = results.get("throughput")
    if tp:
        for mode in ("cached", "uncached"):
            t = tp[mode]
            lines.append(
                f"| HTTP {mode} `{tp['workload']}`, {tp['clients']} clients, {tp['rows']:,} rows | "
                f"{t['qps']:,.0f} q/s ({t['requests']:,} requests, p50 {t['p50_ms'] or 0:.1f} ms, "
                f"{t['errors']} errors) |"
            )
    for r in results["runs"]:
        if r.get("gateway_peak_rss_mib") is not None:
            lines.append(
                f"| gateway peak RSS, {r['rows']:,}-row workloads | {r['gateway_peak_rss_mib']:,.0f} MiB "
                f"(after start {r.get('gateway_rss_after_start_mib') or 0:,.0f} MiB) |"
            )
    for r in results["runs"]:
        lines.append(f"| registration (load + pre-bounded table), {r['rows']:,} rows | {r['registration_s']:.1f} s |")
        if r.get("smartnoise_load_s") is not None:
            lines.append(
                f"| SmartNoise SQL load (pandas → SQLite), {r['rows']:,} rows | {r['smartnoise_load_s']:.1f} s |"
            )
    lines += ["", "### Targets", "", "| target | figure | met |", "|---|---:|---|"]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fig(t['figure'], t['unit'])} | {met} |")
    lines += ["", "### Workloads", "", "| workload | Bastion SQL | SmartNoise SQL |", "|---|---|---|"]
    for w in results["workloads"]:
        sn_sql = f"`{w['smartnoise_sql']}`" if w["smartnoise_sql"] else "unsupported"
        lines.append(f"| {w['title']} | `{w['sql']}` | {sn_sql} |")
    return "\n".join(lines) + "\n"
