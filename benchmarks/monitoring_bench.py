"""DP data monitoring: what a version's report costs on top of its append, on the demo's next batch.

    .venv/bin/python benchmarks/monitoring_bench.py [--rows 500000] [--batch 100000] [--runs 3] [--reports 1000]

The demo's visits (with monitoring declared, as `bastion demo` registers them) are registered with `--rows` rows
and their report made; then the demo's next batch (`--batch` rows: region shifted north, a fifth of incomes above
the bound) is appended `--runs` times into fresh workspaces, timing the append and the report (charge, the second
pass over the batch that finds its kept rows' cells, the OpenDP release, the alerts, the audit records).

Then the false-alert rate: `--reports` reports under the demo's policy on pairs of batches of `--batch` rows drawn
from one distribution (each column's cells multinomial, a tenth of the rows missing), each released by OpenDP at
the policy's ε and compared as a report with its baseline: the share of reports with any alert, against the
declared `alert_rate`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from gateway.demo import DEMO_ACCESS_POLICY_YAML, write_access_demo, write_next_batch
from gateway.engines.monitor import monitored
from gateway.monitoring import build_report, monitor_version, release
from gateway.service import Bastion
from gateway.settings import Settings
from policies.schema import load_policy, parse_policy


def run(rows: int, batch: int, runs: int) -> dict[str, float]:
    appends, reports, alerts = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, policy_path, _, _ = write_access_demo(root / "source", n_rows=rows)
        path = write_next_batch(root / "examples", data, batch)
        for i in range(runs):
            settings = Settings(workspace=root / f"ws{i}")
            settings.save()
            bastion = Bastion(settings, read_only=False)
            try:
                version = bastion.engine.register(load_policy(policy_path), data)
                monitor_version(bastion, "visits", version, data)
            finally:
                bastion.close()
            bastion = Bastion(settings)
            try:
                started = time.perf_counter()
                appended, _ = bastion.engine.append("visits", path)
                appends.append(time.perf_counter() - started)
                started = time.perf_counter()
                report = monitor_version(bastion, "visits", appended.version, path)
                reports.append(time.perf_counter() - started)
                alerts.append(len(report["alerts"]) if report else 0)
            finally:
                bastion.close()
    return {
        "append_s": statistics.median(appends),
        "report_s": statistics.median(reports),
        "alerts": statistics.median(alerts),
    }


def false_alerts(batch: int, reports: int, seed: int = 1) -> tuple[int, float]:
    """Reports with any alert among `reports` on unchanged batches, and the declared rate."""
    policy = parse_policy(yaml.safe_load(DEMO_ACCESS_POLICY_YAML))
    assert policy.monitoring is not None
    columns = monitored(policy, policy.monitoring.bins)
    rng = np.random.default_rng(seed)

    def counts() -> list[int]:
        out: list[int] = []
        for m in columns:
            p = np.ones(len(m.cells))
            p[0] = len(m.cells) / 9  # a tenth of the rows missing
            out += rng.multinomial(batch, p / p.sum()).tolist()
        return out

    alerted = 0
    for i in range(reports):
        noisy, scale = release(policy, counts())
        base = build_report(policy, "1", noisy, scale=scale, baseline=None, report_id=f"b{i}")
        noisy, scale = release(policy, counts())
        alerted += bool(build_report(policy, "2", noisy, scale=scale, baseline=base, report_id=f"r{i}")["alerts"])
    return alerted, policy.monitoring.alert_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reports", type=int, default=1_000)
    args = parser.parse_args()
    out = run(args.rows, args.batch, args.runs)
    print(
        f"rows {args.rows:,}, batch {args.batch:,}: append {out['append_s']:.2f} s, monitoring report "
        f"{out['report_s']:.2f} s (median of {args.runs}), alerts {out['alerts']:.0f}"
    )
    alerted, declared = false_alerts(args.batch, args.reports)
    print(f"unchanged batches of {args.batch:,}: {alerted} of {args.reports:,} reports alerted (declared {declared})")


if __name__ == "__main__":
    main()
