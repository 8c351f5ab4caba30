"""Per-cell flags: noise-dominated cells are marked, from DP outputs and public parameters only."""

from __future__ import annotations

import numpy as np
import yaml

from gateway.demo import POLICY_YAML
from gateway.http.query import QueryResponse
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from gateway.sql.release import NOISE_DOMINATED, _flags, _interval, quantile_min_rows
from policies.schema import parse_policy
from tests.conftest import Workspace

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))


def test_flag_rule_is_a_function_of_value_and_interval() -> None:
    assert _flags(100.0, [90.0, 110.0], thin=False) == []
    assert _flags(3.0, [0.0, 13.0], thin=False) == [NOISE_DOMINATED]  # half-width 10 > 3
    assert _flags(-3.0, [-13.0, 7.0], thin=False) == [NOISE_DOMINATED]
    assert _flags(None, [0.0, 500_000.0], thin=False) == [NOISE_DOMINATED]  # a mean over a noisy count below 1
    assert _flags("north", None, thin=False) == []  # keys are public
    assert _flags(41_000.0, None, thin=True) == [NOISE_DOMINATED]  # a quantile of a group with too few rows
    assert _flags(41_000.0, None, thin=False) == []


def test_quantile_threshold_is_public_and_grows_with_the_noise() -> None:
    plan = plan_query("SELECT COUNT(*), MEDIAN(income) FROM visits", lambda _: POLICY)
    (m,) = [m for m in plan.measurements if m.kind == "quantile"]
    low = quantile_min_rows(plan, price(plan, epsilon=0.1, accuracy=None, alpha=0.05, delta=None), m)
    high = quantile_min_rows(plan, price(plan, epsilon=10.0, accuracy=None, alpha=0.05, delta=None), m)
    assert low > high > 0


def test_empty_groups_are_flagged_and_full_ones_are_not(workspace: Workspace) -> None:
    # Only the north region has rows: the other four groups are empty and their medians are noise.
    sql = (
        "SELECT region, COUNT(*) AS n, MEDIAN(income) AS med, AVG(income) AS mean FROM visits "
        "WHERE region = 'north' GROUP BY region"
    )
    with workspace.app() as c:
        h = workspace.headers("analyst")
        dry = c.post("/v1/query", json={"sql": sql, "epsilon": 2, "dry_run": True}, headers=h).json()
        body = c.post("/v1/query", json={"sql": sql, "epsilon": 2}, headers=h).json()
    QueryResponse.model_validate(body)
    assert dry["flags"] is None
    assert len(body["flags"]) == len(body["rows"]) == 5
    for row, flags in zip(body["rows"], body["flags"], strict=True):
        assert flags[0] == []  # the key
        if row[0] == "north":  # thousands of rows: far above every threshold
            assert flags == [[], [], [], []]
        else:
            assert flags[1] == [NOISE_DOMINATED] or row[1] > 0  # a zero count is always flagged
            assert flags[2] == [NOISE_DOMINATED], (row, flags)  # the median of an empty group


def test_a_median_without_a_count_is_flagged_by_its_interval_alone(workspace: Workspace) -> None:
    # Without a count there is no row threshold, but an empty group's median has an interval as wide as the bounds.
    sql = "SELECT region, MEDIAN(income) AS med FROM visits WHERE region = 'north' GROUP BY region"
    with workspace.app() as c:
        body = c.post("/v1/query", json={"sql": sql, "epsilon": 2}, headers=workspace.headers("analyst")).json()
    for row, cells, flags in zip(body["rows"], body["intervals"], body["flags"], strict=True):
        assert cells[1] is not None and cells[1][0] <= cells[1][1]
        assert flags == ([[], []] if row[0] == "north" else [[], [NOISE_DOMINATED]]), (row, cells, flags)
    assert any("add COUNT(*)" in n for n in body["notes"])


def test_a_count_whose_noise_is_below_minus_its_half_width_is_flagged_with_an_ordered_interval() -> None:
    # An empty group whose noisy count fell more than one half-width below zero: released as 0, and its interval
    # clamped at 0 used to come out inverted ([0, negative]) and unflagged.
    plan = plan_query("SELECT region, COUNT(*) AS n FROM visits GROUP BY region", lambda _: POLICY)
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
    (m,) = plan.measurements
    hw = pricing.half_width(m, 0.05)
    lo, hi = _interval(plan, pricing, m, np.asarray([-hw - 5.0, -hw / 2, 3 * hw]), 0.05)
    assert (lo <= hi).all() and (lo >= 0).all()
    assert _flags(0.0, [float(lo[0]), float(hi[0])], thin=False) == [NOISE_DOMINATED]
    assert _flags(0.0, [float(lo[1]), float(hi[1])], thin=False) == [NOISE_DOMINATED]
    assert _flags(3 * hw, [float(lo[2]), float(hi[2])], thin=False) == []
