"""Timing of per-unit subqueries on neighbouring datasets: does a per-unit query take longer when one patient with
many rows is in the data?

The demo visits, and the same with one more patient of `--unit-rows` visits at extreme values (bounded to k rows
on registration), each served by its own app; per-unit queries are sent to both through the HTTP app (Starlette's
TestClient), interleaved in a random order per round, each run at a distinct ε so nothing comes from the cache.
Prints the mean and median of each and Welch's t-test (and Mann-Whitney U) p-values.

    .venv/bin/python benchmarks/perunit_timing.py [--rows 20000] [--unit-rows 500] [--runs 30]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.testclient import TestClient
from scipy.stats import mannwhitneyu, ttest_ind

from gateway.demo import POLICY_YAML, generate_visits
from gateway.http.app import create_app
from gateway.service import Bastion
from gateway.settings import Settings
from policies.schema import load_policy

QUERIES = {
    "histogram of visits per patient": "SELECT n, COUNT(*) FROM (SELECT patient_id, COUNT(*) AS n FROM visits "
    "GROUP BY patient_id) GROUP BY n",
    "mean of per-patient sums": "SELECT AVG(s), SUM(s) FROM (SELECT patient_id, SUM(length_of_stay) AS s, "
    "COUNT(patient_id) AS n FROM visits WHERE age >= 65 GROUP BY patient_id) WHERE n > 1",
}


def _app(root: Path, name: str, table: pa.Table) -> tuple[TestClient, dict[str, str]]:
    """An app serving `table` as the demo's visits, and an analyst's headers."""
    (root / name).mkdir()
    data, policy = root / name / "visits.parquet", root / name / "visits.yaml"
    pq.write_table(table, data)
    policy.write_text(POLICY_YAML)
    settings = Settings(workspace=root / name / "ws")
    settings.save()
    admin = Bastion(settings, read_only=False)
    admin.engine.register(load_policy(policy), data)
    token, _ = admin.tokens.create("timing", "analyst")
    admin.close()
    return TestClient(create_app(settings)), {"Authorization": f"Bearer {token}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--unit-rows", type=int, default=500, help="visits of the patient in one dataset only")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    base = generate_visits(args.rows, seed=5)
    row = {c: base.column(c)[0].as_py() for c in base.column_names}
    row.update(patient_id=9_999_999, age=110, length_of_stay=60, diagnosis="Z99.7")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        heavy = pa.Table.from_pylist([row] * args.unit_rows, schema=base.schema)
        apps = {
            "with the patient": _app(Path(tmp), "with", pa.concat_tables([base, heavy])),
            "without": _app(Path(tmp), "without", base),
        }
        for client, _ in apps.values():
            stack.enter_context(client)
        order = random.Random(3)
        for name, sql in QUERIES.items():
            for client, headers in apps.values():  # warm up
                client.post("/v1/query", json={"sql": sql, "epsilon": 0.5}, headers=headers).raise_for_status()
            times: dict[str, list[float]] = {label: [] for label in apps}
            for i in range(args.runs):
                for label, (client, headers) in order.sample(list(apps.items()), len(apps)):
                    body = {"sql": sql, "epsilon": 0.01 + i * 1e-6}
                    t0 = time.perf_counter()
                    r = client.post("/v1/query", json=body, headers=headers)
                    times[label].append((time.perf_counter() - t0) * 1e3)
                    r.raise_for_status()
            a, b = times["with the patient"], times["without"]
            print(
                f"{name} ({args.rows:,} rows, a patient of {args.unit_rows} visits, {args.runs} runs each): "
                f"mean {statistics.mean(a):.2f} ms vs {statistics.mean(b):.2f} ms, median "
                f"{statistics.median(a):.2f} vs {statistics.median(b):.2f} ms; Welch t-test p = "
                f"{ttest_ind(a, b, equal_var=False).pvalue:.3f}, Mann-Whitney p = {mannwhitneyu(a, b).pvalue:.3f}"
            )


if __name__ == "__main__":
    main()
