"""Refusals found by an adversarial pass over the gateway: each was a 500, an unaudited or anonymous refusal, a lax
type or a leaked name; each is now a 400 in the one error shape, audited under the right identity."""

from __future__ import annotations

import json
from typing import Any

import pytest

from audit.log import AuditLog
from gateway.stores.ledger import Ledger
from tests.conftest import Workspace

COUNT = "SELECT COUNT(*) FROM visits"
HUGE = "1" + "0" * 309  # a JSON integer no float can hold


def _post(c: Any, workspace: Workspace, path: str, raw: bytes, role: str | None = "analyst") -> Any:
    headers = {**(workspace.headers(role) if role else {}), "content-type": "application/json"}
    return c.post(path, content=raw, headers=headers)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/query", f'{{"sql": "{COUNT}", "epsilon": {HUGE}}}'),
        ("/v1/query", f'{{"sql": "{COUNT}", "epsilon": 1, "alpha": {HUGE}}}'),
        ("/v1/query", f'{{"sql": "{COUNT}", "epsilon": 1, "delta": {HUGE}}}'),
        ("/v1/query", f'{{"sql": "{COUNT}", "accuracy": {HUGE}}}'),
        ("/v1/query", f'{{"sql": "{COUNT}", "accuracy": {{"n": {HUGE}}}}}'),
        ("/v1/synth", f'{{"dataset": "visits", "epsilon": {HUGE}}}'),
    ],
)
def test_an_integer_too_large_for_a_float_is_a_400(workspace: Workspace, path: str, body: str) -> None:
    with workspace.app() as c:
        r = _post(c, workspace, path, body.encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "finite" in r.json()["error"]["message"]
    assert Ledger(workspace.settings.ledger).history() == []
    records = [rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["event"] == "invalid_request"]
    assert [rec["actor"]["principal"] for rec in records] == ["alice"]


@pytest.mark.parametrize("value", ['"yes"', '"true"', "1", "null"])
def test_dry_run_takes_a_json_boolean_only(workspace: Workspace, value: str) -> None:
    with workspace.app() as c:
        r = _post(c, workspace, "/v1/query", f'{{"sql": "{COUNT}", "epsilon": 1, "dry_run": {value}}}'.encode())
    assert r.status_code == 400, r.text
    assert "dry_run" in r.json()["error"]["message"]
    assert Ledger(workspace.settings.ledger).history() == []


def test_malformed_json_of_a_signed_in_caller_is_audited_as_theirs_and_never_locks_out(workspace: Workspace) -> None:
    threshold = workspace.settings.limits.max_refusals
    with workspace.app() as c:
        answers = [_post(c, workspace, "/v1/query", b'{"sql":') for _ in range(threshold + 5)]
        after = c.get("/v1/budget", headers=workspace.headers("analyst"))
    assert {r.status_code for r in answers} == {400}
    first = answers[0].json()["error"]
    assert first["code"] == "invalid_request" and "not valid JSON" in first["message"]
    assert first.get("field") is None  # a character position is not a field
    assert after.status_code == 200  # the caller's own bad bodies are not refusals before authentication
    records = list(AuditLog(workspace.settings.audit_dir).records())
    invalid = [rec for rec in records if rec["event"] == "invalid_request"]
    assert len(invalid) == threshold + 5 and {rec["actor"]["principal"] for rec in invalid} == {"alice"}
    assert not [rec for rec in records if rec["event"] == "authentication"]


def test_malformed_json_without_a_valid_token_is_counted_as_a_refusal_before_authentication(
    workspace: Workspace,
) -> None:
    with workspace.app() as c:
        r = _post(c, workspace, "/v1/query", b'{"sql":', role=None)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    refused = [rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["event"] == "authentication"]
    assert [(rec["actor"]["principal"], rec["reason"]) for rec in refused] == [("anonymous", "invalid_request")]


def test_a_body_that_is_not_utf8_is_an_audited_invalid_request(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = _post(c, workspace, "/v1/query", b'{"sql": "SELECT \xff\xfe", "epsilon": 1}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request" and "UTF-8" in r.json()["error"]["message"]
    records = [rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["event"] == "invalid_request"]
    assert [rec["actor"]["principal"] for rec in records] == ["alice"]
    assert Ledger(workspace.settings.ledger).history() == []


@pytest.mark.parametrize("sql", ["SELECT COUNT(ssn) AS n FROM visits", "SELECT ssn, COUNT(*) FROM visits GROUP BY ssn"])
def test_a_hidden_column_is_refused_like_one_that_does_not_exist(workspace: Workspace, sql: str) -> None:
    with workspace.app() as c:
        hidden = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst"))
        absent = c.post(
            "/v1/query", json={"sql": sql.replace("ssn", "qqq"), "epsilon": 1}, headers=workspace.headers("analyst")
        )
    h, a = hidden.json()["error"], absent.json()["error"]
    assert hidden.status_code == absent.status_code == 400
    assert h["reason"] == a["reason"] == "unknown_column"
    assert h["message"].replace("ssn", "qqq") == a["message"]
    assert "hidden" not in json.dumps(h) and "ssn" not in h.get("hint", "")


def test_serve_believes_no_proxy_headers_unless_told(monkeypatch: pytest.MonkeyPatch, workspace: Workspace) -> None:
    import uvicorn

    from gateway.cli.main import _run_server

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(kw))
    _run_server("app", workspace.settings)
    trusted = workspace.settings.model_copy(update={"trusted_proxies": ["10.0.0.7"]})
    _run_server("app", trusted)
    assert (seen[0]["proxy_headers"], seen[0]["forwarded_allow_ips"]) == (False, "")
    assert (seen[1]["proxy_headers"], seen[1]["forwarded_allow_ips"]) == (True, "10.0.0.7")


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT COUNT(*) FROM visits WHERE age > {HUGE}",
        f"SELECT COUNT(*) FROM visits WHERE age > -{HUGE}",
        f"SELECT COUNT(*) FROM visits WHERE age IN ({HUGE})",
    ],
)
def test_an_integer_literal_too_large_for_a_float_is_refused_before_the_charge(workspace: Workspace, sql: str) -> None:
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst"))
        lf = c.post(
            "/v1/lf/stats",
            json={
                "dataset": "visits",
                "epsilon": 1,
                "lfs": [{"name": "big", "label": "urgent", "when": sql.split("WHERE ", 1)[1]}],
            },
            headers=workspace.headers("lf_author"),
        )
    for answer in (r, lf):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["reason"] == "bad_argument"
    assert Ledger(workspace.settings.ledger).history() == []
    denied = [rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["decision"] == "denied"]
    assert [rec["event"] for rec in denied] == ["query", "lf_stats"]


