"""Value-only quantiles (request option quantile_interval false): one selection at the quantile's whole ε over a fine
public grid of the column's bounds, no interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.http.query import QueryResponse
from gateway.service import Bastion, Context
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies import mechanisms as mech
from policies import sensitivity as sens
from tests.conftest import Workspace

MEDIAN_SQL = "SELECT MEDIAN(income) AS m FROM visits"


def test_the_grid_is_every_integer_of_a_narrow_integer_column_else_fine_steps_of_the_bounds() -> None:
    ages = mech.quantile_value_grid(0, 110, integer=True)
    assert (ages.lo, ages.step, ages.size, ages.integer) == (0.0, 1.0, 111, True)
    wide = mech.quantile_value_grid(0, 10**7, integer=True)
    assert wide.size == mech.QUANTILE_VALUE_POSITIONS + 1 and not wide.integer
    scores = mech.quantile_value_grid(0.0, 1000.0, integer=False)
    assert scores.size == mech.QUANTILE_VALUE_POSITIONS + 1
    assert scores.hi == pytest.approx(1000.0) and scores.step == pytest.approx(1000.0 / 2**17)
    # Many groups share a bounded number of candidates, each never fewer than the default's coarse grid.
    assert mech.quantile_value_grid(0.0, 1000.0, False, n_groups=64).size == mech.QUANTILE_VALUE_CANDIDATES // 64 + 1
    assert mech.quantile_value_grid(0.0, 1000.0, False, n_groups=10**6).size == mech.QUANTILE_COARSE + 1


def _counts(values: np.ndarray, grid: mech.QuantileGrid) -> mech.PositionCounts:
    """Exact counts at the grid's codes, as the engine's statement computes them (CEIL(t) + FLOOR(t) + 1)."""
    t = (values - grid.lo) / grid.step
    codes, counts = np.unique((np.ceil(t) + np.floor(t) + 1).astype(np.int64), return_counts=True)
    return mech.PositionCounts(codes, counts.astype(np.int64))


@pytest.mark.parametrize("epsilon", [1.0, 0.1])
def test_the_values_rank_error_follows_the_noise_scale(epsilon: float) -> None:
    """Over many releases the released median's rank error (rows) has a median of about 0.7 noise scales (a row moves
    a candidate's score by QUANTILE_DENOMINATOR, so the scale in rows is scale / D): between 0.4 and 1.0 of them,
    and far below what the same ε would give the default's point at its 80% share; no interval is released."""
    rng = np.random.default_rng(5)
    values = np.clip(rng.normal(480.0, 150.0, 20_000), 0.0, 1000.0)
    grid = mech.quantile_value_grid(0.0, 1000.0, integer=False)
    counts = _counts(values, grid)
    d_in = sens.quantile_sensitivity(5, 0.5)
    ordered = np.sort(values)
    ranks = []
    for _ in range(300):
        r = mech.release_quantile_value(counts, grid, 0.5, d_in, epsilon)
        assert not r.has_interval and r.interval(0.05) == (0, grid.size - 1)
        ranks.append(abs(np.searchsorted(ordered, r.value) - len(values) / 2))
    rows = 2 * d_in / epsilon / mech.QUANTILE_DENOMINATOR  # the noise scale in rows of rank
    assert r.point_scale == pytest.approx(2 * d_in / epsilon)
    assert 0.4 * rows <= float(np.median(ranks)) <= 1.0 * rows, (np.median(ranks), rows)
    # every release is within the selection's rank error at alpha = 1% except a few
    bound = mech.quantile_point_rank_error(d_in, epsilon, 0.5, 0.01, grid.size)
    assert np.mean(np.asarray(ranks) > bound + 1) <= 0.05


