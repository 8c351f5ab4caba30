"""One error shape on every route: bad bodies and parameters are 400 invalid_request naming the field and what is
allowed, unknown routes 404, wrong methods 405; every response carries the security headers."""

from __future__ import annotations

from typing import Any

import pytest

from audit.log import AuditLog
from audit.record import known_events
from gateway.http.app import create_app
from tests.conftest import AppClient, Workspace

COUNT = "SELECT COUNT(*) FROM visits"

# (role, method, url, request arguments, words the message must contain)
BAD: list[tuple[str, str, str, dict[str, Any], list[str]]] = [
    ("analyst", "POST", "/v1/query", {"json": {"sql": COUNT, "epsilon": 0}}, ["epsilon", "0.001", "1000"]),
    ("analyst", "POST", "/v1/query", {"json": {"sql": COUNT, "epsilon": "abc"}}, ["epsilon", "JSON number"]),
    ("analyst", "POST", "/v1/query", {"json": {"sql": COUNT, "epsilon": True}}, ["epsilon", "JSON number"]),
    ("analyst", "POST", "/v1/query", {"content": b'{"sql": "SELECT 1", "epsilon": 1}'}, ["Content-Type"]),
    (
        "analyst",
        "POST",
        "/v1/query",
        {"content": b'{"sql": ', "headers": {"content-type": "application/json"}},
        ["not valid JSON"],
    ),
    ("analyst", "POST", "/v1/query", {"json": [1, 2]}, ["JSON object", "sql", "epsilon"]),
    ("analyst", "POST", "/v1/query", {"json": {"epsilon": 1}}, ["sql", "required"]),
    ("analyst", "POST", "/v1/query", {"json": {"sql": COUNT, "epsilon": 1, "eps": 1}}, ["eps", "sql, epsilon"]),
    ("analyst", "POST", "/v1/query", {"json": {"sql": COUNT, "epsilon": 1, "dry_run": "maybe"}}, ["dry_run"]),
    ("analyst", "POST", "/v1/query", {"json": {"sql": COUNT, "accuracy": {"n": "x"}}}, ["accuracy"]),
    ("lf_author", "POST", "/v1/lf/stats", {"json": {"dataset": "visits", "epsilon": "x"}}, ["epsilon"]),
    ("auditor", "GET", "/v1/audit/events?limit=abc", {}, ["query parameter limit", "integer"]),
    ("auditor", "GET", "/v1/audit/events?limit=0", {}, ["query parameter limit", "greater than or equal to 1"]),
    ("auditor", "GET", "/v1/audit/events?since=yesterday", {}, ["since", "ISO 8601"]),
    ("auditor", "GET", "/v1/audit/events?event=lf_stat", {}, ["lf_stat", "lf_stats", "query"]),
    ("auditor", "GET", "/v1/audit/events?decision=ok", {}, ["decision", "allowed, denied, error"]),
    ("auditor", "GET", "/v1/audit/spend?event=nope", {}, ["nope", "lf_stats"]),
    ("auditor", "GET", "/v1/audit/events/abc", {}, ["path parameter seq", "integer"]),
    ("auditor", "GET", "/v1/audit/export?format=xml", {}, ["format", "'jsonl' or 'csv'"]),
    ("auditor", "GET", "/v1/audit/checkpoints/consistency", {}, ["query parameter old", "required"]),
]


@pytest.mark.parametrize(
    ("role", "method", "url", "args", "words"),
    BAD,
    ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)],
)
def test_bad_requests_get_400_in_the_one_shape_naming_the_field(
    workspace: Workspace, role: str, method: str, url: str, args: dict[str, Any], words: list[str]
) -> None:
    args = dict(args)
    args["headers"] = {**workspace.headers(role), **args.get("headers", {})}
    with workspace.app() as c:
        r = c.request(method, url, **args)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert "[" not in error["message"].split(";")[0] or "'" in error["message"]  # no pydantic union tags


