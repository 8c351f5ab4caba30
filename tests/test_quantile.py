"""Quantile releases on the real stack: over many releases on generated data, each quantile's interval holds the
true quantile (PERCENTILE_CONT of the bounded rows) at least 1 - alpha of the time and its value is within the
stated rank error of the best of its candidates at least 1 - alpha of the time (both with a binomial tolerance);
the value always lies within the interval, and a dense column's value is far finer than the coarse grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import binom

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql import release
from gateway.sql.plan import Kind, plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies import mechanisms as mech
from policies.schema import parse_policy
from tests.conftest import Workspace

K = 2
ALPHA = 0.1  # a large alpha, so that misses are frequent enough for the tolerance to mean something
RELEASES = 300
SQL = "SELECT shape, MEDIAN(v) AS med, QUANTILE_CONT(v, 0.9) AS p90 FROM shapes GROUP BY shape"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> DuckDBEngine:
    """Three groups: a dense skewed decimal column, integers with heavy ties, and a sparse group of 60 rows."""
    d: Path = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(20261204)
    dense = np.clip(np.round(rng.lognormal(3.5, 1.0, 20_000), 2), 0, 1000)
    ties = rng.integers(0, 40, 6_000).astype(np.float64)
    sparse = np.round(rng.uniform(100, 900, 60), 2)
    values = np.concatenate([dense, ties, sparse])
    shape = ["dense"] * len(dense) + ["ties"] * len(ties) + ["sparse"] * len(sparse)
    frame = pd.DataFrame({"uid": np.arange(len(values)) // K, "shape": shape, "v": values})
    frame.to_csv(d / "shapes.csv", index=False)
    policy = yaml.safe_load(f"""
dataset: shapes
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 100000, delta: 1.0e-3}}, total: {{epsilon: 100000, delta: 1.0e-3}}}}
columns:
  uid: {{type: int, usage: hidden}}
  shape: {{type: category, domain: [dense, ties, sparse]}}
  v: {{type: decimal, bounds: [0, 1000], precision: 0.01}}
