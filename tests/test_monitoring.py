"""DP data monitoring: a report per version, its alerts, its accounting and audit, the report endpoint and the
demo's next batch.

The feed: a registration and appended batches of the same distribution, then a batch whose region shifts north and
a tenth of whose incomes lie above the upper bound: exactly those two alerts. On unchanged batches the false-alert
rate is measured over many reports and checked against the declared rate (a binomial upper quantile)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import binom

from gateway.demo import write_access_demo, write_next_batch
from gateway.engines.monitor import monitored
from gateway.monitoring import PRINCIPAL, ReportStore, build_report, monitor_version, release, sensitivity
from gateway.service import Bastion
from policies.accountant import PrivacyLoss
from policies.schema import load_policy, parse_policy
from tests.conftest import ROLES, Workspace, build_workspace

EPSILON = 1.0
ALERT_RATE = 0.01
POLICY = f"""\
dataset: feed
privacy_unit: pid
max_rows_per_unit: 2
budget:
  per_principal: {{epsilon: 5.0}}
  total: {{epsilon: 50.0}}
columns:
  pid: {{type: int, usage: hidden}}
  region: {{type: category, domain: [north, south, east, west]}}
  income: {{type: decimal, bounds: [0, 100000]}}
  day: {{type: date, bounds: [2020-01-01, 2020-12-31]}}
  note: {{type: category}}
roles:
  analyst: [query]
  lf_author: [labeling]
