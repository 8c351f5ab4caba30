"""The benchmark suite's own code path on a tiny table, so that it cannot silently rot: every workload and every
engine column must be in the JSON and the Markdown it writes (SmartNoise SQL and the large tables are left out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import accuracy, data, fixed_cost, report
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


def test_accuracy_benchmark_measures_every_query_and_checks_its_targets(tmp_path: Path) -> None:
    reps, epsilons = 5, (1.0, 0.1)
    opts = accuracy.parse_args(
        ["--quick", "--reps", "2", "--bastion-reps", str(reps), "--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    )
    opts.log = lambda _: None
    assert opts.peers == () and opts.rows == 20_000 and opts.epsilons == epsilons
    accuracy.run(opts)

    results = json.loads((tmp_path / "accuracy.json").read_text())
    facts = results["facts"]
    assert facts["units"] == 5_000 and facts["rows"] == results["exact"]["count"]
    # every release was computed and charged: the ledger holds reps × Σε per query
    assert facts["epsilon_spent"] == pytest.approx(reps * sum(epsilons) * len(accuracy.QUERIES))
    for q in accuracy.QUERIES:
        for eps in epsilons:
            cell = results["figures"][q.name]["bastion"][f"{eps:g}"]
            assert cell["status"] == "ok" and cell["releases"] == reps, (q.name, eps)
            assert 0 <= cell["median_error"] <= cell["p95_error"] and cell["ms_per_release"] > 0, (q.name, eps)
            if q.kind is not accuracy.Kind.MEDIAN:
                assert cell["half_width"] > 0 and 0 <= cell["coverage"] <= 1, (q.name, eps)
            if q.by:
                assert cell["spurious"] == 0 and 0 < cell["keys_kept"] <= cell["keys_total"], (q.name, eps)
    statuses = {(t["query"], t["target"]): t["status"] for t in results["targets"]}
    assert statuses[("count", "median error ≤ best peer's")] == "not measured"  # no peer ran
    assert statuses[("median", "error < half grid step")] in {"met", "not met"}
    markdown = (tmp_path / "accuracy.md").read_text()
    for q in accuracy.QUERIES:
        assert f"| {q.workload.title} | 0.1 | Bastion |" in markdown
    assert "### Accuracy targets" in markdown

    # --rejudge reads the run's figures and judges them again without releasing anything
    again = tmp_path / "again"
    accuracy.main(["--rejudge", str(tmp_path / "accuracy.json"), "--out", str(again)])
    rejudged = json.loads((again / "accuracy.json").read_text())
    assert rejudged["targets"] == results["targets"] and rejudged["figures"] == results["figures"]
    assert (again / "accuracy.md").read_text() == markdown


def test_accuracy_benchmark_under_zcdp_releases_at_the_peers_epsilon_and_delta(tmp_path: Path) -> None:
    """--accounting zcdp: Bastion's dataset is zCDP, each release is asked for at the ρ whose OpenDP conversion at
    δ/2 is the peers' ε (key selection gets the other δ/2), the ledger is charged exactly that ρ, and the report goes
    to its own files."""
    from policies.accountant import zcdp_epsilon

    reps, epsilons = 3, (1.0, 0.1)
    opts = accuracy.parse_args(
        ["--quick", "--bastion-reps", str(reps), "--queries", "count", "private_keys", "--accounting", "zcdp"]
        + ["--work", str(tmp_path / "w"), "--out", str(tmp_path)]
    )
    opts.log = lambda _: None
    accuracy.run(opts)
    assert not (tmp_path / "accuracy.json").exists()
    results = json.loads((tmp_path / "accuracy_zcdp.json").read_text())
    assert results["config"]["accounting"] == "zcdp"
    rhos = results["config"]["rho"]
    for eps in epsilons:
        asked, delta, rho = accuracy.bastion_request(opts.accounting, eps, private_keys=True)
        assert rhos[f"{eps:g}"] == rho and asked**2 / 2 == pytest.approx(rho, rel=1e-12)
        assert zcdp_epsilon(rho, data.QUERY_DELTA / 2) <= eps * (1 + 1e-9) and delta == data.QUERY_DELTA / 2
        assert zcdp_epsilon(rho * 1.01, data.QUERY_DELTA / 2) > eps  # the largest such ρ, not a loose one
        for name in ("count", "private_keys"):
            cell = results["figures"][name]["bastion"][f"{eps:g}"]
            assert cell["status"] == "ok" and cell["releases"] == reps and cell["rho"] == rho
            assert 0 <= cell["coverage"] <= 1 and cell["half_width"] > 0
    # every release charged: reps × Σρ per query
    assert results["facts"]["rho_spent"] == pytest.approx(reps * 2 * sum(rhos.values()), rel=1e-9)
    markdown = (tmp_path / "accuracy_zcdp.md").read_text()
    assert markdown.startswith("## Accuracy per ε (Bastion under zCDP accounting)") and "ρ per release" in markdown
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--accounting", "zcdp", "--update-results"])


def test_the_worse_verdict_is_corrected_for_the_runs_comparisons() -> None:
    """With n comparisons in a run, Bastion is judged worse only from a bootstrap share of 1 - 0.025 / n: a share
    that one comparison alone would judge "not met" is sampling error among twelve."""
    q = next(q for q in accuracy.QUERIES if q.kind is accuracy.Kind.COUNT)
    rng = np.random.default_rng(3)
    exact = 1000.0

    def cell(errors: np.ndarray) -> dict[str, object]:
        rel = accuracy.Releases(
            values=list(exact + errors), intervals=[None] * len(errors), times_s=[0.01] * len(errors)
        )  # type: ignore[arg-type]
        return accuracy.summarize(q, exact, rel)

    # Bastion's errors a little larger than the peer's: larger in about 99% of resamples
    bastion, peer = cell(rng.laplace(0, 10.6, 1000)), cell(rng.laplace(0, 10.0, 100) * 0.76)
    share = accuracy.worse_share(bastion["errors"], peer["errors"])  # type: ignore[arg-type]
    assert 0.975 < share < 1 - 0.025 / 12, share

    def verdict(n_epsilons: int) -> str:
        """The count's verdict in a run that compares it at n_epsilons values of ε (and nothing else)."""
        epsilons = tuple(float(e + 1) for e in range(n_epsilons))
        figures: dict[str, dict[str, dict[str, Any]]] = {x.name: {"bastion": {}} for x in accuracy.QUERIES}
        figures[q.name] = {
            "bastion": {f"{e:g}": bastion for e in epsilons},
            "opendp": {f"{e:g}": peer for e in epsilons},
        }
        assert accuracy.worse_share_needed(figures, epsilons) == pytest.approx(1 - 0.025 / n_epsilons)
        statuses = {
            t["status"] for t in accuracy.targets(figures, epsilons) if t["query"] == q.name and "median" in t["target"]
        }
        assert len(statuses) == 1
        return statuses.pop()

    assert verdict(1) == "not met"  # one comparison: judged at 2.5%
    assert verdict(12) == "met within sampling error"  # one of twelve: at 2.5% / 12


