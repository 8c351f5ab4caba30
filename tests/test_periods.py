"""Time-partitioned privacy units (`Policy.period`): the validator, bounding per (unit, period) over registration
and appends, the periods a query is charged for and the filter that enforces them, and the gateway's charges per
period (ledger totals, dry run, answer, audit records)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlglot
import yaml
from sqlglot import exp

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql.compile import statements
from gateway.sql.periods import period_filter, periods_read
from gateway.sql.plan import plan_query
from gateway.stores.ledger import Ledger
from policies.schema import PolicyError, parse_policy
from tests.conftest import ROLES, build_workspace

K = 2
RAW: dict[str, Any] = {
    "dataset": "visits",
    "privacy_unit": "patient_id",
    "max_rows_per_unit": K,
    "budget": {"per_principal": {"epsilon": 1.0}, "total": {"epsilon": 2.0}},
    "columns": {
        "patient_id": {"type": "int", "usage": "hidden"},
        "day": {"type": "date", "bounds": ["2024-01-01", "2024-06-30"]},
        "value": {"type": "int", "bounds": [0, 100]},
    },
    "roles": {"analyst": ["query"], "lf_author": ["labeling"]},
    "period": {"column": "day", "every": "month"},
    "labels": {"classes": ["high", "low"]},
}
POLICY = parse_policy(RAW)
MONTHS = ["2024-01", "2024-02", "2024-03", "2024-04", "2024-05", "2024-06"]


def _with(**changes: Any) -> dict[str, Any]:
    return json.loads(json.dumps({**RAW, **changes}))


# --- the validator ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "columns", "message"),
    [
        ({"column": "value", "every": "month"}, None, "must be a date column with declared bounds"),
        ({"column": "nope", "every": "month"}, None, "is not a column"),
        ({"column": "day", "every": "hour"}, None, "every"),
        ({"column": "day", "every": "month"}, {"day": {"type": "date"}}, "must be a date column with declared bounds"),
        (
            {"column": "day", "every": "day"},
            {"day": {"type": "date", "bounds": ["1990-01-01", "2024-01-01"]}},
            "more than",
        ),
    ],
)
def test_the_validator_refuses_a_period_without_public_bounds_or_with_an_unknown_length(
    period: dict[str, str], columns: dict[str, Any] | None, message: str
) -> None:
    raw = _with(period=period)
    if columns:
        raw["columns"].update(columns)
    with pytest.raises(PolicyError, match=message):
        parse_policy(raw)


def test_the_validator_refuses_a_period_with_a_row_unit_or_consent() -> None:
    with pytest.raises(PolicyError, match="privacy unit column"):
        parse_policy(_with(privacy_unit="row", max_rows_per_unit=1))
    consent = {"source": "c.csv", "unit": "patient_id", "scopes": ["debug"]}
    with pytest.raises(PolicyError, match="consent"):
        parse_policy(_with(consent=consent))


@pytest.mark.parametrize(
    ("every", "labels"),
    [
        ("month", MONTHS),
        ("quarter", ["2024-Q1", "2024-Q2"]),
        ("year", ["2024"]),
        ("week", None),
    ],
)
def test_periods_are_enumerated_from_the_bounds(every: str, labels: list[str] | None) -> None:
    policy = parse_policy(_with(period={"column": "day", "every": every}))
    got = policy.periods()
    if labels is not None:
        assert [label for label, _, _ in got] == labels
    # Contiguous, covering the bounds, each starting where the last ended.
    assert got[0][1] <= dt.date(2024, 1, 1) and got[-1][2] > dt.date(2024, 6, 30)
    assert all(a[2] == b[1] for a, b in zip(got, got[1:], strict=False))
    if every == "week":
        assert (
            all(start.weekday() == 0 for _, start, _ in got) and len(got) == 26
        )  # 2024-01-01 is a Monday, 2024-06-30 a Sunday
    assert policy.public_schema()["period"]["periods"] == [label for label, _, _ in got]


# --- the analysis -------------------------------------------------------------------------------------------------


def _where(condition: str) -> exp.Expr:
    tree = sqlglot.parse_one(f"SELECT 1 FROM visits WHERE {condition}", read="duckdb").args["where"]
    return tree.this


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("day >= DATE '2024-06-01'", ["2024-06"]),
        ("day > '2024-05-31'", ["2024-06"]),
        ("day BETWEEN '2024-02-10' AND '2024-03-01' AND value > 3", ["2024-02", "2024-03"]),
        ("day IN ('2024-01-05', CAST('2024-05-01' AS DATE))", ["2024-01", "2024-05"]),
        ("'2024-03-31' >= day", ["2024-01", "2024-02", "2024-03"]),
        ("day = '2024-04-30'", ["2024-04"]),
        ("day < '2024-01-01'", []),
        ("day >= '2024-03-01' AND day < '2024-05-01'", ["2024-03", "2024-04"]),
        # Anything else narrows nothing: every period.
        ("day > '2024-05-31' OR value < 0", MONTHS),
        ("NOT day < '2024-06-01'", MONTHS),
        ("YEAR(day) = 2024 AND MONTH(day) = 6", MONTHS),
        ("value = 3", MONTHS),
    ],
)
def test_a_query_is_charged_the_periods_its_where_may_read(condition: str, expected: list[str]) -> None:
    assert periods_read(POLICY, _where(condition)) == expected


def test_no_where_reads_every_period_and_the_filter_holds_on_exactly_the_charged_periods() -> None:
    assert periods_read(POLICY, None) == MONTHS
    import duckdb

    con = duckdb.connect()
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(182)]
    con.execute("CREATE TABLE t (day DATE)")
    con.executemany("INSERT INTO t VALUES (?)", [(d,) for d in days])
    for chosen in (["2024-06"], ["2024-01", "2024-03", "2024-04"], [], MONTHS):
        query = exp.select("day").from_("t").where(period_filter(POLICY, chosen))
        got = {row[0] for row in con.execute(query.sql(dialect="duckdb")).fetchall()}
        assert got == {d for d in days if f"{d.year:04d}-{d.month:02d}" in chosen}


# --- bounding per (unit, period) ------------------------------------------------------------------------------------


def _csv(path: Path, rows: Sequence[tuple[int, str | None, int]]) -> Path:
    path.write_text("patient_id,day,value\n" + "".join(f"{u},{d or ''},{v}\n" for u, d, v in rows))
    return path


def _kept(engine: DuckDBEngine) -> list[tuple[int, dt.date, int]]:
    query = exp.select("patient_id", "day", "value").from_(exp.table_("bounded_visits", quoted=True))
    return sorted(engine.rows(query))


def test_bounding_keeps_k_rows_per_unit_and_period_at_registration_and_every_append(tmp_path: Path) -> None:
    first: list[tuple[int, str | None, int]] = [(1, f"2024-{m:02d}-{d:02d}", d) for m in (1, 2) for d in (3, 4, 5)]
    first += [(2, "2024-01-09", 50), (3, None, 7)]  # a row without a period is never kept
    admin = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    admin.register(POLICY, _csv(tmp_path / "b0.csv", first))
    admin.close()
    engine = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=True)
    try:
        at_registration = _kept(engine)
        per = {(u, d.month): 0 for u, d, _ in at_registration}
        for u, d, _ in at_registration:
            per[(u, d.month)] += 1
        assert per == {(1, 1): K, (1, 2): K, (2, 1): 1}
        # An append: unit 1 has 3 more rows in February (its allowance there is used up) and 3 in March (new).
        batch = [(1, f"2024-02-{d:02d}", d) for d in (20, 21, 22)] + [(1, f"2024-03-{d:02d}", d) for d in (1, 2, 3)]
        batch += [(2, "2024-01-20", 60), (2, "2024-01-21", 61)]  # unit 2 has one slot left in January
        engine.append("visits", _csv(tmp_path / "b1.csv", batch))
        after = _kept(engine)
        assert set(at_registration) <= set(after)  # rows kept before stay kept
        per = {}
        for u, d, _ in after:
            per[(u, d.month)] = per.get((u, d.month), 0) + 1
        assert per == {(1, 1): K, (1, 2): K, (1, 3): K, (2, 1): K}
        assert not any(d.month == 2 and d.day >= 20 for _, d, _ in after)
    finally:
        engine.close()


# --- enforcement: rows of an uncharged period are never read --------------------------------------------------------


def _base_rows() -> list[tuple[int, str | None, int]]:
    rows: list[tuple[int, str | None, int]] = []
    for u in range(40):
        for m in range(1, 7):
            rows.append((u, f"2024-{m:02d}-{1 + (u * 7 + m) % 28:02d}", (u * 13 + m) % 101))
    return rows


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """D′ and D = D′ plus unit 999's rows in January only (one unit-period), under one bounding key."""
    root = tmp_path_factory.mktemp("period-neighbours")
    engines = []
    unit: list[tuple[int, str | None, int]] = [(999, "2024-01-15", 100), (999, "2024-01-16", 100)]
    for name, extra in (("d", unit), ("d_prime", [])):
        admin = DuckDBEngine(root / f"{name}.duckdb", root / "key", read_only=False)
        admin.register(POLICY, _csv(root / f"{name}.csv", _base_rows() + extra))
        engines.append(admin)
    yield engines
    for e in engines:
        e.close()