roles: {{analyst: [query]}}
""")
    cat = DuckDBEngine(d / "db.duckdb", d / "key", read_only=False)
    cat.register(parse_policy(policy), d / "shapes.csv")
    return cat


def _truth(cat: DuckDBEngine) -> dict[tuple[str, str], float]:
    rows = (
        cat.connect()
        .execute("SELECT shape, quantile_cont(v, 0.5), quantile_cont(v, 0.9) FROM bounded_shapes GROUP BY shape")
        .fetchall()
    )
    return {(shape, name): float(v) for shape, *qs in rows for name, v in zip(("med", "p90"), qs, strict=True)}


def _min_hits(n: int, p: float) -> int:
    """Fewest successes out of n that a success probability ≥ p gives more often than 1 time in 10,000."""
    return int(binom.ppf(1e-4, n, p))


@pytest.mark.slow
def test_intervals_cover_and_values_are_within_their_rank_error(shapes: DuckDBEngine) -> None:
    plan = plan_query(SQL, lambda n: shapes.policy(n)[0])
    pricing = price(plan, epsilon=2.0, accuracy=None, alpha=ALPHA, delta=None)
    truth = _truth(shapes)
    quantiles = [m for m in plan.measurements if m.kind == Kind.QUANTILE]
    # Each group's value stage as the executor calls it: the grid of its candidates and the exact counts of the
    # second pass at that grid's codes (what release_quantile_point scores).
    recorded: list[tuple[mech.QuantileGrid, mech.PositionCounts]] = []
    real = mech.release_quantile_point

    def record(
        release: mech.QuantileRelease, fine: mech.PositionCounts, *args: object, **kwargs: object
    ) -> mech.QuantileRelease:
        recorded.append((release.fine_grid(ALPHA), fine))
        return real(release, fine, *args, **kwargs)  # type: ignore[arg-type]

    covered: dict[tuple[str, str], int] = dict.fromkeys(truth, 0)
    within: dict[tuple[str, str], int] = dict.fromkeys(truth, 0)
    errors: dict[tuple[str, str], list[float]] = {key: [] for key in truth}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mech, "release_quantile_point", record)
        for _ in range(RELEASES):
            recorded.clear()
            release = execute(plan, pricing, shapes)
            groups = plan.declared_groups() or []
            points = dict(zip([(m, g) for m in quantiles for g in groups], recorded, strict=True))  # call order
            entries = {e["measurement"]: e for e in release.measurements}
            for row, cells in zip(release.rows, release.intervals, strict=True):
                shape = row[0]
                for j, (name, m) in enumerate(zip(("med", "p90"), quantiles, strict=True), start=1):
                    value, cell = row[j], cells[j]
                    assert cell is not None
                    lo, hi = cell
                    assert lo <= value <= hi  # the value is chosen among positions of its interval
                    key = (shape, name)
                    covered[key] += lo <= truth[key] <= hi
                    errors[key].append(abs(value - truth[key]))
                    # Rank error: the value's score against the best position it was chosen from.
                    fine, counts = points[(m, (shape,))]
                    assert (fine.value(0), fine.value(fine.size - 1)) == pytest.approx((lo, hi))
                    positions = np.arange(fine.size)
                    scores = np.asarray(mech.position_scores(counts, positions, m.q))
                    chosen = int(np.argmin(np.abs(fine.value(positions) - value)))
                    num = round(m.q * mech.QUANTILE_DENOMINATOR)
                    per_row = min(num, mech.QUANTILE_DENOMINATOR - num)
                    gap_rows = (scores[chosen] - scores.min()) / per_row
                    within[key] += gap_rows <= entries[m.label]["rank_error"]
    least = _min_hits(RELEASES, 1 - ALPHA)
    assert min(covered.values()) >= least, covered
    assert min(within.values()) >= least, within
    # On the dense column the value is far finer than the 1,024-point grid of before (step 0.978 over [0, 1000]).
    coarse_step = 1000 / 1023
    assert np.median(errors[("dense", "med")]) < coarse_step / 10, np.median(errors[("dense", "med")])
    assert np.median(errors[("ties", "med")]) < 1.0  # integers with many ties: the true median's own atom


def test_second_pass_counts_are_exact_outside_and_inside_each_groups_interval(shapes: DuckDBEngine) -> None:
    """One second statement for every group, each with its own grid: every position's rows below and above, read
    from the statement's codes, are those of the bounded rows (the rows outside a group's interval included)."""
    plan = plan_query(SQL, lambda n: shapes.policy(n)[0])
    m = next(m for m in plan.measurements if m.kind == Kind.QUANTILE)
    grids = {
        ("dense",): mech.QuantileGrid(30.0, 5.0 / 1023, 1024),
        ("ties",): mech.QuantileGrid(10.0, 1.0, 11, integer=True),
        ("sparse",): mech.QuantileGrid(400.0, 0.37, 7),
    }
    counts = release._fine_counts(plan, m, shapes, list(grids.items()))
    rows = shapes.connect().execute("SELECT shape, v FROM bounded_shapes WHERE v IS NOT NULL").fetchall()
    for group, grid in grids.items():
        values = np.asarray([v for shape, v in rows if shape == group[0]], dtype=np.float64)
        positions = np.arange(grid.size)
        at = grid.value(positions)
        below = (values[None, :] < at[:, None] - 1e-9).sum(axis=1)
        above = (values[None, :] > at[:, None] + 1e-9).sum(axis=1)
        expected = mech.quantile_scores(below, above, m.q)[0]
        assert mech.position_scores(counts[group], positions, m.q) == expected, group
        assert counts[group].total == len(values)


def test_the_default_input_release_does_not_touch_the_engine(shapes: DuckDBEngine) -> None:
    """The fallback runs both passes on the empty input: no statement reaches the engine, and every group still has
    a value within the column's bounds and an interval."""

    class NoEngine:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the engine was asked for {name}")

    plan = plan_query(SQL, lambda n: shapes.policy(n)[0])
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=ALPHA, delta=None)
    answer = execute(plan, pricing, NoEngine(), default_input=True)  # type: ignore[arg-type]
    assert sorted(row[0] for row in answer.rows) == sorted(["dense", "ties", "sparse"])
    for row, cells in zip(answer.rows, answer.intervals, strict=True):
        for value, cell in zip(row[1:], cells[1:], strict=True):
            assert cell is not None and 0 <= cell[0] <= value <= cell[1] <= 1000


def test_non_finite_public_keys_do_not_break_the_second_pass(workspace: Workspace) -> None:
    """A key expression that is ±inf or NaN on some groups (EXP of a large number, SQRT of a negative one): the
    second pass's literals for those keys are valid SQL, so the answer is no fallback release after the charge."""
    from audit.log import AuditLog

    with workspace.app() as c:
        for sql in (
            "SELECT EXP(age * 10) AS k, MEDIAN(income) AS m FROM visits GROUP BY k",
            "SELECT SQRT(age - 50) AS k, MEDIAN(income) AS m FROM visits GROUP BY k",
        ):
            r = c.post("/v1/query", json={"sql": sql, "epsilon": 1.0}, headers=workspace.headers("analyst"))
            assert r.status_code == 200, r.text
    fallbacks = [r for r in AuditLog(workspace.settings.audit_dir).records() if r.get("reason") == "fallback"]
    assert fallbacks == []


