"""Privacy core on the real stack: contribution bounding, noise scale, interval coverage, key selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies import mechanisms as mech
from policies.accountant import Accounting
from policies.schema import parse_policy

K = 5


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory) -> DuckDBEngine:
    """200 ordinary units with 3 rows each, and one unit with 10,000 rows."""
    d = tmp_path_factory.mktemp("heavy")
    units = np.concatenate([np.repeat(np.arange(200), 3), np.full(10_000, 999)])
    frame = pd.DataFrame(
        {
            "uid": units,
            "kind": np.where(np.arange(len(units)) % 2 == 0, "a", "b"),
            "value": np.where(units == 999, 100, 10),
            "tag": np.where(units == 999, "rare", np.where(units % 2 == 0, "even", "odd")),
        }
    )
    frame.to_csv(d / "heavy.csv", index=False)
    policy = parse_policy(
        yaml.safe_load(f"""
dataset: heavy
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 1000, delta: 1.0e-3}}, total: {{epsilon: 1000, delta: 1.0e-3}}}}
columns:
  uid: {{type: int, usage: hidden}}
  kind: {{type: category, domain: [a, b]}}
  value: {{type: int, bounds: [0, 100]}}
  tag: {{type: category}}
roles: {{analyst: [query]}}
""")
    )
    cat = DuckDBEngine(d / "db.duckdb", d / "key", read_only=False)
    cat.register(policy, d / "heavy.csv")
    return cat


def _run(cat: DuckDBEngine, sql: str, epsilon: float, alpha: float = 0.05):
    plan = plan_query(sql, lambda n: cat.policy(n)[0])
    pricing = price(plan, epsilon=epsilon, accuracy=None, alpha=alpha, delta=None)
    return plan, pricing, execute(plan, pricing, cat)


def test_bounded_table_keeps_at_most_k_rows_per_unit(heavy: DuckDBEngine) -> None:
    con = heavy.connect()
    per_unit = dict(con.execute("SELECT uid, COUNT(*) FROM bounded_heavy GROUP BY uid").fetchall())
    assert max(per_unit.values()) == K and per_unit[999] == K
    total = con.execute("SELECT COUNT(*) FROM bounded_heavy").fetchone()
    assert total is not None
    assert total[0] == 200 * 3 + K


def test_heavy_unit_moves_count_by_at_most_k_plus_noise(heavy: DuckDBEngine) -> None:
    _, pricing, release = _run(heavy, "SELECT COUNT(*) FROM heavy", epsilon=50.0)
    (value,), ((lo, hi),) = release.rows[0], release.intervals[0]
    assert lo <= value <= hi
    true_bounded = 200 * 3 + K
    # The 10,000-row unit contributes at most K rows: the answer is nowhere near 10,600.
    assert abs(value - true_bounded) <= (hi - lo)
    assert value < 200 * 3 + 10_000 / 2


def test_sum_sensitivity_and_clamping(heavy: DuckDBEngine) -> None:
    plan, pricing, release = _run(heavy, "SELECT SUM(value) FROM heavy", epsilon=100.0)
    (m,) = plan.measurements
    assert pricing.d_in[m] == K * 100  # k rows, each at most the upper bound
    value = release.rows[0][0]
    assert abs(value - (600 * 10 + K * 100)) <= release.intervals[0][0][1] - release.intervals[0][0][0]


def test_noise_spread_matches_scale_and_intervals_cover(heavy: DuckDBEngine) -> None:
    eps = 2.0
    plan = plan_query("SELECT kind, COUNT(*) FROM heavy GROUP BY kind", lambda n: heavy.policy(n)[0])
    pricing = price(plan, epsilon=eps, accuracy=None, alpha=0.05, delta=None)
    con = heavy.connect()
    truth = dict(con.execute("SELECT kind, COUNT(*) FROM bounded_heavy GROUP BY kind").fetchall())
    errors, covered, n = [], 0, 0
    for _ in range(400):
        release = execute(plan, pricing, heavy)
        for (kind, value), cells in zip(release.rows, release.intervals, strict=True):
            interval = cells[1]
            assert interval is not None
            lo, hi = interval
            errors.append(value - truth[kind])
            covered += lo <= truth[kind] <= hi
            n += 1
    scale = K / eps  # one measurement: all of ε, sensitivity K
    t = 1.0 / scale
    expected_var = 2 * math.exp(-t) / (1 - math.exp(-t)) ** 2  # discrete Laplace variance
    assert abs(np.mean(errors)) < 4 * math.sqrt(expected_var / n)
    assert 0.8 < np.var(errors) / expected_var < 1.25
    # 95% intervals: binomial(800, 0.95) lies within [0.93, 0.97] with overwhelming probability.
    assert 0.93 <= covered / n <= 0.975


@pytest.mark.parametrize("accounting", [Accounting.PURE, Accounting.ZCDP])
def test_avg_intervals_cover_and_are_tight(heavy: DuckDBEngine, accounting: Accounting) -> None:
    """AVG's interval comes from the distribution of its combined error (Laplace or Gaussian noise): it covers the
    true mean at ≥ 95% and is not much wider than the errors are (a union bound over the SUM and COUNT intervals
    was 1.7× the p95 error)."""
    eps = 1.0
    plan = plan_query("SELECT kind, AVG(value) FROM heavy GROUP BY kind", lambda n: heavy.policy(n)[0])
    pricing = price(plan, epsilon=eps, accuracy=None, alpha=0.05, delta=None, accounting=accounting)
    assert pricing.gaussian(plan.measurements[0]) is (accounting is Accounting.ZCDP)
    con = heavy.connect()
    truth = dict(con.execute("SELECT kind, AVG(value) FROM bounded_heavy GROUP BY kind").fetchall())
    errors, half_widths, covered = [], [], 0
    for _ in range(500):
        release = execute(plan, pricing, heavy)
        for (kind, value), cells in zip(release.rows, release.intervals, strict=True):
            assert cells[1] is not None
            lo, hi = cells[1]
            errors.append(abs(value - truth[kind]))
            half_widths.append((hi - lo) / 2)
            covered += lo <= truth[kind] <= hi
    n = len(errors)
    # binomial(1000, 0.95) is below 0.93 with probability < 1e-3
    assert covered / n >= 0.93, covered / n
    p95 = float(np.quantile(errors, 0.95))
    assert np.median(half_widths) <= 1.3 * p95, (np.median(half_widths), p95)


FUNCTIONS = (
    "ROUND(AVG(value), 1)",
    "ABS(SUM(value) - 1500)",
    "SQRT(VARIANCE(value))",
    "LN(COUNT(*))",
    "POWER(COUNT(*) - 300, 2)",
    "LOG10(COUNT(*))",
    "FLOOR(AVG(value))",
    "EXP(AVG(value) / 10)",
    "CBRT(SUM(value) - 1500)",
)


def test_functions_of_aggregates_get_intervals_that_cover(heavy: DuckDBEngine) -> None:
    """ROUND, ABS, SQRT, LN, POWER, LOG, FLOOR, EXP and CBRT (increasing over all reals, so an interval across zero
    too) of aggregates carry the interval of their argument through their monotone pieces; every cell holds its
    value, and the intervals cover the truth at ≥ 95%."""
    select = ", ".join(f"{f} AS f{i}" for i, f in enumerate(FUNCTIONS))
    sql = f"SELECT kind, {select} FROM heavy GROUP BY kind"
    plan = plan_query(sql, lambda n: heavy.policy(n)[0])
    pricing = price(plan, epsilon=5.0, accuracy=None, alpha=0.05, delta=None)
    truth = {
        row[0]: row[1:]
        for row in heavy.connect().execute(f"SELECT kind, {select} FROM bounded_heavy GROUP BY kind").fetchall()
    }
    covered = np.zeros(len(FUNCTIONS))
    n = 0
    for _ in range(150):
        release = execute(plan, pricing, heavy)
        for row, cells in zip(release.rows, release.intervals, strict=True):
            n += 1
            for j, (value, cell) in enumerate(zip(row[1:], cells[1:], strict=True)):
                assert cell is not None, FUNCTIONS[j]
                lo, hi = cell
                assert lo <= value <= hi, (FUNCTIONS[j], lo, value, hi)
                covered[j] += lo <= truth[row[0]][j] <= hi
    # binomial(300, 0.95) is below 0.91 with probability < 1e-3
    assert np.all(covered / n >= 0.91), dict(zip(FUNCTIONS, covered / n, strict=True))


def test_a_function_outside_its_domain_has_no_interval(heavy: DuckDBEngine) -> None:
    """SQRT of an interval that reaches below zero, or LN of one that reaches zero, has none (not a made-up one)."""
    _, _, release = _run(heavy, "SELECT SQRT(SUM(value) - 1000000), LN(COUNT(*) - 1000000) FROM heavy", 1.0)
    assert release.intervals[0] == [None, None]


def test_undeclared_keys_need_selection_and_rare_keys_stay_hidden(heavy: DuckDBEngine) -> None:
    plan, pricing, release = _run(heavy, "SELECT tag, COUNT(*) FROM heavy GROUP BY tag", epsilon=1.0)
    assert plan.needs_key_selection and pricing.cost.delta > 0
    tags = {row[0] for row in release.rows}
    assert tags == {"even", "odd"}  # "rare" has only K rows in the bounded table: below any threshold
    assert any("threshold" in n for n in release.notes)


def test_quantile_lands_near_the_truth(heavy: DuckDBEngine) -> None:
    _, _, release = _run(heavy, "SELECT MEDIAN(value) FROM heavy", epsilon=5.0)
    assert release.rows[0][0] == pytest.approx(10, abs=2)
    assert release.measurements[0]["rank_error"] > 0


def test_threshold_calibration_meets_delta() -> None:
    scale, threshold = mech.threshold_for(5, 1.0, 1e-7)
    assert scale == 5.0 and threshold > 5
    assert mech.threshold_for(5, 1.0, 1e-9)[1] > threshold


def test_epsilon_for_accuracy_roundtrips() -> None:
    eps = mech.epsilon_for_accuracy(10, 50.0, 0.05)
    assert mech.integer_accuracy(10 / eps, 0.05) == pytest.approx(50.0, rel=1e-6)


def test_pums_with_nulls_as_second_dataset(tmp_path: Path) -> None:
    data = Path(__file__).parent / "data"
    policy = parse_policy({**yaml.safe_load((data / "pums.yaml").read_text()), "dataset": "pums_null"})
    cat = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    cat.register(policy, data / "PUMS_null.csv")
    nulls = cat.connect().execute("SELECT COUNT(*) - COUNT(income) FROM bounded_pums_null").fetchone()
    assert nulls is not None
    assert nulls[0] > 0
    plan = plan_query(
        "SELECT sex, COUNT(income) AS n, AVG(income) AS m FROM pums_null GROUP BY sex", lambda n: cat.policy(n)[0]
    )
    release = execute(plan, price(plan, epsilon=5.0, accuracy=None, alpha=0.05, delta=None), cat)
    assert [r[0] for r in release.rows] == [0, 1]
    for row, cells in zip(release.rows, release.intervals, strict=True):
        interval = cells[2]
        assert interval is not None
        assert 0 <= interval[0] <= row[2] <= interval[1] <= 500_000