monitoring: {{epsilon: {EPSILON}, cap: {{epsilon: 4.0}}, alert_rate: {ALERT_RATE}}}
"""
REGIONS = ["north", "south", "east", "west"]


def batch(index: int, n: int, *, shift: bool = False, broken: bool = False, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    income = rng.uniform(0, 90_000, n)
    if broken:
        income[rng.random(n) < 0.1] = 150_000.0
    p = [0.55, 0.15, 0.15, 0.15] if shift else [0.25] * 4
    return pa.table(
        {
            "pid": np.arange(n) // 2 + index * 10**6,
            "region": rng.choice(REGIONS, n, p=p),
            "income": income,
            "day": np.datetime64("2020-01-01") + rng.integers(0, 366, n).astype("timedelta64[D]"),
            "note": rng.choice(["a", "b"], n),
        }
    )


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("feed")
    (root / "feed.yaml").write_text(POLICY)
    pq.write_table(batch(0, 4_000, seed=1), root / "b0.parquet")
    ws = build_workspace(root, [(root / "feed.yaml", root / "b0.parquet")], ROLES)
    reports = []
    bastion = Bastion(ws.settings)
    try:
        first = bastion.engine.versions("feed")[0].version
        reports.append(monitor_version(bastion, "feed", first, root / "b0.parquet"))
        for i, (shift, broken) in enumerate([(False, False), (True, True), (False, False), (False, False)], start=1):
            pq.write_table(batch(i, 4_000, shift=shift, broken=broken, seed=10 + i), root / f"b{i}.parquet")
            version, added = bastion.engine.append("feed", root / f"b{i}.parquet")
            assert added
            reports.append(monitor_version(bastion, "feed", version.version, root / f"b{i}.parquet"))
    finally:
        bastion.close()
    return ws, [r for r in reports if r is not None]


def test_the_shifted_and_broken_batch_gives_exactly_two_alerts(feed: tuple[Workspace, list[dict[str, Any]]]) -> None:
    _, reports = feed
    registration, unchanged, changed = reports[:3]
    assert registration["baseline"] is None and registration["alerts"] == []
    assert unchanged["baseline"] == registration["version"] and unchanged["alerts"] == []
    assert changed["baseline"] == unchanged["version"]
    assert sorted((a["column"], a["kind"]) for a in changed["alerts"]) == [("income", "above"), ("region", "drift")]
    messages = {a["kind"]: a["message"] for a in changed["alerts"]}
    assert messages["drift"].startswith("region: north is now the most frequent value (")
    assert "of income values were clamped at the upper bound 100,000" in messages["above"]
    above = next(a for a in changed["alerts"] if a["kind"] == "above")
    # A tenth of the rows were above the bound; the share is within a few noise scales of it.
    scale = changed["scale"]
    assert abs(above["share"] - 0.1) < 0.02 + 6 * scale / 4_000


def test_accounting_audit_and_a_spent_cap(feed: tuple[Workspace, list[dict[str, Any]]]) -> None:
    ws, reports = feed
    # Cap 4 at ε 1 per report: four reports made, the fifth (the last append) skipped, its version still there.
    assert [r["status"] for r in reports] == ["ok"] * 4 + ["skipped"]
    assert reports[-1]["reason"] == "budget_exhausted"
    bastion = Bastion(ws.settings)
    try:
        assert bastion.ledger.spent(PRINCIPAL, "feed") == PrivacyLoss(4 * EPSILON)
        assert bastion.ledger.spent_total("feed").epsilon == pytest.approx(4 * EPSILON)
        assert len(bastion.engine.versions("feed")) == 5
        records = [r for r in bastion.audit_log.records() if r.get("event") == "monitoring_report"]
    finally:
        bastion.close()
    released = [r for r in records if r.get("phase") == "released"]
    assert [r["request"]["report_id"] for r in released] == [r["report_id"] for r in reports[:4]]
    assert all(r["cost"]["epsilon"] == EPSILON and r["version"] == r["request"]["version"] for r in released)
    assert [r["reason"] for r in records if r.get("decision") == "denied"] == ["budget_exhausted"]


def test_one_release_of_the_claimed_sensitivity() -> None:
    policy = parse_policy(__import__("yaml").safe_load(POLICY))
    columns = monitored(policy, 10)
    assert [m.name for m in columns] == ["region", "income", "day", "note"]
    assert sensitivity(policy, columns) == 2 * 4
    noisy, scale = release(policy, [0] * sum(len(m.cells) for m in columns))
    assert scale == pytest.approx(8 / EPSILON)


def _same_distribution_counts(rng: np.random.Generator, n: int, columns: list[Any]) -> list[int]:
    out: list[int] = []
    for m in columns:
        p = np.full(len(m.cells), 1.0)
        p[0] = 0.2  # a few missing values; other flags rare
        out += rng.multinomial(n, p / p.sum()).tolist()
    return out


def test_false_alert_rate_on_unchanged_batches() -> None:
    """Reports on pairs of batches drawn from one distribution (exact counts from a multinomial, each released by
    OpenDP at the declared ε): the share of reports with any alert is at most the declared rate, up to a binomial
    0.999 upper quantile over the runs."""
    policy = parse_policy(__import__("yaml").safe_load(POLICY))
    columns = monitored(policy, 10)
    rng = np.random.default_rng(5)
    runs, alerted = 300, 0
    for i in range(runs):
        base_noisy, s0 = release(policy, _same_distribution_counts(rng, 3_000, columns))
        base = build_report(policy, "1-a", base_noisy, scale=s0, baseline=None, report_id=f"b{i}")
        noisy, s1 = release(policy, _same_distribution_counts(rng, 3_000, columns))
        report = build_report(policy, "2-b", noisy, scale=s1, baseline=base, report_id=f"r{i}")
        alerted += bool(report["alerts"])
    assert alerted <= binom.ppf(0.999, runs, ALERT_RATE), alerted


def test_report_endpoint_grants_and_refusals(feed: tuple[Workspace, list[dict[str, Any]]]) -> None:
    ws, reports = feed
    changed = reports[2]
    url = f"/v1/datasets/feed/versions/{changed['version']}/report"
    with ws.app() as c:
        ok = c.get(url, headers=ws.headers("analyst"))
        assert ok.status_code == 200 and ok.json()["report_id"] == changed["report_id"]
        assert len(ok.json()["alerts"]) == 2
        page = c.get(url + "?format=html", headers=ws.headers("analyst"))
        assert page.status_code == 200 and "<svg" in page.text and "north is now the most frequent" in page.text
        assert c.get(url, headers=ws.headers("lf_author")).status_code == 403
        assert c.get(url).status_code == 401
        missing = c.get("/v1/datasets/feed/versions/9-nothere/report", headers=ws.headers("analyst"))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "version_not_found"
        skipped = c.get(f"/v1/datasets/feed/versions/{reports[-1]['version']}/report", headers=ws.headers("analyst"))
        assert skipped.json()["status"] == "skipped"
        schema = c.get("/openapi.json").json()
        assert "/v1/datasets/{dataset}/versions/{version}/report" in schema["paths"]
    bastion = Bastion(ws.settings)
    try:
        reads = [
            r
            for r in bastion.audit_log.records()
            if r.get("event") == "monitoring_report" and r.get("request", {}).get("action") == "read"
        ]
    finally:
        bastion.close()
    assert {r["decision"] for r in reads} == {"allowed", "denied"}
    assert any(r.get("request", {}).get("report_id") == changed["report_id"] for r in reads)


def test_the_demo_batch_gives_exactly_two_alerts(tmp_path: Path) -> None:
    data, policy_path, _, _ = write_access_demo(tmp_path / "source", n_rows=30_000)
    ws = build_workspace(tmp_path, [], ROLES)
    bastion = Bastion(ws.settings, read_only=False)
    try:
        version = bastion.engine.register(load_policy(policy_path), data)
        assert monitor_version(bastion, "visits", version, data)["alerts"] == []  # type: ignore[index]
    finally:
        bastion.close()
    path = write_next_batch(tmp_path / "examples", data, 6_000)
    assert "batch" in path.name
    bastion = Bastion(ws.settings)
    try:
        appended, _ = bastion.engine.append("visits", path)
        report = monitor_version(bastion, "visits", appended.version, path)
    finally:
        bastion.close()
    assert report is not None
    assert sorted((a["column"], a["kind"]) for a in report["alerts"]) == [("income", "above"), ("region", "drift")]
    assert ReportStore.of(ws.settings).get("visits", appended.version) == report


@pytest.mark.slow
def test_the_report_page_in_headless_chromium(feed: tuple[Workspace, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The report page of the changed batch in a real Chromium against a real `bastion serve`: one chart per
    monitored column, the two alerts, and nothing fetched from elsewhere (the CSP lets nothing load)."""
    from tests.conftest import gateways
    from tests.test_auditor_web import BROWSER_ARGS, CHROMIUM, _chromium_or_skip

    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    ws, reports = feed
    changed = reports[2]
    with gateways(1, "--workspace", str(ws.settings.workspace)) as (url,), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {ws.tokens['analyst']}"})
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(f"{url}/v1/datasets/feed/versions/{changed['version']}/report?format=html")
            assert page.locator("section.column svg").count() == 4
            assert page.locator("#column-income svg rect").count() == len(changed["columns"][1]["cells"])
            alerts = page.locator("#alerts li.alert").all_inner_texts()
            assert sorted(alerts) == sorted(a["message"] for a in changed["alerts"])
            assert all(r.startswith(url) for r in requests)
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()


