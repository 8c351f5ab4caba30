"""Joins with a public table and joins of private tables on the privacy unit: what planning (the public table's
values read for its keys), the measurement statement on the engine and the whole query through the service cost,
against the same query without the join.

    .venv/bin/python benchmarks/joins.py [--rows 500000] [--patients 100000] [--runs 30]

The demo's visits joined with its public `diagnosis_chapters` (28 codes, 13 chapters) on the unique key `code`; and
the hospital demo (`--patients` patients, their visits and labs) with its private tables read alone and joined on
`patient_id` (and `visit_id`), with and without the public table. Each figure is the median of `--runs` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.demo import write_demo, write_hospital
from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.sql import compile as comp
from gateway.sql.plan import Plan, plan_query
from policies.schema import Policy, load_policy

QUERIES = [
    ("COUNT(*)", "SELECT COUNT(*) FROM visits"),
    ("joined COUNT(*)", "SELECT COUNT(*) FROM visits v JOIN diagnosis_chapters c ON v.diagnosis = c.code"),
    ("by region, AVG", "SELECT region, COUNT(*), AVG(income) FROM visits GROUP BY region"),
    (
        "joined by chapter, AVG",
        "SELECT c.chapter, COUNT(*), AVG(v.income) FROM visits v JOIN diagnosis_chapters c ON v.diagnosis = c.code "
        "GROUP BY c.chapter",
    ),
]


HOSPITAL = [
    ("visits COUNT(*)", "SELECT COUNT(*) FROM hospital.visits"),
    (
        "patients ⋈ visits COUNT",
        "SELECT COUNT(*) FROM hospital p JOIN hospital.visits v ON p.patient_id = v.patient_id",
    ),
    ("labs AVG by test", "SELECT test, AVG(value) FROM hospital.labs GROUP BY test"),
    (
        "labs ⋈ visits AVG by test",
        "SELECT l.test, AVG(l.value) FROM hospital.labs l JOIN hospital.visits v ON l.patient_id = v.patient_id "
        "AND l.visit_id = v.visit_id WHERE v.urgent GROUP BY l.test",
    ),
    (
        "labs ⋈ visits ⋈ chapters",
        "SELECT c.chapter, AVG(l.value) FROM hospital.labs l JOIN hospital.visits v ON l.patient_id = v.patient_id "
        "AND l.visit_id = v.visit_id JOIN diagnosis_chapters c ON v.diagnosis = c.code GROUP BY c.chapter",
    ),
]


def _median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, policy_path = write_demo(root / "demo", n_rows=args.rows, seed=7)
        hospital_data, hospital_policy = write_hospital(root / "hospital", n_patients=args.patients)
        settings = Settings(workspace=root / "ws")
        settings.save()
        admin = Bastion(settings, read_only=False)
        admin.engine.register(load_policy(policy_path), data)
        admin.engine.register(load_policy(hospital_policy), hospital_data)
        token, _ = admin.tokens.create("alice", "analyst")
        admin.close()
        bastion = Bastion(settings)
        ctx = Context(bastion.authenticate(token))
        engine = bastion.engine
        print(f"{'query':<27} {'plan ms':>8} {'statement ms':>13} {'query ms':>9}")
        for label, sql in [*QUERIES, *HOSPITAL]:
            policy, _ = engine.policy("hospital" if "hospital" in sql else "visits")

            def planned(sql: str = sql, policy: Policy = policy) -> Plan:
                return plan_query(sql, lambda _: policy, engine.public_table)

            statement = comp.measurement_query(planned())
            epsilons = iter([0.01 + i * 1e-4 for i in range(args.runs)])  # a fresh ε a run: no cached answer
            plan_s = _median(planned, args.runs)
            statement_s = _median(lambda: engine.rows(statement), args.runs)  # noqa: B023
            query_s = _median(lambda: bastion.query(ctx, sql, epsilon=next(epsilons)), args.runs)  # noqa: B023
            print(f"{label:<27} {plan_s * 1e3:>8.2f} {statement_s * 1e3:>13.2f} {query_s * 1e3:>9.1f}")
        bastion.close()


if __name__ == "__main__":
    main()
