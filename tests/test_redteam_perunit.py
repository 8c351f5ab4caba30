"""Findings of an adversarial review of per-unit subqueries and public group lists, each reproduced here:

1. a listed integer beyond BIGINT (or one too long to convert) passed the checks and was charged, and the engine
   then failed (the answer came from the fallback release), or it failed before the charge with a 500;
2. key selection offered groups with no counted row (all their rows failing the WHERE, or of unlisted keys) as
   candidates, so such a key could be released with probability up to δ;
3. `USING SAMPLE` (and `TABLESAMPLE` anywhere but directly on the dataset) was ignored: answered unsampled;
4. a column list on a FROM item's alias (`FROM (SELECT ...) AS t(n, x)`) was ignored;
5. `COUNT(uid)` inside the per-unit subquery was refused.

Every refusal is a 400 in the one error shape with its reason and span, charges nothing and is audited."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from audit.log import AuditLog
from gateway.demo import POLICY_YAML, write_demo
from gateway.engines.duckdb import DuckDBEngine
from gateway.service import Bastion
from gateway.sql import compile as comp
from gateway.sql import release as rel
from gateway.sql.plan import Plan, plan_query
from gateway.sql.price import price
from gateway.stores.ledger import Ledger
from policies import mechanisms as mech
from policies.schema import parse_policy
from tests.conftest import ROLES, Workspace, build_workspace

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))
K = POLICY.max_rows_per_unit
HUGE_DIGITS = "1" + "0" * 5000  # more digits than Python converts between int and str by default
PER_UNIT = (
    "SELECT n, COUNT(*) FROM (SELECT patient_id, COUNT(*) AS n FROM visits{inner} GROUP BY patient_id){outer} "
    "GROUP BY n"
)
LISTED = "SELECT g.x, COUNT(*) FROM visits RIGHT JOIN {table} ON g.x = {key} GROUP BY 1"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo(tmp_path_factory.mktemp("small_demo"), n_rows=5_000, seed=11)


@pytest.fixture
def ws(tmp_path: Path, small_demo: tuple[Path, Path]) -> Workspace:
    data, policy = small_demo
    return build_workspace(tmp_path, [(policy, data)], ROLES)


def _refused(ws: Workspace, sql: str, reason: str, highlight: str) -> dict[str, Any]:
    """Post the query; check the 400, its shape, reason and span, that nothing was charged and that the refusal is
    in the audit log. Returns the error."""
    with ws.app() as c:
        before = c.get("/v1/budget", headers=ws.headers("analyst")).json()
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1.0}, headers=ws.headers("analyst"))
        after = c.get("/v1/budget", headers=ws.headers("analyst")).json()
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"]
    err = r.json()["error"]
    assert (err["code"], err["reason"]) == ("query_rejected", reason), err
    assert err["highlight"] == highlight, err
    assert err["line"] == 1 and sql[err["column"] - 1 :].startswith(highlight), err
    assert err["hint"] and err["hint"] in err["message"], err
    assert before == after
    assert Ledger(ws.settings.ledger).history() == []
    queries = [rec for rec in AuditLog(ws.settings.audit_dir).records() if rec["event"] == "query"]
    assert [(q["decision"], q["reason"]) for q in queries] == [("denied", reason)]
    assert sql.startswith(queries[0]["request"]["sql"])  # a long text is recorded as its prefix and digest
    return err


def _answered(ws: Workspace, sql: str, caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """Post the query; check it is answered and that nothing failed after the charge (a failure is answered from
    the fallback release, and logged)."""
    with caplog.at_level(logging.WARNING, logger="bastion"), ws.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1.0}, headers=ws.headers("analyst"))
    assert r.status_code == 200, r.text
    assert not [x for x in caplog.records if x.name == "bastion"], [x.getMessage() for x in caplog.records]
    body: dict[str, Any] = r.json()
    return body


# --- 1. listed values the engine could reject after the charge ---------------------------------------------------

BEYOND_BIGINT = [
    (LISTED.format(table="UNNEST([9223372036854775808]) AS g(x)", key="age"), "9223372036854775808"),
    (
        "SELECT g.x, COUNT(*) FROM visits RIGHT OUTER JOIN (SELECT DISTINCT x FROM UNNEST([1, 9223372036854775808]) "
        "AS x) g ON g.x = age GROUP BY g.x",
        "9223372036854775808",
    ),
    (LISTED.format(table="(VALUES (1), (9223372036854775808)) AS g(x)", key="age"), "9223372036854775808"),
    (LISTED.format(table="(VALUES (-9223372036854775809)) AS g(x)", key="age"), "-9223372036854775809"),
    (
        LISTED.format(table="(SELECT 9223372036854775808 AS x UNION ALL SELECT 1) g", key="length_of_stay"),
        "9223372036854775808",
    ),
    (LISTED.format(table="(VALUES (1e30)) AS g(x)", key="age"), "1e30"),
    # too large to convert cheaply (10**999999999) or at all (5,001 digits: a 500 before the charge)
    (LISTED.format(table="(VALUES (1e999999999)) AS g(x)", key="age"), "1e999999999"),
    (LISTED.format(table=f"(VALUES ({HUGE_DIGITS})) AS g(x)", key="age"), HUGE_DIGITS),
    (
        LISTED.format(table="UNNEST(GENERATE_ARRAY(9223372036854775806, 9223372036854775808)) AS g(x)", key="age"),
        "9223372036854775808",
    ),
    (LISTED.format(table=f"UNNEST(GENERATE_ARRAY(1, {HUGE_DIGITS})) AS g(x)", key="age"), HUGE_DIGITS),
    # other literals of the path: a number no DOUBLE holds, dates no DATE holds
    (LISTED.format(table="(VALUES (1e400)) AS g(x)", key="income"), "1e400"),
    (LISTED.format(table="(VALUES (DATE '2020-02-30')) AS g(x)", key="visit_day"), "DATE '2020-02-30'"),
    (LISTED.format(table="(VALUES ('10000-01-01')) AS g(x)", key="visit_day"), "'10000-01-01'"),
]


@pytest.mark.parametrize(("sql", "highlight"), BEYOND_BIGINT, ids=[s[:90] for s, _ in BEYOND_BIGINT])
def test_a_listed_value_the_engine_cannot_hold_is_a_type_error_before_the_charge(
    ws: Workspace, sql: str, highlight: str
) -> None:
    _refused(ws, sql, "type_error", highlight)


def test_the_ends_of_the_bigint_range_are_answered_without_a_failure(
    ws: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    sql = LISTED.format(table="(VALUES (-9223372036854775808), (9223372036854775807), (1e3)) AS g(x)", key="age")
    body = _answered(ws, sql, caplog)
    assert [r[0] for r in body["rows"]] == [-(2**63), 1000, 2**63 - 1]
    sql = LISTED.format(table="UNNEST(GENERATE_ARRAY(9223372036854775805, 9223372036854775807)) AS g(x)", key="age")
    assert [r[0] for r in _answered(ws, sql, caplog)["rows"]] == [2**63 - 3, 2**63 - 2, 2**63 - 1]


# --- 2. key selection offers only groups with a counted row --------------------------------------------------------

HIDDEN = "Q99"  # the diagnosis of one unit, whose rows all fail the queries' WHERE, and none of the others'
SELECTED = "SELECT diagnosis, COUNT(*) FROM visits WHERE age >= 18 GROUP BY diagnosis"
# A listed key with a private one: the rows of unlisted regions (the hidden unit's 'south' among them) are in no
# group, so (south, <diagnosis>) must never be released.
SELECTED_LISTED = (
    "SELECT g.r, diagnosis, COUNT(*) FROM visits RIGHT JOIN (VALUES ('north')) AS g(r) ON g.r = region "
    "GROUP BY g.r, diagnosis"
)


def _visits(with_hidden: bool) -> pa.Table:
    from gateway.demo import generate_visits

    table = generate_visits(20_000, seed=5)
    if not with_hidden:
        return table
    hidden = {  # one unit of k rows, a child in the south with a diagnosis no other unit has
        "patient_id": [1] * K,
        "age": [5] * K,
        "sex": ["F"] * K,
        "region": ["south"] * K,
        "diagnosis": [HIDDEN] * K,
        "income": [0.0] * K,
        "length_of_stay": [1] * K,
        "visit_day": [table.column("visit_day")[0].as_py()] * K,
        "triage_note": ["routine check-up"] * K,
        "triage_label": ["routine"] * K,
        "ssn": ["900000000"] * K,
    }
    return pa.concat_tables([table, pa.table(hidden, schema=table.schema)])


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, DuckDBEngine]:
    """The visits with and without the hidden unit, bounded with one key (the other units keep the same rows)."""
    root = tmp_path_factory.mktemp("neighbours")
    key = root / "bounding.key"
    out = {}
    for with_hidden in (True, False):
        d = root / ("with" if with_hidden else "without")
        d.mkdir()
        pq.write_table(_visits(with_hidden), d / "visits.parquet")
        engine = DuckDBEngine(d / "db.duckdb", key, read_only=False)
        engine.register(POLICY, d / "visits.parquet")
        out[with_hidden] = engine
    return out


def _plan(sql: str) -> Plan:
    return plan_query(sql, lambda _: POLICY)


def _keep_everything(
    counts: dict[str, int], k: int, epsilon: float, delta: float, candidates: int = 1_000, rho: float = 0.0
) -> mech.KeySelection:
    """Key selection at its worst: every candidate passes the threshold (noise as large as it gets), so what is
    released is exactly what was offered."""
    scale, threshold = mech.threshold_for(k, epsilon, delta, rho)
    return mech.KeySelection(kept=dict(counts), threshold=threshold, scale=scale, epsilon=epsilon, delta=delta)


@pytest.mark.parametrize("sql", [SELECTED, SELECTED_LISTED])
def test_a_group_with_no_counted_row_is_never_a_candidate(
    sql: str, neighbours: dict[bool, DuckDBEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if every candidate passed the threshold, the released groups are those with a counted row, the same on
    both neighbours: the hidden unit's key is not offered, nor are keys of unlisted groups."""
    monkeypatch.setattr(rel.mech, "select_keys", _keep_everything)
    plan = _plan(sql)
    assert plan.needs_key_selection
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=1e-6)
    released = {}
    for with_hidden, engine in neighbours.items():
        rows = rel.execute(plan, pricing, engine).rows
        released[with_hidden] = [tuple(r[: len(plan.keys)]) for r in rows]
        assert all(HIDDEN not in key for key in released[with_hidden])
        if plan.keys[0].domain is not None:  # the listed region
            assert {key[0] for key in released[with_hidden]} == {"north"}
    assert released[True] == released[False]
    assert len(released[True]) == len(set(released[True])) > 0


