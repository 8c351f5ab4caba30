"""Empirical ε of a period-filtered COUNT on a dataset with periods, on neighbours differing in one unit-period.

D′ is an ordinary dataset with a monthly period; D is D′ plus one unit's 3k rows in June only (bounding keeps k of
them in that (unit, period)). The query `COUNT(*) ... WHERE day >= '2024-06-01'` is charged June alone; its exact
input to OpenDP is recorded on both datasets through the real executor (as the SQL audit does), then drawn many times
through the real mechanism. The Clopper–Pearson lower bound on ε at 99% must not exceed the ε June is charged; with
half the noise scale it must exceed it (the audit can fail). A neighbour differing in a unit-period of another month
gives the same exact input (the filter reads June only), so the release has the same distribution there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from policies.schema import Policy, parse_policy
from tests.privacy.test_sql_epsilon import bound, integer_hits, mechanism_inputs

K = 2
EPSILON = 1.0
DRAWS = 20_000
POLICY = parse_policy(
    {
        "dataset": "visits",
        "privacy_unit": "patient_id",
        "max_rows_per_unit": K,
        "budget": {"per_principal": {"epsilon": 100.0}, "total": {"epsilon": 100.0}},
        "columns": {
            "patient_id": {"type": "int", "usage": "hidden"},
            "day": {"type": "date", "bounds": ["2024-01-01", "2024-06-30"]},
        },
        "roles": {"analyst": ["query"]},
        "period": {"column": "day", "every": "month"},
    }
)
SQL = "SELECT COUNT(*) FROM visits WHERE day >= '2024-06-01'"


def _rows(extra_month: int | None) -> str:
    lines = [f"{u},2024-{m:02d}-{1 + (u + m) % 28:02d}" for u in range(50) for m in range(1, 7)]
    if extra_month is not None:
        lines += [f"999,2024-{extra_month:02d}-{d:02d}" for d in range(1, 3 * K + 1)]
    return "patient_id,day\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DuckDBEngine]]:
    root = tmp_path_factory.mktemp("period-epsilon")
    out = {}
    for name, month in (("d_june", 6), ("d_january", 1), ("d_prime", None)):
        (root / f"{name}.csv").write_text(_rows(month))
        engine = DuckDBEngine(root / f"{name}.duckdb", root / "key", read_only=False)
        engine.register(POLICY, root / f"{name}.csv")
        out[name] = engine
    yield out
    for engine in out.values():
        engine.close()


def _resolve(name: str) -> Policy:
    return POLICY


def test_a_period_filtered_count_is_epsilon_dp_for_one_unit_period(engines: dict[str, DuckDBEngine]) -> None:
    plan = plan_query(SQL, _resolve)
    assert plan.periods == ("2024-06",)
    pricing = price(plan, epsilon=EPSILON, accuracy=None, alpha=0.05, delta=None)
    (on_d,) = mechanism_inputs(plan, pricing, engines["d_june"]).integers
    (on_d_prime,) = mechanism_inputs(plan, pricing, engines["d_prime"]).integers
    (on_other,) = mechanism_inputs(plan, pricing, engines["d_january"]).integers
    assert on_d["d_in"] == on_d_prime["d_in"] == K and on_d["epsilon"] == pytest.approx(EPSILON)
    assert on_d["values"][0] - on_d_prime["values"][0] == K  # bounding kept k of the unit's 3k June rows
    assert on_other["values"] == on_d_prime["values"]  # a unit-period of January is never read
    calibrated = bound(*integer_hits(on_d["values"], on_d_prime["values"], K, EPSILON, DRAWS))
    control = bound(*integer_hits(on_d["values"], on_d_prime["values"], K, 2 * EPSILON, DRAWS))
    assert calibrated <= EPSILON, calibrated
    assert control > EPSILON, control