def _exact(engine: DuckDBEngine, sql: str, periods: tuple[str, ...] | None = None) -> list[list[tuple[Any, ...]]]:
    plan = plan_query(sql, lambda name: POLICY)
    if periods is not None:
        plan.periods = periods  # as an imprecise analysis might have said
    return [engine.rows(q) for q in statements(plan)]


def test_a_query_cannot_read_rows_of_an_uncharged_period(neighbours: Any) -> None:
    d, d_prime = neighbours
    sql = "SELECT COUNT(*), SUM(value) FROM visits WHERE day >= '2024-06-01'"
    assert plan_query(sql, lambda name: POLICY).periods == ("2024-06",)
    assert _exact(d, sql) == _exact(d_prime, sql)
    # The filter is enforced, not advisory: a plan charged for June only reads June's rows, whatever its WHERE says.
    january = "SELECT COUNT(*), SUM(value) FROM visits WHERE day < '2024-02-01'"
    assert _exact(d, january) != _exact(d_prime, january)  # charged January: the neighbours differ there
    assert _exact(d, january, ("2024-06",)) == _exact(d_prime, january, ("2024-06",))
    assert _exact(d, january, ("2024-06",))[0][0][0] == 0  # no January row is read
    # A WHERE the analysis cannot read is charged every period, and then reads January too.
    opaque = "SELECT COUNT(*) FROM visits WHERE day >= '2024-06-01' OR value < 0"
    assert plan_query(opaque, lambda name: POLICY).periods == tuple(MONTHS)