def test_policy_refuses_a_monitoring_budget_beyond_its_caps() -> None:
    import yaml

    from policies.schema import PolicyError

    raw = yaml.safe_load(POLICY)
    for monitoring, problem in (
        ({"epsilon": 5.0, "cap": {"epsilon": 4.0}}, "cannot exceed monitoring.cap"),
        ({"epsilon": 1.0, "cap": {"epsilon": 6.0}}, "cannot exceed budget.per_principal"),
        ({"epsilon": 1.0, "cap": {"epsilon": 4.0}, "alert_rate": 0}, "alert_rate"),
    ):
        with pytest.raises(PolicyError, match=problem):
            parse_policy({**raw, "monitoring": monitoring})


def test_register_and_append_show_the_report(tmp_path: Path) -> None:
    """`bastion register` and `bastion append` as the admin runs them: the report's table and alerts at the end;
    a rerun of a completed append adds nothing and makes no second report."""
    import subprocess

    from tests.conftest import BIN

    def run(*args: str) -> str:
        done = subprocess.run([str(BIN), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    (tmp_path / "feed.yaml").write_text(POLICY)
    for i, (shift, broken) in enumerate([(False, False), (False, False), (True, True)]):
        pq.write_table(batch(i, 4_000, shift=shift, broken=broken, seed=20 + i), tmp_path / f"b{i}.parquet")
    first = run("register", "feed.yaml", "--source", "b0.parquet")
    assert "monitoring report" in first and "no baseline (first report)" in first
    assert "no alerts (0 tests" in first
    second = run("append", "feed", "b1.parquet")
    assert "appended to feed" in second and "no alerts (" in second and "alert:" not in second
    third = run("append", "feed", "b2.parquet")
    alerts = [line for line in third.splitlines() if line.startswith("alert: ")]
    assert len(alerts) == 2, third
    assert any("region: north is now the most frequent value" in a for a in alerts)
    assert any("of income values were clamped at the upper bound 100,000" in a for a in alerts)
    again = run("append", "feed", "b2.parquet")
    assert "nothing added" in again and "monitoring report" not in again


def test_bastion_demo_prints_the_append_that_gives_two_alerts(tmp_path: Path) -> None:
    """`bastion demo` as a new user runs it (small data): the printed `bastion append` command, run as printed,
    makes a version and prints exactly two alerts."""
    import shlex
    import subprocess

    from tests.conftest import BIN

    def run(*args: str) -> str:
        done = subprocess.run([str(BIN), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    made = run("demo", "--no-serve", "--rows", "20000")
    command = next(line.strip() for line in made.splitlines() if line.strip().startswith("bastion append "))
    assert "batch" in command
    appended = run(*shlex.split(command)[1:])
    assert "appended to visits: version 2-" in appended
    alerts = [line for line in appended.splitlines() if line.startswith("alert: ")]
    assert len(alerts) == 2, appended
    assert any(a.startswith("alert: region: north is now the most frequent value") for a in alerts)
    assert any("of income values were clamped at the upper bound 500,000" in a for a in alerts)
