"""Joins of private tables on the privacy unit, on neighbouring datasets that differ in one patient (all their rows
in every table): the exact inputs of a joined COUNT and a joined SUM move by at most the rows per unit the plan
promises (the product of the sides' bounds, or the policy's truncation bound) and by exactly that for a patient who
fills every bound; the releases pass the empirical ε audit of `test_sql_epsilon` (with its half-scale control); and
on the hospital demo, joined answers fall in their 95% intervals around the truth computed on the bounded tables at
the promised rate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlglot
from scipy.stats import binom

from gateway.demo import write_hospital
from gateway.engines.duckdb import DuckDBEngine
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies.schema import Policy, load_policy, parse_policy
from tests.privacy.test_sql_epsilon import bound, integer_hits, mechanism_inputs

K_VISITS, K_LABS, TOP = 3, 4, 50
N_DRAWS = 20_000


def _policy(truncate: int | None = None) -> Policy:
    raw = {
        "dataset": "hosp",
        "privacy_unit": "pid",
        "max_rows_per_unit": 1,
        "budget": {"per_principal": {"epsilon": 100.0}, "total": {"epsilon": 100.0}},
        "columns": {"pid": {"type": "int", "usage": "hidden"}, "age": {"type": "int", "bounds": [0, 100]}},
        "private_tables": {
            "visits": {
                "source": "visits.csv",
                "unit_column": "pid",
                "max_rows_per_unit": K_VISITS,
                "columns": {
                    "pid": {"type": "int", "usage": "hidden"},
                    "vid": {"type": "int", "bounds": [0, 1_000_000]},
                    "los": {"type": "int", "bounds": [0, 20]},
                },
            },
            "labs": {
                "source": "labs.csv",
                "unit_column": "pid",
                "max_rows_per_unit": K_LABS,
                "columns": {
                    "pid": {"type": "int", "usage": "hidden"},
                    "vid": {"type": "int", "bounds": [0, 1_000_000]},
                    "value": {"type": "int", "bounds": [0, TOP]},
                },
            },
        },
        "roles": {"analyst": ["query"]},
        **({"max_joined_rows_per_unit": truncate} if truncate is not None else {}),
    }
    return parse_policy(raw)


def _tables(worst: bool) -> dict[str, pd.DataFrame]:
    """40 ordinary patients (0-4 visits, 0-3 labs per visit), and with `worst` one more who exceeds every bound:
    10 visits and 30 labs, every value beyond its bound."""
    rng = np.random.default_rng(20261206)
    patients = pd.DataFrame({"pid": range(40), "age": rng.integers(0, 100, 40)})
    visit_rows, lab_rows = [], []
    vid = 0
    for pid in range(40):
        for _ in range(rng.integers(0, 5)):
            vid += 1
            visit_rows.append((pid, vid, int(rng.integers(0, 20))))
            for _ in range(rng.integers(0, 4)):
                lab_rows.append((pid, vid, int(rng.integers(0, TOP))))
    if worst:
        patients = pd.concat([patients, pd.DataFrame({"pid": [999], "age": [500]})], ignore_index=True)
        for i in range(10):
            visit_rows.append((999, 900_000 + i, 99))
        for i in range(30):
            lab_rows.append((999, 900_000 + i % 10, 10_000))
    return {
        "patients": patients,
        "visits": pd.DataFrame(visit_rows, columns=["pid", "vid", "los"]),
        "labs": pd.DataFrame(lab_rows, columns=["pid", "vid", "value"]),
    }


def _register(root: Path, policy: Policy) -> tuple[DuckDBEngine, DuckDBEngine]:
    engines = []
    for name, worst in (("d", True), ("d_prime", False)):
        folder = root / name
        folder.mkdir()
        tables = _tables(worst)
        for table, frame in tables.items():
            frame.to_csv(folder / f"{table}.csv", index=False)
        engine = DuckDBEngine(folder / "p.duckdb", root / "bounding.key", read_only=False)
        engine.register(policy, folder / "patients.csv")
        engines.append(engine)
    return engines[0], engines[1]


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Policy, DuckDBEngine, DuckDBEngine]]:
    policy = _policy()
    d, d_prime = _register(tmp_path_factory.mktemp("join-neighbours"), policy)
    yield policy, d, d_prime
    d.close()
    d_prime.close()


COUNT = "SELECT COUNT(*) FROM hosp.labs l JOIN hosp.visits v ON l.pid = v.pid"
SUM = "SELECT SUM(l.value) FROM hosp p JOIN hosp.labs l ON p.pid = l.pid JOIN hosp.visits v ON v.pid = l.pid"
GROUPED = "SELECT v.los, COUNT(*) FROM hosp.visits v LEFT JOIN hosp.labs l ON l.pid = v.pid GROUP BY v.los"


def _inputs(
    policy: Policy, sql: str, d: DuckDBEngine, d_prime: DuckDBEngine
) -> tuple[list[int], list[int], int, float]:
    plan = plan_query(sql, lambda _: policy, d.public_table)
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    (on_d,) = mechanism_inputs(plan, pricing, d).integers
    (on_d_prime,) = mechanism_inputs(plan, pricing, d_prime).integers
    assert (on_d["d_in"], on_d["epsilon"]) == (on_d_prime["d_in"], on_d_prime["epsilon"])
    return on_d["values"], on_d_prime["values"], on_d["d_in"], on_d["epsilon"]


@pytest.mark.parametrize(("sql", "per_row"), [(COUNT, 1), (SUM, TOP), (GROUPED, 1)])
def test_one_patient_moves_a_joined_answer_by_at_most_the_promised_bound(
    neighbours: tuple[Policy, DuckDBEngine, DuckDBEngine], sql: str, per_row: int
) -> None:
    policy, d, d_prime = neighbours
    va, vb, d_in, _ = _inputs(policy, sql, d, d_prime)
    rows = K_VISITS * K_LABS  # the product of the bounds (the patients' own table has k = 1)
    assert d_in == rows * per_row
    moved = sum(abs(a - b) for a, b in zip(va, vb, strict=True))
    assert moved <= d_in
    if sql != GROUPED:  # the worst patient fills every bound: the promise is tight
        assert moved == d_in


def test_truncation_bounds_the_joined_rows(tmp_path: Path) -> None:
    policy = _policy(truncate=5)
    d, d_prime = _register(tmp_path, policy)
    try:
        va, vb, d_in, _ = _inputs(policy, COUNT, d, d_prime)
        assert d_in == 5 and sum(abs(a - b) for a, b in zip(va, vb, strict=True)) == 5
        va, vb, d_in, _ = _inputs(policy, SUM, d, d_prime)
        assert d_in == 5 * TOP and sum(abs(a - b) for a, b in zip(va, vb, strict=True)) == 5 * TOP
    finally:
        d.close()
        d_prime.close()


@pytest.mark.parametrize("sql", [COUNT, SUM])
def test_joined_releases_pass_the_epsilon_audit(
    neighbours: tuple[Policy, DuckDBEngine, DuckDBEngine], sql: str
) -> None:
    policy, d, d_prime = neighbours
    va, vb, d_in, eps = _inputs(policy, sql, d, d_prime)
    calibrated = bound(*integer_hits(va, vb, d_in, eps, N_DRAWS))
    control = bound(*integer_hits(va, vb, d_in, 2 * eps, N_DRAWS))
    assert calibrated <= eps, calibrated
    assert control > eps, control


def test_joined_answers_fall_in_their_intervals_at_the_promised_rate(tmp_path: Path) -> None:
    data, policy_path = write_hospital(tmp_path / "src", n_patients=2_000)
    policy = load_policy(policy_path)
    engine = DuckDBEngine(tmp_path / "p.duckdb", tmp_path / "key", read_only=False)
    try:
        engine.register(policy, data)
        sql = (
            "SELECT l.test, COUNT(*) AS n, SUM(l.value) AS total FROM hospital.labs l JOIN hospital.visits v "
            "ON l.patient_id = v.patient_id AND l.visit_id = v.visit_id WHERE v.urgent GROUP BY l.test"
        )
        truth_sql = sqlglot.parse_one(
            'SELECT l.test, COUNT(*), SUM(l.value) FROM "bounded_hospital__labs" l JOIN "bounded_hospital__visits" v '
            "ON l.patient_id = v.patient_id AND l.visit_id = v.visit_id WHERE v.urgent GROUP BY l.test",
            dialect="duckdb",
        )
        assert isinstance(truth_sql, sqlglot.exp.Query)
        truth = {row[0]: (row[1], row[2]) for row in engine.rows(truth_sql)}
        plan = plan_query(sql, lambda _: policy, engine.public_table)
        pricing = price(plan, epsilon=0.5, accuracy=None, alpha=0.05, delta=None)
        hits = trials = 0
        for _ in range(100):
            released = execute(plan, pricing, engine)
            for row, intervals in zip(released.rows, released.intervals, strict=True):
                for column, value in ((1, 0), (2, 1)):
                    low, high = intervals[column]  # type: ignore[misc]
                    trials += 1
                    hits += low <= truth.get(row[0], (0, 0.0))[value] <= high
        # 95% intervals: fewer hits than the 1-in-10,000 lower tail of Binomial(trials, 0.95) fails.
        assert trials == 100 * 4 * 2
        assert hits >= binom.ppf(1e-4, trials, 0.95), (hits, trials)
    finally:
        engine.close()
