"""Bad input on the query path: refused with 400 in the one error shape before anything is charged, audited, and
never echoed back when JSON cannot hold it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from audit.log import AuditLog
from gateway.stores.ledger import Ledger
from tests.conftest import Workspace

COUNT = "SELECT COUNT(*) FROM visits"


def _post(c: Any, workspace: Workspace, raw: str) -> Any:
    headers = {**workspace.headers("analyst"), "content-type": "application/json"}
    return c.post("/v1/query", content=raw.encode(), headers=headers)


@pytest.mark.parametrize(
    "field",
    ['"delta": -Infinity', '"delta": Infinity', '"delta": NaN', '"delta": 0.5', '"delta": -1e-9'],
)
def test_a_bad_delta_is_refused_even_when_no_key_selection_would_spend_it(workspace: Workspace, field: str) -> None:
    with workspace.app() as c:
        r = _post(c, workspace, f'{{"sql": "{COUNT}", "epsilon": 1, {field}}}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "delta" in r.json()["error"]["message"]
    assert Ledger(workspace.settings.ledger).history() == []
    denied = [rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["event"] == "query"]
    assert [(rec["decision"], rec["reason"]) for rec in denied] == [("denied", "invalid_request")]


@pytest.mark.parametrize("field", ["epsilon", "alpha", "delta"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_parameters_are_refused_without_being_echoed(workspace: Workspace, field: str, value: str) -> None:
    body = f'{{"sql": "{COUNT}", "epsilon": 1, "{field}": {value}}}'
    with workspace.app() as c:
        r = _post(c, workspace, body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert field in message
    assert not any(word in message.lower() for word in ("nan", "inf"))  # the value is named by its kind only
    assert Ledger(workspace.settings.ledger).history() == []


def test_an_invalid_body_of_an_authenticated_caller_is_audited(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = _post(c, workspace, json.dumps({"sql": COUNT, "epsilon": "1", "secret_field_name_x": 1}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    records = [rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["event"] == "invalid_request"]
    assert len(records) == 1
    rec = records[0]
    assert rec["actor"]["principal"] == "alice" and rec["decision"] == "denied"
    assert rec["request"]["path"] == "/v1/query" and rec["request_id"] == r.headers["x-request-id"]
    problems = rec["request"]["problems"]
    assert any(p.startswith("epsilon") for p in problems) and any("secret_field_name_x" in p for p in problems)
    assert Ledger(workspace.settings.ledger).history() == []


def test_sql_over_the_declared_length_is_refused_before_parsing(workspace: Workspace) -> None:
    limit = workspace.settings.limits.max_sql_chars
    sql = "SELECT COUNT(*) FROM visits WHERE " + " OR ".join(["age = 1"] * (limit // 10))
    assert len(sql) > limit
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst"))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "query_rejected" and error["reason"] == "too_long"
    assert f"{limit:,}" in error["message"]
    denied = [rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["event"] == "query"]
    assert [(rec["decision"], rec["reason"]) for rec in denied] == [("denied", "too_long")]
    assert Ledger(workspace.settings.ledger).history() == []


def test_a_huge_statement_is_refused_after_parsing_before_planning(workspace: Workspace) -> None:
    sql = "SELECT SUM(" + " + ".join(["age"] * 10_000) + ") FROM visits"
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst"))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["reason"] == "too_complex" and "10,000 syntax nodes" in error["message"]
    assert len(r.content) < 2_000  # the refusal does not quote the statement back
    assert Ledger(workspace.settings.ledger).history() == []
