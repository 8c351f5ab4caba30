"""Keys selected privately: the threshold's own noisy counts (Laplace under pure ε, Gaussian under zCDP) released as
COUNT(*), with intervals that allow for the selection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from policies import mechanisms as mech
from tests.conftest import Workspace

K, EPSILON, DELTA, ALPHA = 5, 0.5, 1e-7, 0.05
DRAWS = 4_000


def _kept_values(count: int, n: int) -> np.ndarray:
    """Released values of one key of true `count` over draws where it was kept (copies of it in one call)."""
    out: list[int] = []
    while len(out) < n:
        selection = mech.select_keys({f"k{i}": count for i in range(1_000)}, K, EPSILON, DELTA, candidates=1_000)
        out += [int(v) for v in selection.kept.values()]
    return np.asarray(out[:n], dtype=np.float64)


def _min_coverage(n: int) -> float:
    """The smallest share of covering intervals that a (1 - ALPHA) procedure shows over n draws, but for a 1e-4
    chance (binomial lower tail)."""
    return float(binom.ppf(1e-4, n, 1 - ALPHA)) / n


@pytest.mark.parametrize("offset", [-25, -10, 0, 10, 40])
def test_selected_count_intervals_cover_given_selection(offset: int) -> None:
    """For a true count below, at and above the threshold, the interval covers it in ≥ 1 - alpha of the releases
    where the key is kept (the coverage a reader of the answer relies on)."""
    scale, threshold = mech.threshold_for(K, EPSILON, DELTA)
    count = threshold + offset
    values = _kept_values(count, DRAWS)
    assert len(values) >= 200, len(values)  # enough kept draws to measure (all offsets here are kept often)
    lo, hi = mech.selected_count_interval(values, scale, threshold, ALPHA)
    assert np.all(lo <= values) and np.all(values <= hi)
    assert np.all(lo >= 0)
    covered = float(np.mean((lo <= count) & (count <= hi)))
    assert covered >= _min_coverage(len(values)), (offset, covered, len(values))


def test_the_unadjusted_interval_undercovers_near_the_threshold() -> None:
    """Control: v ± the usual half-width covers a count 2.5 scales below the threshold far less often than 1 - alpha
    among kept draws, which the test above would catch."""
    scale, threshold = mech.threshold_for(K, EPSILON, DELTA)
    count = threshold - math.ceil(2.5 * scale)
    values = _kept_values(count, DRAWS)
    hw = mech.integer_accuracy(scale, ALPHA)
    covered = float(np.mean(np.abs(values - count) <= hw))
    assert covered < _min_coverage(len(values)), covered


def test_far_above_the_threshold_the_interval_is_the_usual_one() -> None:
    scale, threshold = mech.threshold_for(K, EPSILON, DELTA)
    v = np.asarray([threshold + 100 * scale, 1e6])
    lo, hi = mech.selected_count_interval(v, scale, threshold, ALPHA)
    hw = mech.integer_accuracy(scale, ALPHA)
    assert np.all(np.abs((v - lo) - hw) <= 2) and np.all(np.abs((hi - v) - hw) <= 2), (v - lo, hi - v, hw)


# Under zCDP the threshold is OpenDP's Gaussian one: a scale within OpenDP's exact discrete tails (ρ = 0.5, scale 5)
# and one above DISCRETE_ACCURACY_MAX_SCALE, where the interval uses the continuous Gaussian's bounds on them.
GAUSSIAN_RHOS = {"exact": 0.5, "bounded": 5.6e-6}


def _gaussian_kept_values(count: int, n: int, rho: float) -> np.ndarray:
    """Released values of one key of true `count` over draws where the Gaussian threshold kept it."""
    out: list[int] = []
    while len(out) < n:
        selection = mech.select_keys({f"k{i}": count for i in range(1_000)}, K, 0.0, DELTA, candidates=1_000, rho=rho)
        out += [int(v) for v in selection.kept.values()]
    return np.asarray(out[:n], dtype=np.float64)


@pytest.mark.parametrize(
    ("tails", "offset"),
    [("exact", -2.5), ("exact", -1.0), ("exact", 0.0), ("exact", 1.0), ("exact", 4.0)]
    + [("bounded", -2.0), ("bounded", 0.0), ("bounded", 4.0)],
)
def test_selected_gaussian_count_intervals_cover_given_selection(tails: str, offset: float) -> None:
    """The Gaussian threshold's kept counts (zCDP): for a true count `offset` noise scales from the threshold, the
    interval covers it in ≥ 1 - alpha of the releases where the key is kept."""
    rho = GAUSSIAN_RHOS[tails]
    scale, threshold = mech.threshold_for(K, 0.0, DELTA, rho)
    assert (scale > mech.DISCRETE_ACCURACY_MAX_SCALE) == (tails == "bounded")
    count = threshold + round(offset * scale)
    values = _gaussian_kept_values(count, DRAWS, rho)
    lo, hi = mech.selected_gaussian_count_interval(values, scale, threshold, ALPHA)
    assert np.all(lo <= values) and np.all(values <= hi)
    assert np.all(lo >= 0)
    covered = float(np.mean((lo <= count) & (count <= hi)))
    assert covered >= _min_coverage(len(values)), (offset, covered, len(values))


@pytest.mark.parametrize("tails", ["exact", "bounded"])
def test_the_unadjusted_gaussian_interval_undercovers_near_the_threshold(tails: str) -> None:
    """Control: v ± the usual discrete Gaussian half-width covers a count two scales below the threshold far less
    often than 1 - alpha among kept draws."""
    rho = GAUSSIAN_RHOS[tails]
    scale, threshold = mech.threshold_for(K, 0.0, DELTA, rho)
    values = _gaussian_kept_values(threshold - round(2 * scale), DRAWS, rho)
    hw = mech.gaussian_accuracy(scale, ALPHA)
    covered = float(np.mean(np.abs(values - (threshold - round(2 * scale))) <= hw))
    assert covered < _min_coverage(len(values)), covered


@pytest.mark.parametrize("tails", ["exact", "bounded"])
def test_far_above_the_gaussian_threshold_the_interval_is_the_usual_one(tails: str) -> None:
    scale, threshold = mech.threshold_for(K, 0.0, DELTA, GAUSSIAN_RHOS[tails])
    v = np.asarray([threshold + 100 * scale, 1e9])
    lo, hi = mech.selected_gaussian_count_interval(v, scale, threshold, ALPHA)
    hw = mech.gaussian_accuracy(scale, ALPHA)
    assert np.all(np.abs((v - lo) - hw) <= 2) and np.all(np.abs((hi - v) - hw) <= 2), (v - lo, hi - v, hw)


def test_gaussian_tail_bounds_hold_the_exact_tails() -> None:
    """Above a scale of 1,000 the interval uses bounds on the discrete Gaussian's tails; at a scale where the exact
    table is still computed (and the continuous bounds apply as well), they hold the exact value."""
    scale, reach = 1_000.0, 60_000
    x = np.asarray([-30_000, -2_500, -1, 0, 1, 7, 999, 1_000, 2_500, 9_000, 30_000], dtype=np.float64)
    exact, same = mech._gaussian_log_tail_bounds(x, scale, reach)
    assert np.array_equal(exact, same)
    lower, upper = np.log(norm.sf(x / scale)), np.log(norm.sf((x - 1) / scale))
    assert np.all(lower <= exact + 1e-9) and np.all(exact <= upper + 1e-9), (lower, exact, upper)
    bounded_lower, bounded_upper = mech._gaussian_log_tail_bounds(x, scale * (1 + 1e-9), reach)
    assert np.all(bounded_lower <= exact + 1e-6) and np.all(exact <= bounded_upper + 1e-6)


def test_default_delta_runs_out_with_epsilon() -> None:
    """A private-key request without δ spends the δ cap's share that its ε is of the ε cap (δ and ε run out
    together), not a fixed tenth of the δ cap (which allowed ten such queries whatever ε was left)."""
    from gateway.sql.price import default_delta

    assert default_delta(1e-5, 0.1, 10.0) == pytest.approx(1e-7)
    assert default_delta(1e-5, 1.0, 10.0) == pytest.approx(1e-6)
    assert default_delta(1e-5, 20.0, 10.0) == pytest.approx(1e-5)  # never above the cap
    # Queries at ε = 0.1 against (ε, δ) = (10, 1e-5): a hundred fit in δ as in ε.
    spent = sum(default_delta(1e-5, 0.1, 10.0) for _ in range(100))
    assert spent <= 1e-5 * (1 + 1e-9)


def test_group_keys_alone_public_are_free_and_private_are_selected(workspace: Workspace) -> None:
    """SELECT key ... GROUP BY key (or SELECT DISTINCT key): keys of a declared domain are all released, cost
    nothing and read no row; keys without one go through the threshold at the request's ε and δ, and no count is
    released with them."""
    from audit.log import AuditLog

    with workspace.app() as c:
        h = workspace.headers("analyst")
        public = c.post("/v1/query", json={"sql": "SELECT DISTINCT region FROM visits", "epsilon": 1.0}, headers=h)
        assert public.status_code == 200, public.text
        body = public.json()
        assert sorted(r[0] for r in body["rows"]) == ["central", "east", "north", "south", "west"]
        assert body["epsilon_spent"] == 0.0 and body["measurements"] == []
        private = c.post(
            "/v1/query", json={"sql": "SELECT diagnosis FROM visits GROUP BY diagnosis", "epsilon": 1.0}, headers=h
        )
        assert private.status_code == 200, private.text
        pbody = private.json()
        assert pbody["columns"] == ["diagnosis"] and all(len(r) == 1 for r in pbody["rows"])
        assert pbody["epsilon_spent"] == 1.0 and pbody["delta"] > 0
        budget = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "visits")
    assert budget["spent"]["epsilon"] == pytest.approx(1.0)
    records = AuditLog(workspace.settings.audit_dir).records()
    audited = [r for r in records if r.get("event") == "query" and "DISTINCT region" in json.dumps(r)]
    assert {r.get("phase") for r in audited} >= {"released"}, audited  # the free answer is audited too


def test_public_keys_alone_read_no_row(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.engines.duckdb import DuckDBEngine

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a query of public keys alone read private rows")

    monkeypatch.setattr(DuckDBEngine, "rows", refuse)
    with workspace.app() as c:
        r = c.post(
            "/v1/query",
            json={"sql": "SELECT region, sex FROM visits GROUP BY region, sex", "epsilon": 1.0},
            headers=workspace.headers("analyst"),
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["rows"]) == 5 * 3
