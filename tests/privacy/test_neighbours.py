"""Neighbouring datasets: what a caller sees besides DP values is the same whether or not one unit is present.

D holds a worst-case patient (k rows at the top of every bound, a diagnosis nobody else has, the labeling-only
note and gold label that the review's LF oracle looked for); D′ is D without that patient. Both are registered in
their own workspace with the same bounding key. For every query of a corpus — the accepted queries of the planner
fixture corpus, the adversarial queries of the review (errors that fail only on some rows, implicit conversions,
overflow, expensive branches) and more of the same classes — the status, the error code and message, and the
shape of the answer are identical on D and D′. Only DP values (and the number of rows where keys are selected
privately or HAVING filters noisy values) may differ.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from audit.log import AuditLog
from gateway.demo import DEMO_POLICY_YAML, diagnosis_chapters, generate_visits
from tests.conftest import ROLES, Workspace, build_workspace

UNIT = 999_999
K = 5

ADVERSARIAL = [
    # errors that would depend on row values
    "SELECT COUNT(*) FROM visits WHERE (CASE WHEN age > 109 THEN 1 // 0 ELSE 0 END) = 0",
    "SELECT COUNT(*) FROM visits WHERE (CASE WHEN income > 499999 THEN age % 0 ELSE 0 END) = 0",
    "SELECT COUNT(*) FROM visits WHERE CASE WHEN diagnosis = 'Z99.7' THEN CAST(region AS INT) ELSE 0 END = 0",
    "SELECT COUNT(*) FROM visits WHERE (CASE WHEN age > 109 THEN age * 100000000 * 100000000 ELSE 0 END) > 1",
    "SELECT COUNT(*) FROM visits WHERE region = 1",
    "SELECT COUNT(*) FROM visits WHERE visit_day = 'south'",
    "SELECT COUNT(*) FROM visits WHERE CASE WHEN age > 109 THEN visit_day + 3000000 ELSE visit_day END > '2020-01-01'",
    "SELECT COUNT(*) FROM visits WHERE substring(region, CASE WHEN age > 109 THEN -5000000000 ELSE 1 END, 2) = 'x'",
    "SELECT COUNT(*) FROM visits WHERE regexp_matches(diagnosis, CASE WHEN age > 109 THEN '(' ELSE 'x' END)",
    "SELECT COUNT(*) FROM visits WHERE make_date(age, 13, 1) > DATE '2020-01-01'",
    "SELECT COUNT(*) FROM visits WHERE CAST(income AS INT) * 100000000000 > 1",
    "SELECT COUNT(*) FROM visits WHERE TRY_CAST(diagnosis AS DATE) > DATE '2020-01-01'",
    "SELECT COUNT(*) FROM visits WHERE lpad(diagnosis, 20, '') = 'x'",
    # Spark raises on part 0 whatever its ANSI mode (the oracle a review found on the Spark gateway)
    "SELECT COUNT(*) FROM visits WHERE split_part(region, 'x', CASE WHEN age > 109 THEN 0 ELSE 1 END) <> 'zzz'",
    "SELECT COUNT(*) FROM visits WHERE left(region, CASE WHEN age > 109 THEN -1 ELSE 1 END) = 'c'",
    "SELECT COUNT(*) FROM visits WHERE date_diff('month', visit_day, DATE '2015-01-31') > 3",
    # a date difference multiplied (an interval overflow on Spark, a third oracle)
    "SELECT COUNT(*) FROM visits WHERE (visit_day - CASE WHEN age > 109 THEN DATE '0001-01-01' ELSE visit_day END) "
    "* 1000 IS NOT NULL",
    # text read as a date outside years 1-9999 (another oracle of that review)
    "SELECT COUNT(*) FROM visits WHERE date_diff('day', CAST(CASE WHEN age > 109 THEN '+1000000-01-01' "
    "ELSE '2020-01-01' END AS DATE), visit_day) IS NOT NULL",
    "SELECT CAST(CASE WHEN age > 109 THEN '10000-01-01' ELSE '2020-01-01' END AS DATE) AS d, COUNT(*) FROM visits "
    "GROUP BY d",
    # expensive only on matching rows
    "SELECT COUNT(*) FROM visits WHERE CASE WHEN age > 109 THEN length(repeat(region, 1000000)) ELSE 0 END > 1",
    "SELECT COUNT(*) FROM visits WHERE CASE WHEN age > 109 THEN regexp_matches(lpad(region, 90000, 'ab'), "
    "'(a|b)*c') ELSE false END",
    # output expressions over released cells
    "SELECT COUNT(*) // 0, COUNT(*) % 0, COUNT(*) / 0 FROM visits",
    "SELECT COUNT(*) + length(version()) FROM visits",
    "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex HAVING sex > 2",
    "SELECT CAST(COUNT(*) AS BIGINT) * 9223372036854775807 FROM visits",
    # parameters and shapes
    "SELECT QUANTILE_CONT(income, 0.0004) FROM visits",
    "SELECT QUANTILE_CONT(income, 0.999), MEDIAN(age) FROM visits WHERE diagnosis = 'Z99.7'",
    "SELECT diagnosis, COUNT(*), AVG(income) FROM visits GROUP BY diagnosis",
    "SELECT diagnosis, COUNT(*) FROM visits WHERE diagnosis LIKE '% GROUP BY %' GROUP BY diagnosis",
    "SELECT region, MEDIAN(income) FROM visits WHERE diagnosis <> ' GROUP BY ' GROUP BY region",
    "SELECT age // 0 AS a, COUNT(*) FROM visits GROUP BY 1",
    "SELECT FLOOR(income / 1000) AS band, COUNT(*) FROM visits WHERE age > 100 GROUP BY 1",
]


def _worst_case_unit(template: pa.Table) -> pa.Table:
    row = {name: template.column(name)[0].as_py() for name in template.column_names}
    row.update(
        patient_id=UNIT,
        age=110,
        income=500_000.0,
        length_of_stay=60,
        diagnosis="Z99.7",
        region="central",
        triage_note="crushing chest pain radiating to the left arm",
        triage_label="routine",
    )
    return pa.Table.from_pylist([row] * (K + 2), schema=template.schema)


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, Workspace]:
    root = tmp_path_factory.mktemp("neighbours")
    base = generate_visits(6_000, seed=23)
    policy = root / "visits.yaml"
    policy.write_text(DEMO_POLICY_YAML)  # with the public table, so that the corpus's joins run on both
    pacsv.write_csv(diagnosis_chapters(), root / "diagnosis_chapters.csv")
    with_unit = root / "d.parquet"
    without = root / "d_prime.parquet"
    pq.write_table(pa.concat_tables([base, _worst_case_unit(base)]), with_unit)
    pq.write_table(base, without)
    d = build_workspace(root / "D", [(policy, with_unit)], ROLES)
    d_prime_root = root / "Dprime"
    (d_prime_root / "ws" / "private").mkdir(parents=True)
    shutil.copy(d.settings.bounding_key, d_prime_root / "ws" / "private" / "bounding.key")
    d_prime = build_workspace(d_prime_root, [(policy, without)], ROLES)
    return d, d_prime


def corpus() -> list[str]:
    fixture = yaml.safe_load((Path(__file__).parents[1] / "fixtures" / "queries.yaml").read_text())
    accepted = [q["sql"] for q in fixture if q["verdict"] == "accepted" and "visits" in q["sql"].lower()]
    return accepted + ADVERSARIAL


def _shape(sql: str, status: int, body: dict[str, Any]) -> Any:
    if status != 200:
        error = body["error"]
        return status, error["code"], error.get("reason"), error["message"]
    rows_public = (
        "having" not in sql.lower()
        and "diagnosis" not in sql.lower().split("from")[0]
        and "group by diagnosis" not in sql.lower()
        and "limit" not in sql.lower()
    )
    assert all(len(r) == len(body["columns"]) for r in body["rows"]), sql
    return (
        status,
        sorted(body),
        body["columns"],
        len(body["rows"]) if rows_public else None,
        [m["measurement"] for m in body["measurements"]],
    )


@pytest.mark.slow
def test_status_error_and_shape_are_the_same_on_neighbours(neighbours: tuple[Workspace, Workspace]) -> None:
    d, d_prime = neighbours
    queries = corpus()
    assert len(queries) >= 60
    with d.app() as a, d_prime.app() as b:
        seen = []
        for sql in queries:
            body = {"sql": sql, "epsilon": 0.001}
            ra = a.post("/v1/query", json=body, headers=d.headers("analyst"))
            rb = b.post("/v1/query", json=body, headers=d_prime.headers("analyst"))
            sa, sb = _shape(sql, ra.status_code, ra.json()), _shape(sql, rb.status_code, rb.json())
            assert sa == sb, sql
            assert ra.status_code in (200, 400), (sql, ra.json())
            seen.append(ra.status_code)
    assert seen.count(200) > 40 and seen.count(400) > 10
    # Every accepted query ran on the rows: none failed after the charge and answered the default release (which
    # would be a signal about the rows that made it fail).
    for ws in (d, d_prime):
        assert fallbacks(ws) == []


def fallbacks(ws: Workspace) -> list[dict[str, Any]]:
    """The audit records of answers released from the default input after a failure (or failed outright)."""
    log = AuditLog(ws.settings.audit_dir, key_dir=ws.settings.keys_dir)
    return [r for r in log.records() if r.get("reason") in ("fallback", "internal_error")]


def test_a_refused_query_costs_nothing(neighbours: tuple[Workspace, Workspace]) -> None:
    d, _ = neighbours
    with d.app() as client:
        before = client.get("/v1/budget", headers=d.headers("analyst")).json()[0]["spent"]["epsilon"]
        for sql in ADVERSARIAL:
            client.post("/v1/query", json={"sql": sql, "epsilon": 0.1, "dry_run": False}, headers=d.headers("analyst"))
        spent = client.get("/v1/budget", headers=d.headers("analyst")).json()[0]["spent"]["epsilon"]
    accepted = sum(1 for sql in ADVERSARIAL if _accepted(d, sql))
    assert spent - before == pytest.approx(0.1 * accepted, abs=1e-9)


def _accepted(ws: Workspace, sql: str) -> bool:
    with ws.app() as client:
        r = client.post("/v1/query", json={"sql": sql, "epsilon": 0.1, "dry_run": True}, headers=ws.headers("analyst"))
    return r.status_code == 200
