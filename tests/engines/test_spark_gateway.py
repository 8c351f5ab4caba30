"""The gateway on the Spark engine: the same API (queries, labeling functions, synthetic proxies), the same
charges, the same audit trail; what Spark cannot do safely is refused before anything is charged."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.demo import POLICY_YAML
from gateway.engines.kind import EngineKind
from tests.conftest import ROLES, Workspace, build_workspace
from tests.privacy.test_neighbours import corpus, fallbacks
from tests.synth.helpers import proxy_frame, wait

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def spark_ws(tmp_path_factory: pytest.TempPathFactory, demo_source: tuple[Path, Path]) -> Workspace:
    root = tmp_path_factory.mktemp("spark-gateway")
    data, _ = demo_source
    policy = root / "visits.yaml"  # the demo's policy without its public table: Spark has no public tables yet
    policy.write_text(POLICY_YAML)
    return build_workspace(root, [(policy, data)], ROLES, engine=EngineKind.SPARK)


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


def test_labeling_function_statistics_are_answered_charged_and_audited(spark_ws: Workspace) -> None:
    client, headers = spark_ws.app(), spark_ws.headers("lf_author")
    before = _spent(client, headers)
    lfs = [
        {"name": "old", "when": "age > 60", "label": "urgent"},
        {"name": "pain", "keywords": {"column": "triage_note", "any": ["pain"]}, "label": "urgent"},
        {"name": "short", "when": "length_of_stay = 0", "label": "routine"},
    ]
    body = {"dataset": "visits", "epsilon": 1, "lfs": lfs, "python_lfs": ["urgent_diagnosis"], "label_model": True}
    r = client.post("/v1/lf/stats", json=body, headers=headers)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [lf["name"] for lf in answer["lfs"]] == ["old", "pain", "short", "urgent_diagnosis"]
    assert answer["label_model"]["output"]
    assert _spent(client, headers) == pytest.approx(before + 1.0)
    page = client.get("/v1/audit/events", params={"event": "lf_stats"}, headers=spark_ws.headers("auditor")).json()
    assert {"admitted", "released"} <= {e.get("phase") for e in page["events"]}


def test_a_dp_synthetic_proxy_is_built_on_spark(spark_ws: Workspace) -> None:
    client, headers = spark_ws.app(), spark_ws.headers("analyst")
    before = _spent(client, headers)
    body = {"dataset": "visits", "epsilon": 1, "rows": 300, "seed": 4, "method": "dpcopula_direct", "delta": 1e-7}
    r = client.post("/v1/synth", json=body, headers=headers)
    assert r.status_code == 200, r.text
    job = wait(client, headers, r.json()["job_id"])
    assert job["status"] == "done", job
    frame = proxy_frame(client, headers, job["job_id"])
    assert len(frame) == 300 and {"age", "sex", "region", "income", "visit_day"} <= set(frame.columns)
    assert _spent(client, headers) == pytest.approx(before + 1.0)


@pytest.mark.parametrize(
    "lf",
    [
        {"name": "rx", "regex": {"column": "triage_note", "pattern": "(a|aa)+b"}, "label": "urgent"},
        {"name": "like", "when": "triage_note LIKE '%a%a%b'", "label": "urgent"},
    ],
)
def test_a_backtracking_labeling_function_is_refused_before_the_charge(spark_ws: Workspace, lf: dict) -> None:
    client, headers = spark_ws.app(), spark_ws.headers("lf_author")
    before = _spent(client, headers)
    r = client.post("/v1/lf/stats", json={"dataset": "visits", "epsilon": 1, "lfs": [lf]}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["reason"] == "engine_unsupported", r.text
    assert _spent(client, headers) == before


@pytest.mark.slow
def test_no_accepted_query_fails_on_the_rows_after_the_charge(spark_ws: Workspace) -> None:
    """The neighbours corpus (accepted and adversarial queries) on Spark: every accepted query is computed on the
    rows, none falls back to the default release, which would say something about the rows that failed it."""
    client, headers = spark_ws.app(), spark_ws.headers("analyst")
    answered = 0
    for sql in corpus():
        r = client.post("/v1/query", json={"sql": sql, "epsilon": 0.001}, headers=headers)
        assert r.status_code in (200, 400), (sql, r.text)
        answered += r.status_code == 200
    assert answered > 40
    assert fallbacks(spark_ws) == []


def test_a_backtracking_pattern_is_refused_before_the_charge(spark_ws: Workspace) -> None:
    client, headers = spark_ws.app(), spark_ws.headers("analyst")
    before = _spent(client, headers)
    sql = "SELECT COUNT(*) FROM visits WHERE sex = 'F' OR diagnosis LIKE '%a%a%a%b'"
    r = client.post("/v1/query", json={"sql": sql, "epsilon": 0.5}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["reason"] == "engine_unsupported"
    assert _spent(client, headers) == before
