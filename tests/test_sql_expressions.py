"""Aggregates of row expressions (SUM(age + 1), SUM(CASE WHEN ... THEN x ELSE 0 END), AVG(income / 1000),
COUNT(CASE WHEN ... THEN 1 END)): the ranges the planner derives from the policy's bounds, the sensitivities and
fixed-point units it prices them with, the measurements' identity, refusals before the charge, the exact sums the
compiled statement computes, and the coverage of the released intervals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql import compile as comp
from gateway.sql.plan import Kind, Measurement, Plan, plan_query
from gateway.sql.price import measurement_unit, price
from gateway.sql.release import execute
from policies import sensitivity as sens
from policies.accountant import Accounting
from policies.errors import QueryRejected
from policies.schema import Policy, parse_policy
from policies.sqltypes import SqlType

K = 3

POLICY = parse_policy(
    yaml.safe_load(f"""
dataset: shop
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 1000, delta: 1.0e-3}}, total: {{epsilon: 1000, delta: 1.0e-3}}}}
columns:
  uid: {{type: int, usage: hidden}}
  kind: {{type: category, domain: [a, b, c]}}
  age: {{type: int, bounds: [0, 110]}}
  amount: {{type: decimal, bounds: [-100, 50], precision: 0.01}}
  score: {{type: float, bounds: [0.5, 2.5]}}
  note: {{type: category}}