@pytest.mark.parametrize(
    "lf",
    [
        {"keywords": {"column": "triage_note", "any": ["pain"], "case_sensitive": "yes"}},
        {"keywords": {"column": "triage_note", "any": ["pain"], "case_sensitive": 1}},
        {"regex": {"column": "triage_note", "pattern": "pain", "ignore_case": "true"}},
    ],
)
def test_lf_option_flags_take_json_booleans_only(workspace: Workspace, lf: dict[str, Any]) -> None:
    body = {"dataset": "visits", "epsilon": 1, "lfs": [{"name": "flag", "label": "urgent", **lf}]}
    with workspace.app() as c:
        r = c.post("/v1/lf/stats", json=body, headers=workspace.headers("lf_author"))
    assert r.status_code == 400, r.text
    assert "must be true or false" in r.json()["error"]["message"]
    assert Ledger(workspace.settings.ledger).history() == []


@pytest.mark.parametrize(
    "condition",
    [
        "diagnosis LIKE 'J!' ESCAPE '!'",  # a pattern that ends in its escape
        "diagnosis LIKE '!' ESCAPE '!'",
        "diagnosis LIKE 'J%' ESCAPE '%'",
        "diagnosis ILIKE 'J_' ESCAPE '_'",
        "diagnosis LIKE 'J!x%' ESCAPE '!'",  # an escape before an ordinary character
        "diagnosis LIKE 'x' ESCAPE 'é'",  # one character, two bytes
        "(CASE WHEN diagnosis = 'Z99.7' THEN 'x' END) LIKE 'x' ESCAPE 'é'",
    ],
)
def test_a_like_escape_the_engine_would_reject_only_on_some_rows_is_refused_before_the_charge(
    workspace: Workspace, condition: str
) -> None:
    """The engines check a LIKE's escape only when a row reaches it: their error, and so the answer (a fallback
    release after the charge), would depend on whether some unit's row matches. Refused by the query alone."""
    with workspace.app() as c:
        r = c.post(
            "/v1/query",
            json={"sql": f"SELECT COUNT(*) FROM visits WHERE {condition}", "epsilon": 1},
            headers=workspace.headers("analyst"),
        )
        lf = c.post(
            "/v1/lf/stats",
            json={"dataset": "visits", "epsilon": 1, "lfs": [{"name": "esc", "label": "urgent", "when": condition}]},
            headers=workspace.headers("lf_author"),
        )
    for answer in (r, lf):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["reason"] == "bad_argument"
    assert Ledger(workspace.settings.ledger).history() == []


def test_a_well_formed_like_escape_is_answered(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.post(
            "/v1/query",
            json={
                "sql": "SELECT COUNT(*) FROM visits WHERE diagnosis LIKE 'J!%%' ESCAPE '!' OR diagnosis LIKE 'a!!b'"
                " ESCAPE '!' OR diagnosis LIKE 'x!_' ESCAPE '!'",
                "epsilon": 1,
            },
            headers=workspace.headers("analyst"),
        )
    assert r.status_code == 200, r.text