def test_quantile_searches_are_bounded(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantiles × groups is bounded: over declared groups beyond the bound the query is refused before the charge;
    over selected keys the quantiles go to the groups with the largest noisy counts, and the answer says so."""
    from gateway.sql.plan import MAX_QUANTILE_SEARCHES

    analyst = workspace.headers("analyst")
    with workspace.app() as c:
        before = c.get("/v1/budget", headers=analyst).json()
        many = "SELECT visit_day, MEDIAN(income) FROM visits GROUP BY visit_day"
        r = c.post("/v1/query", json={"sql": many, "epsilon": 1.0}, headers=analyst)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "too_many_quantile_groups", r.text
        assert c.get("/v1/budget", headers=analyst).json() == before  # nothing charged
        monkeypatch.setattr(release, "MAX_QUANTILE_SEARCHES", 4)
        sql = "SELECT diagnosis, COUNT(*) AS n, MEDIAN(income), QUANTILE_CONT(age, 0.9) FROM visits GROUP BY diagnosis"
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 4.0}, headers=analyst)
        assert r.status_code == 200, r.text
        body = r.json()
    assert len(body["rows"]) == 2  # 4 searches for 2 quantiles
    assert any("groups were left out" in note for note in body.get("notes", [])), body
    assert MAX_QUANTILE_SEARCHES >= 1_000


def _ladder_release(density: float, point_scale: float, integer: bool = False) -> mech.QuantileRelease:
    """A ladder around the middle of a grid whose noisy bins hold `density` rows per grid position (every bin), so
    that the interval at alpha is some cuts wide; the point's noise scale is given (score units)."""
    grid = mech.quantile_grid(0.0, 1000.0 if not integer else 500.0, integer)
    centre = grid.size // 2
    cuts = mech.ladder(centre, grid.size)
    edges = np.concatenate([[0], cuts, [grid.size - 1]])
    bins = np.rint(np.maximum(np.diff(edges), 1) * density).astype(np.int64)
    return mech.QuantileRelease(math.nan, cuts, bins, 1.0, 0.5, grid, point_scale)


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("density", [0.5, 40.0, 600.0, 1e6])
@pytest.mark.parametrize("point_scale", [2_000.0, 7_000.0, 70_000.0])
def test_value_positions_are_about_a_noise_scale_apart_in_rank(
    density: float, point_scale: float, integer: bool
) -> None:
    """The value's positions are QUANTILE_POINT_SPACING noise scales apart in rank at the ladder's density (never
    closer; farther only where QUANTILE_POINT_CANDIDATES caps them), at least QUANTILE_POINT_MIN_CANDIDATES, and
    spread over exactly the interval (on a grid of integers: its every integer where they are no more)."""
    r = _ladder_release(density, point_scale, integer)
    low, high = r.interval(ALPHA)
    assert high > low
    fine = r.fine_grid(ALPHA)
    assert fine.value(0) == pytest.approx(r.grid.value(low))
    assert fine.value(fine.size - 1) == pytest.approx(r.grid.value(high))
    assert fine.size <= mech.QUANTILE_POINT_CANDIDATES
    assert fine.size >= min(mech.QUANTILE_POINT_MIN_CANDIDATES, high - low + 1)
    rows_apart = fine.step / r.grid.step * density  # rank distance between neighbouring positions
    wanted = mech.QUANTILE_POINT_SPACING * point_scale / mech.QUANTILE_DENOMINATOR
    if mech.QUANTILE_POINT_MIN_CANDIDATES < fine.size < mech.QUANTILE_POINT_CANDIDATES and not integer:
        assert wanted * 0.9 <= rows_apart <= wanted * 1.000001, (rows_apart, wanted)
    if fine.size == mech.QUANTILE_POINT_CANDIDATES and not fine.integer:
        assert rows_apart > wanted * (fine.size - 2) / (fine.size - 1)  # capped: as close as the cap allows
    if fine.size == mech.QUANTILE_POINT_MIN_CANDIDATES:
        assert rows_apart <= wanted * 1.000001
    if integer and high - low < fine.size:
        assert fine.integer and fine.step == 1.0 and float(fine.lo).is_integer()


def test_value_positions_follow_the_noise() -> None:
    """Less noise (a smaller point scale) or denser rows give more positions; a release without a point scale
    (made before the scale was kept) keeps QUANTILE_POINT_CANDIDATES."""
    sizes = [_ladder_release(600.0, s).fine_grid(ALPHA).size for s in (70_000.0, 7_000.0, 2_000.0)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    sparse, dense = (_ladder_release(d, 7_000.0).fine_grid(ALPHA).size for d in (5.0, 600.0))
    assert sparse < dense
    assert _ladder_release(600.0, math.nan).fine_grid(ALPHA).size == mech.QUANTILE_POINT_CANDIDATES