roles: {{analyst: [query]}}
""")
)


def _resolve(name: str) -> Policy:
    assert name == "shop"
    return POLICY


def _plan(sql: str) -> Plan:
    return plan_query(sql, _resolve)


def _only_value(plan: Plan) -> tuple[float, float, SqlType]:
    (value,) = plan.row_values.values()
    return value.lo, value.hi, value.typed.type


@pytest.mark.parametrize(
    ("expression", "lo", "hi", "kind"),
    [
        ("age + 1", 1, 111, SqlType.INT),
        ("age * 2 - 1", -1, 219, SqlType.INT),
        ("amount * 2 - 1", -201, 99, SqlType.FLOAT),
        ("-amount", -50, 100, SqlType.FLOAT),
        ("amount / 1000", -0.1, 0.05, SqlType.FLOAT),
        ("amount / score", -200, 100, SqlType.FLOAT),  # a divisor of one sign: corners
        ("amount / age", -100, 50, SqlType.FLOAT),  # an integer divisor: 0 is NULL, else |age| >= 1
        ("age / (age - 10)", -110, 110, SqlType.FLOAT),  # pieces [-10, -1] and [1, 100] of the divisor
        ("CASE WHEN kind = 'a' THEN amount ELSE 0 END", -100, 50, SqlType.FLOAT),
        ("CASE WHEN kind = 'a' THEN score END", 0.5, 2.5, SqlType.FLOAT),  # NULL elsewhere: skipped by SUM
        ("COALESCE(amount, age)", -100, 110, SqlType.FLOAT),
        ("IF(age > 60, 1, 0)", 0, 1, SqlType.INT),
        ("ABS(amount)", 0, 100, SqlType.FLOAT),
        ("ABS(score - 3)", 0.5, 2.5, SqlType.FLOAT),
        ("GREATEST(amount, 0)", 0, 50, SqlType.FLOAT),
        ("LEAST(amount, 10.5)", -100, 10.5, SqlType.FLOAT),
        ("ROUND(amount, -1)", -100, 50, SqlType.FLOAT),
        ("ROUND(score)", 0, 3, SqlType.FLOAT),
        ("FLOOR(score)", 0, 2, SqlType.FLOAT),
        ("SQRT(score)", math.sqrt(0.5), math.sqrt(2.5), SqlType.FLOAT),
        ("POWER(amount, 2)", 0, 10_000, SqlType.FLOAT),
        ("POWER(amount, 3)", -1_000_000, 125_000, SqlType.FLOAT),
        ("CAST(amount AS INT)", -100, 50, SqlType.INT),
        ("CAST(age > 60 AS DOUBLE)", 0, 1, SqlType.FLOAT),
        ("LENGTH(kind)", 0, 200, SqlType.INT),
    ],
)
def test_ranges_follow_the_policy_bounds_through_the_expression(
    expression: str, lo: float, hi: float, kind: SqlType
) -> None:
    got = _only_value(_plan(f"SELECT SUM({expression}) FROM shop"))
    assert got[2] is kind
    assert got[0] == pytest.approx(lo, rel=1e-12, abs=1e-12)
    assert got[1] == pytest.approx(hi, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    ("sql", "unit", "d_in"),
    [
        # integer expressions: unit 1, k rows of max|range| each
        ("SELECT SUM(age + 1) FROM shop", 1.0, K * 111),
        ("SELECT SUM(CASE WHEN age > 60 THEN 1 ELSE 0 END) FROM shop", 1.0, K * 1),
        # a number expression: the least power of two with max|range| / unit <= 2**31; 201 / 2**-23 = 1,686,110,208
        ("SELECT SUM(amount * 2 - 1) FROM shop", 2.0**-23, K * 201 * 2**23),
        # 100 / 2**-24 = 1,677,721,600
        ("SELECT SUM(CASE WHEN kind = 'e' THEN amount ELSE 0 END) FROM shop", 2.0**-24, K * 100 * 2**24),
        # 0.1 / 2**-34 = 1,717,986,918.4: rounded up
        ("SELECT SUM(amount / 1000) FROM shop", 2.0**-34, K * 1_717_986_919),
    ],
)
def test_sum_of_an_expression_is_priced_from_its_range(sql: str, unit: float, d_in: int) -> None:
    plan = _plan(sql)
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    (m,) = plan.measurements
    assert m.kind is Kind.SUM and m.expression and not m.column
    assert measurement_unit(plan, m) == unit
    assert pricing.d_in[m] == d_in
    assert pricing.l2[m] == d_in  # k rows in one group is the worst case, as for a column: L2 = L1
    (value,) = plan.row_values.values()
    assert value.max_abs / value.unit <= 2**31


def test_fixed_point_unit_is_the_least_power_of_two_that_fits() -> None:
    for max_abs in (1e-9, 0.1, 1.0, 100.0, 201.0, 2.0**31, 3e9, 5e5, 1e150):
        unit = sens.fixed_point_unit(max_abs, integral=False)
        assert math.frexp(unit)[0] == 0.5  # a power of two
        assert max_abs / unit <= 2**31 < max_abs / (unit / 2)
    assert sens.fixed_point_unit(111, integral=True) == 1.0
    assert sens.fixed_point_unit(2.0**33, integral=True) == 4.0
    assert sens.fixed_point_unit(0.0, integral=False) == 1.0


def test_avg_variance_and_count_of_an_expression() -> None:
    plan = _plan("SELECT AVG(age * 2 - 1), VARIANCE(age * 2 - 1), COUNT(CASE WHEN kind = 'a' THEN 1 END) FROM shop")
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    by_kind = {(m.kind, m.expression): pricing.d_in[m] for m in plan.measurements}
    assert by_kind == {
        (Kind.SUM, "age * 2 - 1"): K * 219,
        (Kind.COUNT, "age * 2 - 1"): K,
        (Kind.SUMSQ, "age * 2 - 1"): K * 219**2,
        (Kind.COUNT, "CASE WHEN kind = 'a' THEN 1 END"): K,
    }
    # The AVG and the VARIANCE of one expression share its SUM and COUNT, as for a column.
    assert len(plan.measurements) == 4
    labels = sorted(m.label for m in plan.measurements)
    assert labels == [
        "count(CASE WHEN kind = 'a' THEN 1 END)",
        "count(age * 2 - 1)",
        "sum(age * 2 - 1)",
        "sumsq(age * 2 - 1)",
    ]


def test_different_expressions_never_share_a_measurement() -> None:
    plan = _plan("SELECT SUM(age + 1), SUM(age + 2), SUM(AGE+1), SUM(age), SUM((age)) FROM shop")
    sums = [m for m in plan.measurements if m.kind is Kind.SUM]
    # age + 1 and AGE+1 normalize alike; (age) is the column itself.
    assert sorted((m.column, m.expression) for m in sums) == [("", "age + 1"), ("", "age + 2"), ("age", "")]
    assert len({a.alias for a in plan.aggregates}) == 3
    one, two = _plan("SELECT SUM(age + 1) FROM shop"), _plan("SELECT SUM(age + 2) FROM shop")
    assert one.normalized_sql != two.normalized_sql and one.measurements != two.measurements


@pytest.mark.parametrize(
    ("sql", "reason", "highlighted"),
    [
        ("SELECT SUM(age / (amount - 1)) FROM shop", "unbounded_expression", "age / (amount - 1)"),
        ("SELECT SUM(age + LN(amount)) FROM shop", "unbounded_expression", "LN(amount)"),
        ("SELECT AVG(age + EXP(age * 10)) FROM shop", "unbounded_expression", "EXP(age * 10)"),
        ("SELECT SUM(POWER(age, 9)) FROM shop", "unbounded_expression", "POWER(age, 9)"),
        ("SELECT SUM(CAST(note AS DOUBLE) + 1) FROM shop", "unbounded_expression", "CAST(note AS DOUBLE)"),
        ("SELECT SUM(kind = 'a') FROM shop", "aggregate_argument", "SUM(kind = 'a')"),
        ("SELECT VARIANCE(CASE WHEN age > 1 THEN note END) FROM shop", "aggregate_argument", None),
        ("SELECT SUM(age + AVG(age)) FROM shop", "nested_aggregate", None),
        ("SELECT COUNT(age + note) FROM shop", "type_error", "note"),
        ("SELECT SUM(uid * 2) FROM shop", "privacy_unit_column", "uid"),
    ],
)
def test_refusals_name_the_sub_expression(sql: str, reason: str, highlighted: str | None) -> None:
    with pytest.raises(QueryRejected) as refused:
        _plan(sql)
    assert refused.value.reason == reason, refused.value.message
    if highlighted is not None:
        assert f"'{highlighted}'" in refused.value.message or f'"{highlighted}"' in refused.value.message


def test_the_row_expressions_are_checked_for_backtracking_patterns() -> None:
    plan = _plan("SELECT COUNT(CASE WHEN note LIKE '%a_b%' THEN 1 END) FROM shop")
    assert comp.backtracking_pattern(plan.row_trees) is not None


# --- on the real engine ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> DuckDBEngine:
    """300 units of 3 rows, and one unit of 500 rows beyond every bound."""
    d = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(7)
    n = 900
    ordinary = pd.DataFrame(
        {
            "uid": np.repeat(np.arange(300), 3),
            "kind": rng.choice(["a", "b", "c"], n),
            "age": rng.integers(0, 111, n),
            "amount": np.round(rng.uniform(-100, 50, n), 2),
            "score": rng.uniform(0.5, 2.5, n),
            "note": rng.choice(["x", "y"], n),
        }
    )
    heavy = pd.DataFrame(
        {"uid": 999, "kind": "a", "age": 500, "amount": -1e9, "score": 99.0, "note": "x"},
        index=range(500),
    )
    pd.concat([ordinary, heavy], ignore_index=True).to_csv(d / "shop.csv", index=False)
    cat = DuckDBEngine(d / "db.duckdb", d / "key", read_only=False)
    cat.register(POLICY, d / "shop.csv")
    return cat


def _truth(cat: DuckDBEngine, expression: str, by: str | None = None) -> dict[object, float]:
    """The exact aggregate of an expression over the pre-bounded table, straight from DuckDB."""
    con = cat.connect()
    if by is None:
        (value,) = con.execute(f"SELECT COALESCE({expression}, 0) FROM bounded_shop").fetchall()[0]
        return {1: float(value)}
    rows = con.execute(f"SELECT {by}, {expression} FROM bounded_shop GROUP BY {by}").fetchall()
    return {r[0]: float(r[1]) for r in rows}


EXACT = (
    "age * 2 - 1",
    "CASE WHEN kind = 'a' THEN amount ELSE 0 END",
    "amount / 1000",
    "amount / score",
    "ROUND(score, 1) * age",
)


@pytest.mark.parametrize("expression", EXACT)
def test_the_measured_sum_is_the_exact_sum_in_fixed_point(shop: DuckDBEngine, expression: str) -> None:
    """The compiled statement's fixed-point sum, times its unit, is the sum of the expression over the bounded table
    to within half a unit per row (rounding), and the count is the count of its non-NULL values."""
    plan = _plan(f"SELECT AVG({expression}) FROM shop")
    (row,) = shop.rows(comp.measurement_query(plan))
    measures = comp.plain_measurements(plan)
    by_kind = {m.kind: int(v) for m, v in zip(measures, row[1:], strict=True)}
    (value,) = plan.row_values.values()
    truth_sum = _truth(shop, f"SUM({expression})")[1]
    truth_count = _truth(shop, f"COUNT({expression})")[1]
    assert by_kind[Kind.COUNT] == truth_count
    assert abs(by_kind[Kind.SUM] * value.unit - truth_sum) <= truth_count * value.unit / 2 + 1e-9 * abs(truth_sum)


def test_the_heavy_unit_is_clamped_by_the_policy_bounds(shop: DuckDBEngine) -> None:
    """The 500-row unit beyond every bound keeps k rows at the bounds: its rows' expression values stay within the
    propagated range, so no row moves a sum by more than the sensitivity."""
    plan = _plan("SELECT SUM(amount * 2 - 1) FROM shop WHERE age >= 110")
    (row,) = shop.rows(comp.measurement_query(plan))
    (value,) = plan.row_values.values()
    heavy = K * (-201)  # k rows at amount = -100, age = 110
    ordinary = _truth(shop, "SUM(amount * 2 - 1) FILTER (WHERE age >= 110 AND uid <> 999)")[1]
    assert int(row[1]) * value.unit == pytest.approx(heavy + ordinary, abs=K * value.unit)


def test_intervals_of_expression_sums_cover_the_truth(shop: DuckDBEngine) -> None:
    """95% intervals of SUM(CASE WHEN ... THEN amount ELSE 0 END) per group cover the exact sum over the bounded
    table at the stated rate: 3 groups × 400 releases, binomial(1200, 0.95) is below 0.93 with probability < 1e-3;
    the spread of the errors matches the discrete Laplace scale k·100/ε."""
    expression = "CASE WHEN age < 60 THEN amount ELSE 0 END"
    eps = 1.0
    plan = _plan(f"SELECT kind, SUM({expression}) FROM shop GROUP BY kind")
    pricing = price(plan, epsilon=eps, accuracy=None, alpha=0.05, delta=None)
    truth = _truth(shop, f"SUM({expression})", by="kind")
    errors, covered = [], 0
    for _ in range(400):
        release = execute(plan, pricing, shop)
        for (kind, value), cells in zip(release.rows, release.intervals, strict=True):
            assert cells[1] is not None
            lo, hi = cells[1]
            errors.append(value - truth[kind])
            covered += lo <= truth[kind] <= hi
    n = len(errors)
    assert covered / n >= 0.93, covered / n
    (m,) = plan.measurements
    scale = pricing.d_in[m] / eps * measurement_unit(plan, m)  # in the expression's own unit: k·100/ε
    assert scale == pytest.approx(K * 100 / eps)
    expected_sd = math.sqrt(2) * scale  # a discrete Laplace this coarse is a Laplace
    assert 0.85 < float(np.std(errors)) / expected_sd < 1.15


def test_intervals_of_expression_means_cover_the_truth(shop: DuckDBEngine) -> None:
    expression = "amount / score"
    plan = _plan(f"SELECT kind, AVG({expression}) FROM shop GROUP BY kind")
    pricing = price(plan, epsilon=2.0, accuracy=None, alpha=0.05, delta=None)
    truth = _truth(shop, f"AVG({expression})", by="kind")
    covered, n = 0, 0
    for _ in range(300):
        release = execute(plan, pricing, shop)
        for (kind, value), cells in zip(release.rows, release.intervals, strict=True):
            assert cells[1] is not None
            lo, hi = cells[1]
            assert -200 <= lo <= value <= hi <= 100  # within the expression's range
            covered += lo <= truth[kind] <= hi
            n += 1
    assert covered / n >= 0.93, covered / n


def test_answers_label_the_expression(shop: DuckDBEngine) -> None:
    plan = _plan("SELECT SUM(age + 1) AS s, COUNT(CASE WHEN kind = 'a' THEN 1 END) AS n FROM shop")
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    release = execute(plan, pricing, shop)
    labels = {entry["measurement"]: entry["sensitivity"] for entry in release.measurements}
    assert labels == {"sum(age + 1)": K * 111, "count(CASE WHEN kind = 'a' THEN 1 END)": K}
    assert Measurement(Kind.SUM, expression="age + 1") in pricing.d_in


def test_zcdp_release_of_an_expression_sum(shop: DuckDBEngine) -> None:
    """Under zCDP the sum of an expression gets the discrete Gaussian at its L2 sensitivity (= L1, as for a column);
    over repeated releases its 95% intervals cover the exact sum."""
    expression = "amount * 2 - 1"
    plan = _plan(f"SELECT SUM({expression}) FROM shop")
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None, accounting=Accounting.ZCDP)
    (m,) = plan.measurements
    assert pricing.gaussian(m) and pricing.l2[m] == K * 201 * 2**23
    truth = _truth(shop, f"SUM({expression})")[1]
    covered = 0
    for _ in range(200):
        release = execute(plan, pricing, shop)
        ((value,),), ((interval,),) = release.rows, release.intervals
        assert interval is not None and interval[0] <= value <= interval[1]
        covered += interval[0] <= truth <= interval[1]
    # binomial(200, 0.95) is below 0.9 with probability < 1e-3
    assert covered / 200 >= 0.9, covered


def test_accuracy_target_of_an_expression_sum() -> None:
    """An accuracy target (95% half-width in the expression's own unit) prices an expression's SUM like a column's:
    the ε bought gives a half-width within the target and not far below it."""
    plan = _plan("SELECT SUM(amount * 2 - 1) AS s FROM shop")
    pricing = price(plan, epsilon=None, accuracy=5_000.0, alpha=0.05, delta=None)
    (m,) = plan.measurements
    half = pricing.half_width(m, 0.05) * measurement_unit(plan, m)
    assert 0.9 * 5_000 <= half <= 5_000