def test_accuracy_targets_catch_a_more_accurate_peer() -> None:
    """The comparison is not vacuous: against a peer with a tenth of Bastion's noise the target is not met, against
    one with ten times the noise it is; coverage and keys kept are counted from the releases."""
    q = next(q for q in accuracy.QUERIES if q.kind is accuracy.Kind.PRIVATE_KEYS)
    exact = {"a": 1000.0, "b": 50.0}
    noise = np.random.default_rng(7).laplace(0.0, 10.0, (200, 2))

    def releases(scale: float, keep_b: bool) -> accuracy.Releases:
        values = [{"a": 1000 + scale * x, **({"b": 50 + scale * y} if keep_b else {})} for x, y in noise]
        width = 30.0 * scale  # about 3 scales of the noise: ~95% of Laplace(10 · scale) draws fall within it
        intervals = [{k: (v - width, v + width) for k, v in row.items()} for row in values]
        return accuracy.Releases(values=values, intervals=intervals, times_s=[0.01] * len(values))  # type: ignore[arg-type]

    bastion = accuracy.summarize(q, exact, releases(1.0, keep_b=False))
    assert bastion["keys_kept"] == 1 and bastion["keys_total"] == 2 and bastion["spurious"] == 0
    assert 0.9 < bastion["coverage"] < 0.99

    def verdicts(peer_scale: float, peer_keeps_b: bool) -> dict[str, str]:
        figures = {
            name: {
                "bastion": {"1": bastion},
                "opendp": {"1": accuracy.summarize(q, exact, releases(peer_scale, peer_keeps_b))},
            }
            for name in (x.name for x in accuracy.QUERIES)
        }
        return {t["target"]: t["status"] for t in accuracy.targets(figures, (1.0,)) if t["query"] == q.name}

    assert verdicts(0.1, peer_keeps_b=True) == {
        "median error ≤ best peer's": "not met",
        "keys kept ≥ best peer's": "not met",
    }
    assert verdicts(10.0, peer_keeps_b=False) == {"median error ≤ best peer's": "met", "keys kept ≥ best peer's": "met"}


def test_results_markdown_keeps_the_accuracy_section() -> None:
    """benchmarks.run rewrites RESULTS.md; the accuracy benchmark's section between its markers survives it."""
    text = report.with_accuracy_section("# Bastion benchmarks\n\nsuite\n", "## Accuracy per ε\n\nfirst run\n")
    assert "first run" in report.accuracy_section(text) and text.startswith("# Bastion benchmarks\n\nsuite\n")
    again = report.with_accuracy_section(text, "## Accuracy per ε\n\nsecond run\n")
    assert "first run" not in again and again.count(report.ACCURACY_START) == 1
    assert report.accuracy_section("no section here") == ""
