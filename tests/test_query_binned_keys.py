"""GROUP BY a continuous column: a warning that suggests binning, and binned keys over bounded columns released as
public keys (every bin, empty ones too, with no key selection and no δ), the same key set on neighbouring data."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml
from sqlglot import parse_one

from gateway.demo import POLICY_YAML, generate_visits
from gateway.engines.duckdb import DuckDBEngine
from gateway.settings import Settings
from gateway.sql import compile as comp
from gateway.sql.plan import MAX_BINS, binning, plan_query
from gateway.sql.release import bind_check
from policies.schema import parse_policy
from policies.sqltypes import canonical
from tests.conftest import Workspace
from tests.privacy.test_neighbours import neighbours  # noqa: F401 - the module's D/D′ fixture

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))  # income: decimal in [0, 500000]; age: int in [0, 110]
BANDS = "SELECT FLOOR(income / 10000) * 10000 AS band, COUNT(*) AS n FROM visits GROUP BY 1"


def _plan(sql: str):  # noqa: ANN202 - a Plan
    return plan_query(sql, lambda _: POLICY)


@pytest.mark.parametrize(
    ("sql", "bins", "first", "last"),
    [
        (BANDS, 51, 0.0, 500_000.0),
        ("SELECT FLOOR(income / 10000) AS b, COUNT(*) FROM visits GROUP BY b", 51, 0.0, 50.0),
        (
            "SELECT (FLOOR(income / 25000) * 25000) + 12500 AS b, COUNT(*) FROM visits GROUP BY 1",
            21,
            12_500.0,
            512_500.0,
        ),
        ("SELECT 1 + FLOOR(income / 1000) AS b, COUNT(*) FROM visits GROUP BY 1", 501, 1.0, 501.0),
        ("SELECT FLOOR(income / 501) - 3 AS b, COUNT(*) FROM visits GROUP BY 1", 999, -3.0, 995.0),
    ],
)
def test_binned_keys_of_a_bounded_column_are_public(sql: str, bins: int, first: float, last: float) -> None:
    plan = _plan(sql)
    (key,) = plan.keys
    assert key.domain is not None and not plan.needs_key_selection and plan.warnings == []
    assert (len(key.domain), key.domain[0], key.domain[-1]) == (bins, first, last)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT FLOOR(income / 499) AS b, COUNT(*) FROM visits GROUP BY 1",  # 1,003 bins
        "SELECT FLOOR(income / 0.5) AS b, COUNT(*) FROM visits GROUP BY 1",
    ],
)
def test_more_bins_than_the_limit_go_through_key_selection_with_a_warning(sql: str) -> None:
    plan = _plan(sql)
    assert plan.needs_key_selection
    assert len(plan.warnings) == 1 and f"more than {MAX_BINS:,}" in plan.warnings[0]


@pytest.mark.parametrize(
    ("sql", "binned"),
    [
        ("FLOOR(income / 10) * 2 + 1", ("income", 10.0)),
        ("3 + FLOOR((income) / 2.5)", ("income", 2.5)),
        ("FLOOR(income / 0)", None),
        ("FLOOR(income / -5)", None),
        ("FLOOR(income / age)", None),
        ("FLOOR(income * 10)", None),
        ("ROUND(income / 10)", None),
        ("FLOOR(income / 10) * age", None),
        ("FLOOR(income / 10) + FLOOR(age / 10)", None),
    ],
)
def test_binning_pattern(sql: str, binned: tuple[str, float] | None) -> None:
    found = binning(parse_one(sql, dialect="duckdb"))
    assert (None if found is None else (found.column, found.width)) == binned


def test_group_by_a_continuous_column_warns_and_suggests_binning(workspace: Workspace) -> None:
    sql = "SELECT income, COUNT(*) AS n FROM visits GROUP BY income"
    with workspace.app() as c:
        h = workspace.headers("analyst")
        dry = c.post("/v1/query", json={"sql": sql, "epsilon": 1, "dry_run": True}, headers=h).json()
        answer = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=h).json()
    for body in (dry, answer):
        assert len(body["warnings"]) == 1
        assert "FLOOR(income / 10000) * 10000" in body["warnings"][0]
    assert dry["key_selection"] is True and dry["delta"] > 0


def test_binned_query_releases_every_bin_without_key_selection(workspace: Workspace) -> None:
    # Only patients aged 20 or less: the high-income bins are (nearly all) empty, and are released all the same.
    sql = BANDS.replace("GROUP BY", "WHERE age <= 20 GROUP BY")
    with workspace.app() as c:
        h = workspace.headers("analyst")
        dry = c.post("/v1/query", json={"sql": sql, "epsilon": 1, "dry_run": True}, headers=h).json()
        body = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=h).json()
    assert dry["key_selection"] is False and dry["delta"] == 0.0 and dry["warnings"] == []
    assert body["delta_spent"] == 0.0 and body["warnings"] == []
    assert [r[0] for r in body["rows"]] == [10_000.0 * i for i in range(51)]
    assert not any("selected" in n for n in body["notes"])


def test_binned_keys_are_the_same_set_on_neighbouring_datasets(
    neighbours: tuple[Workspace, Workspace],  # noqa: F811
) -> None:
    # D holds a unit at the top of every bound (income 500,000, in a bin of its own); D′ does not.
    d, d_prime = neighbours
    keys = []
    for ws in (d, d_prime):
        with ws.app() as c:
            r = c.post("/v1/query", json={"sql": BANDS, "epsilon": 0.01}, headers=ws.headers("analyst"))
        assert r.status_code == 200, r.text
        keys.append([row[0] for row in r.json()["rows"]])
        assert r.json()["delta_spent"] == 0.0
    assert keys[0] == keys[1] == [10_000.0 * i for i in range(51)]


@pytest.fixture(scope="module")
def duck(tmp_path_factory: pytest.TempPathFactory) -> DuckDBEngine:
    root = tmp_path_factory.mktemp("binned")
    source = root / "visits.parquet"
    pq.write_table(generate_visits(5_000, seed=3), source)
    settings = Settings(workspace=root)
    engine = DuckDBEngine(settings.database, settings.bounding_key, read_only=False)
    engine.register(POLICY, source)
    return engine


@pytest.mark.parametrize(
    "expr",
    [
        "FLOOR(income / 10000) * 10000",
        "FLOOR(income / 7919.5) * 3 - 1",
        "FLOOR(income / 1000)",
        "FLOOR(length_of_stay / 7) * 7",
    ],
)
def test_every_row_of_the_engine_falls_in_a_public_bin(expr: str, duck: DuckDBEngine) -> None:
    plan = _plan(f"SELECT {expr} AS b, COUNT(*) AS n FROM visits GROUP BY 1")
    bind_check(plan, duck)
    (key,) = plan.keys
    assert key.domain is not None
    domain = set(key.domain)
    rows = duck.rows(comp.measurement_query(plan))
    seen = {canonical(r[0], key.typed.type) for r in rows if r[0] is not None}
    assert seen and seen <= domain
    assert sum(int(r[1]) for r in rows) == duck.rows(comp.measurement_query(_plan("SELECT COUNT(*) FROM visits")))[0][0]