def test_an_empty_input_still_releases_a_value_of_the_grid() -> None:
    grid = mech.quantile_value_grid(0, 20, integer=True)
    none = mech.PositionCounts(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    r = mech.release_quantile_value(none, grid, 0.5, 2000, 1.0)
    assert r.value in set(grid.value(np.arange(grid.size)).tolist())


def _query(workspace: Workspace, body: dict) -> dict:
    with workspace.app() as c:
        r = c.post("/v1/query", json=body, headers=workspace.headers("analyst"))
    assert r.status_code == 200, r.text
    return r.json()


def test_value_only_spends_the_requests_epsilon_on_one_selection_and_releases_no_interval(
    workspace: Workspace,
) -> None:
    sql = "SELECT COUNT(*) AS n, MEDIAN(income) AS m, QUANTILE_CONT(age, 0.9) AS p90 FROM visits"
    body = _query(workspace, {"sql": sql, "epsilon": 0.9, "quantile_interval": False})
    QueryResponse.model_validate(body)
    assert body["epsilon_spent"] == pytest.approx(0.9) and body["epsilon"] == pytest.approx(0.9)
    ((n, m, p90),) = body["rows"]
    ((n_cell, m_cell, p90_cell),) = body["intervals"]
    assert n_cell is not None and m_cell is None and p90_cell is None  # counts keep their interval
    assert 0 <= m <= 500_000 and float(p90).is_integer() and 0 <= p90 <= 110
    by_label = {e["measurement"]: e for e in body["measurements"]}
    for label, step, size in (("quantile(income, 0.5)", 500_000 / 2**17, 2**17 + 1), ("quantile(age, 0.9)", 1, 111)):
        e = by_label[label]
        assert e["mechanism"] == "report_noisy_max" and e["quantile_interval"] is False
        assert e["epsilon"] == pytest.approx(0.3) and e["epsilon_split"] == {"point": pytest.approx(0.3)}
        assert e["grid_step"] == pytest.approx(step) and e["candidates"] == size
        assert e["interval"].startswith("none: quantile_interval was false") and e["rank_error"] > 0
    assert math.fsum(e["epsilon"] for e in body["measurements"]) == pytest.approx(0.9)
    assert any("quantile_interval false" in note for note in body["notes"])
    assert body["flags"] == [[[], [], []]] or all(f in ([], ["noise_dominated"]) for f in body["flags"][0])


def test_the_default_still_releases_an_interval_and_the_modes_are_cached_apart(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        default = c.post("/v1/query", json={"sql": MEDIAN_SQL, "epsilon": 0.5}, headers=h).json()
        value = c.post(
            "/v1/query", json={"sql": MEDIAN_SQL, "epsilon": 0.5, "quantile_interval": False}, headers=h
        ).json()
        again = c.post(
            "/v1/query", json={"sql": MEDIAN_SQL, "epsilon": 0.5, "quantile_interval": False}, headers=h
        ).json()
    assert default["intervals"][0][0] is not None and default["measurements"][0]["quantile_interval"] is True
    assert set(default["measurements"][0]["epsilon_split"]) == {"centre", "interval", "point"}
    assert not value["cached"] and value["epsilon_spent"] == pytest.approx(0.5)  # not the default's answer
    assert value["intervals"][0][0] is None
    assert again["cached"] and again["rows"] == value["rows"] and again["epsilon_spent"] == 0.0


def test_the_dry_run_shows_the_mode(workspace: Workspace) -> None:
    dry = _query(workspace, {"sql": MEDIAN_SQL, "epsilon": 0.5, "quantile_interval": False, "dry_run": True})
    assert dry["dry_run"] and dry["epsilon_spent"] == 0.0 and dry["epsilon"] == pytest.approx(0.5)
    (entry,) = dry["measurements"]
    assert entry["quantile_interval"] is False and entry["epsilon"] == pytest.approx(0.5)


def test_a_bad_option_is_refused_before_any_charge(workspace: Workspace) -> None:
    with workspace.app() as c:
        h = workspace.headers("analyst")
        r = c.post("/v1/query", json={"sql": MEDIAN_SQL, "epsilon": 0.5, "quantile_interval": "maybe"}, headers=h)
        budget = c.get("/v1/budget", headers=h).json()
    assert r.status_code == 400, r.text
    assert all(b["spent"]["epsilon"] == 0.0 for b in budget)


def test_value_only_grouped_and_on_the_default_input(workspace: Workspace) -> None:
    """Per declared group, one selection each; the default-input fallback (the mechanisms on an empty table) has the
    same shape."""
    bastion = Bastion(workspace.settings)
    try:
        ctx = Context(bastion.tokens.authenticate(workspace.tokens["analyst"]))
        sql = "SELECT region, MEDIAN(age) AS m FROM visits GROUP BY region"
        answer = bastion.query(ctx, sql, epsilon=1.0, quantile_interval=False)
        assert len(answer["rows"]) == 5 and all(cells[1] is None for cells in answer["intervals"])
        (entry,) = answer["measurements"]
        assert entry["candidates"] == 111 and entry["epsilon"] == pytest.approx(1.0)
        plan = plan_query(sql, lambda name: bastion.engine.policy(name)[0])
        pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None, quantile_interval=False)
        fallback = execute(plan, pricing, bastion.engine, default_input=True)
        assert len(fallback.rows) == 5 and all(cells[1] is None for cells in fallback.intervals)
        assert [e["candidates"] for e in fallback.measurements] == [111]
    finally:
        bastion.close()