@pytest.mark.parametrize(
    ("epsilon", "delta", "runs"),
    [
        (5.0, None, 100),  # a large ε at the default δ
        (0.1, 0.1, 100),  # the most δ a request may give, and a small ε: a count-0 candidate passes often
    ],
)
@pytest.mark.parametrize("sql", [SELECTED, SELECTED_LISTED])
def test_releases_never_hold_a_key_without_a_counted_row(
    sql: str, epsilon: float, delta: float | None, runs: int, neighbours: dict[bool, DuckDBEngine]
) -> None:
    """Repeated real releases (OpenDP's threshold) on the dataset with the hidden unit: its key, and any unlisted
    key, is released zero times; and what the engine returns to the release has the same number of rows on both
    neighbours (the candidates padded to their public number)."""
    plan = _plan(sql)
    pricing = price(plan, epsilon=epsilon, accuracy=None, alpha=0.05, delta=delta)
    engine = neighbours[True]
    released: set[tuple[Any, ...]] = set()
    for _ in range(runs):
        released |= {tuple(r[: len(plan.keys)]) for r in rel.execute(plan, pricing, engine).rows}
    assert released, "something is released"
    assert not [key for key in released if HIDDEN in key]
    if plan.keys[0].domain is not None:
        assert {key[0] for key in released} == {"north"}
    statement = comp.measurement_query(plan)
    sizes = {len(e.rows(statement)) for e in neighbours.values()}
    assert sizes == {POLICY.key_candidates}