# --- the gateway: charges per period ----------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Any:
    policy_path = tmp_path / "visits.yaml"
    policy_path.write_text(yaml.safe_dump(RAW))
    ws = build_workspace(tmp_path, [(policy_path, _csv(tmp_path / "visits.csv", _base_rows()))], ROLES)
    return ws


def _query(client: Any, ws: Any, sql: str, **extra: Any) -> Any:
    return client.post("/v1/query", json={"sql": sql, "epsilon": 0.25, **extra}, headers=ws.headers("analyst"))


def _totals(ws: Any) -> dict[str, int]:
    ledger = Ledger(ws.settings.workspace / "ledger.sqlite")
    try:
        return {key: units[0] for (_, key), units in ledger.totals().items()}
    finally:
        ledger.close()


def test_a_filtered_query_charges_only_its_periods_and_an_unfiltered_one_all(workspace: Any) -> None:
    ws = workspace
    with ws.app() as client:
        dry = _query(client, ws, "SELECT COUNT(*) FROM visits WHERE day >= '2024-06-01'", dry_run=True).json()
        assert dry["periods"] == ["2024-06"] and dry["cost_per_period"]["2024-06"]["epsilon"] == pytest.approx(0.25)
        last = _query(client, ws, "SELECT COUNT(*) FROM visits WHERE day >= '2024-06-01'")
        assert last.status_code == 200, last.text
        assert last.json()["periods"] == ["2024-06"]
        assert _totals(ws) == {"visits@2024-06": 25 * 10**10}
        every = _query(client, ws, "SELECT COUNT(*) FROM visits")
        assert every.status_code == 200 and every.json()["periods"] == MONTHS
        totals = _totals(ws)
        assert totals == {f"visits@{m}": (50 if m == "2024-06" else 25) * 10**10 for m in MONTHS}
        # June's per-principal budget (1.0) has 0.5 left: two more June queries fit, the third is refused and
        # charges nothing in any period, while January still answers.
        for sql in (
            "SELECT SUM(value) FROM visits WHERE day >= '2024-06-01'",
            "SELECT COUNT(*) FROM visits WHERE day = '2024-06-03'",
        ):
            assert _query(client, ws, sql).status_code == 200
        before = _totals(ws)
        refused = _query(client, ws, "SELECT COUNT(*) FROM visits WHERE day >= '2024-05-01'")
        assert refused.status_code == 429
        assert _totals(ws) == before
        assert _query(client, ws, "SELECT COUNT(*) FROM visits WHERE day < '2024-02-01'").status_code == 200
        budget = client.get("/v1/budget", headers=ws.headers("analyst"))
    # A gateway starting on this ledger finds it consistent with the log (one record, one row per period charged).
    with ws.app() as client:
        assert client.get("/v1/budget", headers=ws.headers("analyst")).status_code == 200
    records = [json.loads(line) for p in sorted((ws.settings.workspace / "audit").glob("*.jsonl")) for line in p.open()]
    admitted = [r for r in records if r.get("phase") == "admitted"]
    assert [r["periods"] for r in admitted][:2] == [["2024-06"], MONTHS]
    refusals = [r for r in records if r.get("phase") == "refused"]
    assert [r["periods"] for r in refusals] == [["2024-05", "2024-06"]]
    released = [r for r in records if r.get("phase") == "released" and r.get("reason") == "ok"]
    assert all("periods" in r for r in released) and len(released) == 5
    assert budget.status_code == 200
    (status,) = [b for b in budget.json() if b["dataset"] == "visits"]
    assert status["periods"]["2024-06"]["remaining"]["epsilon"] == pytest.approx(0.0)
    assert status["periods"]["2024-01"]["spent"]["epsilon"] == pytest.approx(0.5)
    assert status["remaining"]["epsilon"] == pytest.approx(0.0)  # the most spent period's


def test_another_path_that_reads_private_rows_is_charged_every_period(workspace: Any) -> None:
    ws = workspace
    lfs = [
        {"name": "big", "label": "high", "when": "value > 50"},
        {"name": "small", "label": "low", "when": "value < 10"},
    ]
    with ws.app() as client:
        answer = client.post(
            "/v1/lf/stats", json={"dataset": "visits", "lfs": lfs, "epsilon": 0.5}, headers=ws.headers("lf_author")
        )
        assert answer.status_code == 200, answer.text
    assert _totals(ws) == {f"visits@{m}": 50 * 10**10 for m in MONTHS}
