"""Nothing a client sends becomes an identity or a path: the gateway makes every request id itself."""

from __future__ import annotations

import re

import pytest

from audit.log import AuditLog
from gateway.stores.ledger import Ledger
from tests.conftest import Workspace

SQL = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex"
HEX = re.compile(r"[0-9a-f]{32}")


def _records(workspace: Workspace) -> list[dict]:
    return AuditLog(workspace.settings.audit_dir).records()


@pytest.mark.parametrize("hostile", ["/../../x", "../../private/bounding.key", "a" * 65])
def test_a_hostile_request_id_header_is_never_a_request_id(workspace: Workspace, hostile: str) -> None:
    headers = {**workspace.headers("analyst"), "X-Request-Id": hostile}
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=headers)
        unauthenticated = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers={"X-Request-Id": hostile})
    assert r.status_code == 200, r.text
    assert unauthenticated.status_code == 401
    for response in (r, unauthenticated):
        assert HEX.fullmatch(response.headers["x-request-id"])
    rid = r.json()["query_id"]
    assert r.headers["x-request-id"] == rid
    records = _records(workspace)
    assert {rec["request_id"] for rec in records if rec["event"] == "query"} == {rid}
    assert all(HEX.fullmatch(rec["request_id"]) for rec in records)
    assert not any("correlation_id" in rec for rec in records)  # an invalid header is ignored, not recorded
    denied = next(rec for rec in records if rec["event"] == "authentication")
    assert denied["request_id"] == unauthenticated.headers["x-request-id"]
    assert [h["request_id"] for h in Ledger(workspace.settings.ledger).history()] == [rid]


def test_a_valid_request_id_header_is_kept_as_a_correlation_id_only(workspace: Workspace) -> None:
    headers = {**workspace.headers("analyst"), "X-Request-Id": "job-42.step_7"}
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=headers)
        again = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=headers)
    assert r.status_code == again.status_code == 200
    assert r.json()["query_id"] != again.json()["query_id"]  # one id per request, whatever the client sends
    queries = [rec for rec in _records(workspace) if rec["event"] == "query"]
    assert [(rec["phase"], rec["reason"]) for rec in queries] == [
        ("admitted", "ok"),
        ("released", "ok"),
        ("released", "cached"),
    ]
    assert {rec["correlation_id"] for rec in queries} == {"job-42.step_7"}
    assert all(rec["request_id"] != "job-42.step_7" and HEX.fullmatch(rec["request_id"]) for rec in queries)
    assert [h["request_id"] for h in Ledger(workspace.settings.ledger).history()] == [r.json()["query_id"]]
