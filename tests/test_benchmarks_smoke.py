"""The benchmark suite's own code path on a tiny table, so that it cannot silently rot: every workload and every
engine column must be in the JSON and the Markdown it writes (SmartNoise SQL and the large tables are left out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import fixed_cost, report
from benchmarks.run import ENGINES, Options, run
from benchmarks.workloads import WORKLOADS


def test_benchmark_suite_writes_every_workload_and_engine(tmp_path: Path) -> None:
    opts = Options(
        rows=[20_000],
        reps=3,
        warmup=1,
        clients=2,
        throughput_seconds=0.5,
        smartnoise=False,
        work=tmp_path / "work",
        out=tmp_path / "out",
        copy_markdown=None,
        log=lambda _: None,
    )
    run(opts)

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["rows"] for r in results["runs"]] == [20_000]
    (entry,) = results["runs"]
    assert entry["registration_s"] > 0 and entry["bounded_rows"] <= 20_000
    assert entry["gateway_peak_rss_mib"] > 0
    assert set(entry["workloads"]) == {w.name for w in WORKLOADS}
    for name, cells in entry["workloads"].items():
        assert set(cells) == set(ENGINES), name
        for engine in ("raw", "bastion", "http"):
            assert cells[engine]["n"] == 3, (name, engine)
            assert 0 < cells[engine]["p50_ms"] <= cells[engine]["p95_ms"], (name, engine)
        assert cells["smartnoise"]["status"] in {"skipped", "unsupported"}, name

    for mode in ("cached", "uncached"):
        tp = results["throughput"][mode]
        assert tp["requests"] > 0 and tp["errors"] == 0, (mode, tp)
    kinds = {t["kind"] for t in results["targets"]}
    assert kinds == {"ratio_to_raw", "speedup_vs_smartnoise", "http_overhead", "cached_qps", "registration"}

    markdown = (tmp_path / "out" / "results.md").read_text()
    for title in report.ENGINE_TITLES.values():
        assert title in markdown
    for w in WORKLOADS:
        assert f"| {w.title} |" in markdown
    assert "### Targets" in markdown and "20,000 rows" in markdown


def test_fixed_cost_breakdown_prints_every_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixed_cost.main(["--rows", "2000", "--runs", "3", "--dir", str(tmp_path), "--workloads", "count", "sum_two_keys"])
    out = capsys.readouterr().out
    for label in ("raw DuckDB", "statement alone", "durable writes alone", "ledger charge", "audit append", "execute"):
        assert out.count(label) == 2, label  # once per workload: the phases are timed once each, not twice
    assert out.count("  plan (parse, plan, bind check)") == 2
    assert list(tmp_path.iterdir()) == []  # the workspace is removed afterwards
