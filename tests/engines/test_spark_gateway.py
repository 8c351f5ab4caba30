"""The gateway on the Spark engine: the same API, the same charges, the same audit trail; what Spark cannot do
safely or yet is refused before anything is charged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROLES, Workspace, build_workspace

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def spark_ws(tmp_path_factory: pytest.TempPathFactory, demo_source: tuple[Path, Path]) -> Workspace:
    root = tmp_path_factory.mktemp("spark-gateway")
    data, policy = demo_source
    return build_workspace(root, [(policy, data)], ROLES, engine="spark")


def _spent(client, headers) -> float:
    budgets = client.get("/v1/budget", headers=headers).json()
    return sum(b["spent"]["epsilon"] for b in budgets)


def test_a_query_is_answered_charged_and_audited(spark_ws: Workspace) -> None:
    client, headers = spark_ws.app(), spark_ws.headers("analyst")
    before = _spent(client, headers)
    sql = "SELECT region, COUNT(*) AS n, AVG(income) AS mean FROM visits WHERE age >= 65 GROUP BY region"
    r = client.post("/v1/query", json={"sql": sql, "epsilon": 0.5}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [row[0] for row in body["rows"]] and len(body["rows"]) == 5
    for row, cells in zip(body["rows"], body["intervals"], strict=True):
        assert cells[1][0] <= row[1] <= cells[1][1]
    assert _spent(client, headers) == pytest.approx(before + 0.5)
    page = client.get("/v1/audit/events", params={"event": "query"}, headers=spark_ws.headers("auditor")).json()
    events = page["events"]
    assert any(e.get("phase") == "released" for e in events)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/lf/stats",
            {"dataset": "visits", "epsilon": 1, "lfs": [{"name": "old", "when": "age > 60", "label": "urgent"}]},
        ),
        ("/v1/synth", {"dataset": "visits", "epsilon": 1, "rows": 100}),
    ],
)
def test_what_spark_cannot_run_yet_is_refused_before_the_charge(spark_ws: Workspace, path: str, body: dict) -> None:
    role = "lf_author" if "lf" in path else "analyst"
    client, headers = spark_ws.app(), spark_ws.headers(role)
    before = _spent(client, headers)
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert "duckdb engine only" in r.json()["error"]["message"]
    assert _spent(client, headers) == before


def test_a_backtracking_pattern_is_refused_before_the_charge(spark_ws: Workspace) -> None:
    client, headers = spark_ws.app(), spark_ws.headers("analyst")
    before = _spent(client, headers)
    sql = "SELECT COUNT(*) FROM visits WHERE sex = 'F' OR diagnosis LIKE '%a%a%a%b'"
    r = client.post("/v1/query", json={"sql": sql, "epsilon": 0.5}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["reason"] == "engine_unsupported"
    assert _spent(client, headers) == before