# --- 3. sampling ---------------------------------------------------------------------------------------------------

SAMPLING = [
    ("SELECT COUNT(*) FROM visits USING SAMPLE 10%", "USING SAMPLE 10%"),
    (
        "SELECT COUNT(*) FROM visits USING SAMPLE 10 PERCENT (bernoulli) WHERE age > 3",
        "USING SAMPLE 10 PERCENT (bernoulli)",
    ),
    (
        "SELECT AVG(age) FROM visits USING SAMPLE reservoir(50 ROWS) REPEATABLE (100)",
        "USING SAMPLE reservoir(50 ROWS) REPEATABLE (100)",
    ),
    ("SELECT COUNT(*) FROM visits TABLESAMPLE (10 PERCENT)", "TABLESAMPLE (10 PERCENT)"),
    ("SELECT COUNT(*) FROM visits v TABLESAMPLE SYSTEM (5) REPEATABLE (3)", "TABLESAMPLE SYSTEM (5) REPEATABLE (3)"),
    ("SELECT COUNT(*) FROM visits SAMPLE (10)", "SAMPLE (10)"),
    (PER_UNIT.format(inner=" USING SAMPLE 10%", outer=""), "USING SAMPLE 10%"),
    (PER_UNIT.format(inner=" TABLESAMPLE (10 PERCENT)", outer=""), "TABLESAMPLE (10 PERCENT)"),
    (PER_UNIT.format(inner="", outer=" USING SAMPLE 10%"), "USING SAMPLE 10%"),
    (PER_UNIT.format(inner="", outer=" AS t TABLESAMPLE (10 PERCENT)"), "TABLESAMPLE (10 PERCENT)"),
    (
        "SELECT g.r, COUNT(*) FROM visits RIGHT JOIN (VALUES ('north')) AS g(r) ON g.r = region USING SAMPLE 10% "
        "GROUP BY 1",
        "USING SAMPLE 10%",
    ),
    (
        "SELECT g.r, COUNT(*) FROM visits TABLESAMPLE (10 PERCENT) RIGHT JOIN (VALUES ('north')) AS g(r) "
        "ON g.r = region GROUP BY 1",
        "TABLESAMPLE (10 PERCENT)",
    ),
]