def test_unknown_event_filter_lists_the_known_events(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.get("/v1/audit/events", params={"event": "lf_stat"}, headers=workspace.headers("auditor"))
        assert r.json()["error"]["allowed"] == known_events()
        assert r.json()["error"]["field"] == "event"
        # the legacy name of old logs stays a valid filter
        ok = c.get("/v1/audit/events", params={"event": "labeling"}, headers=workspace.headers("auditor"))
        assert ok.status_code == 200 and ok.json()["events"] == []


def test_unknown_routes_and_methods_in_the_one_shape(workspace: Workspace) -> None:
    with workspace.app() as c:
        missing = c.get("/v1/nothing", headers=workspace.headers("analyst"))
        wrong = c.post("/v1/budget", headers=workspace.headers("analyst"))
        deleted = c.delete("/v1/query")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found" and "/docs" in missing.json()["error"]["message"]
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert wrong.json()["error"] == {
        "code": "method_not_allowed",
        "message": "POST is not allowed on /v1/budget; allowed: GET",
        "path": "/v1/budget",
    }
    assert deleted.status_code == 405 and deleted.json()["error"]["code"] == "method_not_allowed"


def test_lf_denials_are_recorded_under_the_lf_event(workspace: Workspace) -> None:
    body = {"dataset": "visits", "epsilon": 0.5, "lfs": [{"name": "old", "when": "age > 70", "label": "urgent"}]}
    with workspace.app() as c:
        r = c.post("/v1/lf/stats", json=body, headers=workspace.headers("analyst"))  # no labeling grant
        assert r.status_code == 403
        listed = c.get("/v1/audit/events", params={"event": "lf_stats"}, headers=workspace.headers("auditor"))
    denied = [e for e in listed.json()["events"] if e["decision"] == "denied"]
    assert [e["reason"] for e in denied] == ["forbidden"]
    names = {r["event"] for r in AuditLog(workspace.settings.audit_dir).records()}
    assert "labeling" not in names


@pytest.mark.parametrize("path", ["/", "/v1/budget", "/v1/nothing", "/openapi.json", "/docs", "/audit/login"])
def test_every_response_sends_the_security_headers(workspace: Workspace, path: str) -> None:
    with workspace.app() as c:
        r = c.get(path, headers=workspace.headers("analyst"))
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    if path == "/docs":
        assert "script-src 'self' 'sha256-" in csp and "connect-src 'self'" in csp
    elif path == "/audit/login":
        assert "style-src 'nonce-" in csp
    else:
        assert "script-src" not in csp


def test_index_points_at_the_docs_and_the_auditor_page(workspace: Workspace) -> None:
    with workspace.app() as c:
        index = c.get("/").json()
        assert c.get(index["docs"]).status_code == 200
        assert c.get(index["openapi"]).status_code == 200
        assert c.get(index["audit"]).status_code == 200


def test_openapi_declares_the_bearer_scheme_on_authenticated_routes(workspace: Workspace) -> None:
    with workspace.app() as c:
        spec = c.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API token from `bastion token create`",
    }
    assert spec["paths"]["/v1/query"]["post"]["security"] == [{"HTTPBearer": []}]
    assert spec["paths"]["/v1/audit/events"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "/docs" not in spec["paths"] and "/" not in spec["paths"]


def test_openapi_documents_the_not_ready_conflict_of_synth_results(workspace: Workspace) -> None:
    with workspace.app() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v1/synth/{job_id}/download", "/v1/synth/{job_id}/report", "/v1/synth/{job_id}/report/{page}"):
        assert "synth_job_not_ready" in paths[path]["get"]["responses"]["409"]["description"]
        assert "422" not in paths[path]["get"]["responses"]


def test_an_unexpected_error_is_a_bare_500_with_the_security_headers(workspace: Workspace) -> None:
    client = AppClient(create_app(workspace.settings), raise_server_exceptions=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a message that must not leave")

    with client as c:
        c.app.state.bastion.budgets = broken
        r = c.get("/v1/budget", headers=workspace.headers("analyst"))
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "internal error"}}
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in r.headers["content-security-policy"]
