"""The release's fast paths give what the general ones give: post-processing that only selects released columns
(done without the public engine) against the public engine on the same noisy values, and DuckDB's native 128-bit
integer sums against the exact DECIMAL sums the compiled statements ask for."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sqlglot import exp

from gateway.demo import POLICY_YAML
from gateway.engines.base import EngineError
from gateway.engines.duckdb import DuckDBEngine
from gateway.sql import compile as comp
from gateway.sql import release
from gateway.sql.plan import Kind, Measurement, Plan, plan_query
from gateway.sql.price import price
from policies import mechanisms as mech
from policies.schema import parse_policy

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))

PROJECTIONS = [
    "SELECT COUNT(*) AS n FROM visits",
    "SELECT sex, COUNT(*) AS n, AVG(income) AS mean_income FROM visits GROUP BY sex",
    "SELECT region, sex, SUM(income) AS total, STDDEV(age) AS sd FROM visits GROUP BY region, sex",
    "SELECT diagnosis, COUNT(*) FROM visits GROUP BY diagnosis",
    "SELECT visit_day, COUNT(*) AS n FROM visits WHERE visit_day < '2015-01-04' GROUP BY visit_day",
    "SELECT QUANTILE_CONT(age, 0.5) AS median_age, COUNT(*) AS n FROM visits",
]
NOT_PROJECTIONS = [
    "SELECT COUNT(*) * 2 + 1 AS x FROM visits",
    "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex HAVING COUNT(*) > 3",
    "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex ORDER BY n DESC LIMIT 2",
    "SELECT sex, AVG(income) / 1000 AS k FROM visits GROUP BY sex",
]


def _post_process(sql: str, rng: np.random.Generator, via_engine: bool, monkeypatch: Any) -> release.Release:
    plan = plan_query(sql, lambda _: POLICY)
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=1e-7 if plan.needs_key_selection else None)
    groups = plan.declared_groups()
    if groups is None:  # selected private keys, one of them missing (NULL)
        groups = [("A01",), ("B02",), (None,)]
    n = len(groups)
    # Small and negative noisy values: means over no rows (NaN), clamped counts, noise-dominated flags.
    noisy = {m: rng.integers(-3, 50, n).astype(np.float64) for m in comp.plain_measurements(plan)}
    quantiles = {m: [_quantile(plan, m, rng) for _ in groups] for m in plan.measurements if m.kind == Kind.QUANTILE}
    with monkeypatch.context() as patch:
        if via_engine:
            patch.setattr(release, "_projection", lambda _plan: None)
        return release._post_process(plan, pricing, groups, noisy, quantiles, [])


def _quantile(plan: Plan, m: Measurement, rng: np.random.Generator) -> mech.QuantileRelease:
    """A released quantile with a random value and random noisy ladder counts around a random centre."""
    grid = comp.quantile_grid(plan, m)
    cuts = mech.ladder(int(rng.integers(0, grid.size)), grid.size)
    bins = rng.integers(-3, 50, len(cuts) + 1)
    return mech.QuantileRelease(float(rng.uniform(grid.lo, grid.hi)), cuts, bins, 5.0, m.q, grid)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("sql", PROJECTIONS)
def test_a_projection_is_released_as_the_public_engine_would(sql: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_query(sql, lambda _: POLICY)
    assert release._projection(plan) is not None
    fast = _post_process(sql, np.random.default_rng(7), False, monkeypatch)
    slow = _post_process(sql, np.random.default_rng(7), True, monkeypatch)
    assert fast.columns == slow.columns
    assert _same(fast.rows, slow.rows), (fast.rows, slow.rows)
    assert _same(fast.intervals, slow.intervals)
    assert fast.flags == slow.flags


@pytest.mark.parametrize("sql", NOT_PROJECTIONS)
def test_other_post_processing_runs_on_the_public_engine(sql: str) -> None:
    assert release._projection(plan_query(sql, lambda _: POLICY)) is None


def test_a_date_key_is_released_as_text(monkeypatch: pytest.MonkeyPatch) -> None:
    sql = "SELECT visit_day, COUNT(*) AS n FROM visits WHERE visit_day < '2015-01-04' GROUP BY visit_day"
    rows = _post_process(sql, np.random.default_rng(1), False, monkeypatch).rows
    keys = [r[0] for r in rows]
    assert keys and all(isinstance(k, str) for k in keys)
    assert all(isinstance(dt.date.fromisoformat(k), dt.date) for k in keys)


def test_duckdb_sums_fixed_point_integers_exactly_as_hugeint(tmp_path: Path) -> None:
    engine = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    big = 2**62
    engine.connect().execute(
        'CREATE TABLE bounded_t ("__fx_x" BIGINT, "x" DOUBLE); '
        f"INSERT INTO bounded_t VALUES ({big}, 1), ({big}, 1), ({big}, 1), (-1, 1)"
    )
    exact = exp.Sum(this=exp.Cast(this=exp.column("__fx_x", quoted=True), to=exp.DataType.build("DECIMAL(38, 0)")))
    floats = exp.Sum(this=exp.Cast(this=exp.column("x", quoted=True), to=exp.DataType.build("DECIMAL(38, 0)")))
    query = exp.select(exp.Coalesce(this=exact, expressions=[exp.Literal.number(0)]), floats).from_("bounded_t")
    generated = engine._sql(query)
    # Only the fixed-point column's cast changes, to DuckDB's 128-bit integer (INT128 is HUGEINT) ...
    assert generated.count("DECIMAL(38, 0)") == 1 and generated.count("INT128") == 1
    # ... and DuckDB sums it as such, not with the 64-bit sum it chooses for a bare BIGINT column when the table's
    # statistics prove that cannot overflow (a plan chosen from the data).
    con = engine.connect()
    con.execute('CREATE TABLE bounded_small ("__fx_x" BIGINT, "x" DOUBLE); INSERT INTO bounded_small VALUES (1, 1)')
    small = query.from_("bounded_small")
    assert "sum_no_overflow" not in str(con.execute(f"EXPLAIN {engine._sql(small)}").fetchall())
    assert "sum_no_overflow" in str(con.execute('EXPLAIN SELECT SUM("__fx_x") FROM bounded_small').fetchall())
    assert "DECIMAL" in query.sql(dialect="duckdb").split("COALESCE")[1]  # the compiled tree is unchanged
    (row,) = engine.rows(query)
    assert row[0] == 3 * big - 1  # beyond BIGINT: summed as a 128-bit integer, exactly
    assert row[1] == 4
    engine.check(query)
    with pytest.raises(EngineError):  # a statement that does not bind is refused every time, never remembered
        engine.check(exp.select(exp.column("nope")).from_("bounded_t"))
    with pytest.raises(EngineError):
        engine.check(exp.select(exp.column("nope")).from_("bounded_t"))
    engine.close()