@pytest.mark.parametrize(("sql", "highlight"), SAMPLING, ids=[s for s, _ in SAMPLING])
def test_sampling_is_refused_with_its_span(ws: Workspace, sql: str, highlight: str) -> None:
    err = _refused(ws, sql, "sampling", highlight)
    assert "amplification" in err["hint"]


# --- 4. a column list on a FROM item's alias ---------------------------------------------------------------------

ALIAS_COLUMNS = [
    (PER_UNIT.format(inner="", outer=" AS t(p, n)"), "AS t(p, n)"),
    (PER_UNIT.format(inner="", outer=" t(p, n)"), "t(p, n)"),
    (PER_UNIT.format(inner=" AS v(a)", outer=""), "AS v(a)"),
    ("SELECT AVG(age) FROM visits AS v(sex, age)", "AS v(sex, age)"),
    (
        "SELECT g.r, COUNT(*) FROM visits v(region) RIGHT JOIN (VALUES ('north')) AS g(r) ON g.r = v.region GROUP BY 1",
        "v(region)",
    ),
]


@pytest.mark.parametrize(("sql", "highlight"), ALIAS_COLUMNS, ids=[s for s, _ in ALIAS_COLUMNS])
def test_a_column_list_on_an_alias_is_refused(ws: Workspace, sql: str, highlight: str) -> None:
    err = _refused(ws, sql, "alias_columns", highlight)
    assert "drop the column list" in err["hint"]


def test_the_subquery_alias_column_list_hint_names_the_columns_inside() -> None:
    from policies.errors import QueryRejected

    with pytest.raises(QueryRejected) as info:
        _plan(PER_UNIT.format(inner="", outer=" AS t(p, x)"))
    assert "COUNT(*) AS n" in (info.value.details.get("hint") or "")


# --- 5. COUNT(uid) per unit ----------------------------------------------------------------------------------------

COUNT_UNIT = (
    "SELECT n, COUNT(*) FROM (SELECT patient_id, COUNT(patient_id) AS n FROM visits GROUP BY patient_id) GROUP BY n"
)


def test_count_of_the_unit_per_unit_is_a_count_of_its_rows(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    plan = _plan(COUNT_UNIT)
    assert plan.per_unit is not None
    (derived,) = plan.per_unit.columns
    assert (derived.name, derived.kind, derived.column.bounds) == ("n", "count", (0, K))
    assert plan.keys[0].domain == list(range(K + 1))  # a public domain from the bounds: no key selection
    # Its exact histogram is that of COUNT(*) per unit (the unit is never NULL within its own group).
    star = _plan(COUNT_UNIT.replace("COUNT(patient_id)", "COUNT(*)"))
    bastion = Bastion(ws.settings)
    try:
        histograms: list[dict[int, int]] = []
        for p in (plan, star):
            rows = bastion.engine.rows(comp.measurement_query(p))
            histograms.append({int(r[0]): int(r[1]) for r in rows if int(r[1])})
    finally:
        bastion.close()
    assert histograms[0] == histograms[1] and sum(histograms[0].values()) > 0
    body = _answered(ws, COUNT_UNIT, caplog)
    assert [r[0] for r in body["rows"]] == list(range(K + 1))
    (m,) = body["measurements"]
    assert m["sensitivity"] == 1  # one row per unit in the derived table


def test_count_of_the_unit_through_a_dry_run(ws: Workspace) -> None:
    """A dry run shows the derived bounds [0, k] as the sensitivity of a SUM of the per-unit count (one row per
    unit, each in [0, k]), and charges nothing."""
    sql = "SELECT SUM(n) FROM (SELECT patient_id, COUNT(patient_id) AS n FROM visits GROUP BY patient_id)"
    with ws.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1.0, "dry_run": True}, headers=ws.headers("analyst"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(m["measurement"], m["sensitivity"]) for m in body["measurements"]] == [("sum(n)", K)]
    assert body["epsilon_spent"] == 0.0 and Ledger(ws.settings.ledger).history() == []
