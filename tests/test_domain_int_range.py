"""An int column declared with a domain and no bounds is typed as lying within its domain's [min, max] (that range
lets integer arithmetic on it stay in BIGINT). Its values outside that range (a dataset's or a public table's) are
missing in the engine's table, so no row value can break the range the compiler relied on: otherwise `k * 4` of a
row holding 2**62 overflowed after the charge, and the answer became the default-input release, noise around 0
where its neighbour without that unit answered the true count."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies.schema import parse_policy

BIG = 2**62
POLICY = {
    "dataset": "t",
    "privacy_unit": "uid",
    "max_rows_per_unit": 2,
    "budget": {"per_principal": {"epsilon": 10}, "total": {"epsilon": 10}},
    "columns": {
        "uid": {"type": "int", "usage": "hidden"},
        "k": {"type": "int", "domain": [1, 2, 3]},
        "code": {"type": "int", "bounds": [0, 10]},
    },
    "roles": {"analyst": ["query"]},
    "public_tables": {
        "pt": {
            "source": "pt.csv",
            "unique_key": "g",
            "columns": {"g": {"type": "int", "bounds": [0, 10]}, "h": {"type": "int", "domain": [1, 2, 3]}},
        }
    },
}


@pytest.fixture
def engine(tmp_path: Path) -> DuckDBEngine:
    # Unit 9 holds k = 2**62 (outside k's domain); the public row g = 2 holds h = 2**62 (outside h's domain).
    rows = [(i, 1 + i % 3, i % 3) for i in range(1, 9)] + [(9, BIG, 2)]
    pd.DataFrame(rows, columns=["uid", "k", "code"]).to_csv(tmp_path / "s.csv", index=False)
    pd.DataFrame({"g": [0, 1, 2], "h": [1, 3, BIG]}).to_csv(tmp_path / "pt.csv", index=False)
    eng = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    eng.register(parse_policy(POLICY), tmp_path / "s.csv")
    return eng


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) AS n, SUM(CASE WHEN k * 4 > 5 THEN 1 ELSE 0 END) AS m FROM t",
        "SELECT COUNT(*) AS n FROM t v JOIN pt p ON v.code = p.g WHERE p.h * 4 > 5",
    ],
)
def test_values_outside_an_int_domain_cannot_make_the_engine_fail(engine: DuckDBEngine, sql: str) -> None:
    try:
        plan = plan_query(sql, lambda name: engine.policy(name)[0], engine.public_table)
        pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
        release = execute(plan, pricing, engine)  # raised (BIGINT overflow) when 2**62 reached the engine
        assert len(release.rows) == 1
    finally:
        engine.close()


def test_values_outside_an_int_domain_read_as_missing(engine: DuckDBEngine) -> None:
    try:
        assert engine.public_table("t", "pt").column("h").to_pylist() == [1, 3, None]
    finally:
        engine.close()
