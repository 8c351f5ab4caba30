"""Every request that touches private data leaves audit records; no record, no answer."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from audit.log import AuditLog, AuditWriteError
from policies.errors import QueryRejected
from tests.conftest import Workspace

SQL = "SELECT sex, COUNT(*) FROM visits GROUP BY sex"


def test_allowed_and_denied_requests_are_recorded(workspace: Workspace) -> None:
    with workspace.app() as c:
        c.post("/v1/query", json={"sql": SQL, "epsilon": 1}, headers=workspace.headers("analyst"))
        c.post(
            "/v1/query", json={"sql": "SELECT MAX(age) FROM visits", "epsilon": 1}, headers=workspace.headers("analyst")
        )
        c.post("/v1/query", json={"sql": SQL, "epsilon": 1}, headers=workspace.headers("lf_author"))
        c.post("/v1/query", json={"sql": SQL, "epsilon": 1})
    records = AuditLog(workspace.settings.audit_dir).records()
    queries = [r for r in records if r["event"] == "query"]
    phases = [(r["actor"]["principal"], r["decision"], r.get("phase"), r["reason"]) for r in queries]
    assert ("alice", "allowed", "admitted", "ok") in phases
    assert ("alice", "allowed", "released", "ok") in phases
    assert ("alice", "denied", None, "min_max") in phases
    assert ("lena", "denied", None, "forbidden") in phases
    assert any(r["event"] == "authentication" and r["decision"] == "denied" for r in records)
    released = next(r for r in queries if r.get("phase") == "released")
    assert len(released["release_digest"]) == 64 and released["cost"]["epsilon"] == 1.0
    assert "rows" not in released and "token" not in str(released["actor"]).replace("token_id", "")
    ok, _ = AuditLog(workspace.settings.audit_dir).verify()
    assert ok


def test_failed_audit_append_gives_503_and_no_numbers(workspace: Workspace, monkeypatch) -> None:
    with workspace.app() as c:

        def broken(self: AuditLog, event: dict) -> dict:
            raise AuditWriteError("disk full")

        monkeypatch.setattr(AuditLog, "append", broken)
        r = c.post("/v1/query", json={"sql": SQL, "epsilon": 1}, headers=workspace.headers("analyst"))
    assert r.status_code == 503
    body = r.json()
    assert body["error"]["code"] == "audit_unavailable"
    assert "rows" not in body and "intervals" not in body


# --- after the charge, the answer depends on public facts only -------------------------------------------------

SECRET = "Conversion Error: could not convert string 'patient-4711-HIV' to INT32"
GROUPED = "SELECT sex, COUNT(*) AS n, AVG(age) AS mean_age FROM visits GROUP BY sex"


def _failing_once(monkeypatch, exc: Exception) -> None:
    """The engine fails on the private rows (its message quotes a row value); the default input works."""
    import gateway.service as service

    real, calls = service.execute, []

    def execute(*args: Any, **kwargs: Any) -> Any:  # forwards whatever the service passes
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "execute", execute)


@pytest.mark.parametrize(
    "error", [RuntimeError(SECRET), QueryRejected(SECRET, reason="engine")], ids=["engine error", "gateway error"]
)
def test_a_failing_computation_answers_the_default_input_release(
    workspace: Workspace, monkeypatch, caplog, error: Exception
) -> None:
    caplog.set_level(logging.DEBUG)
    analyst = workspace.headers("analyst")
    with workspace.app() as c:
        normal = c.post("/v1/query", json={"sql": GROUPED, "epsilon": 1}, headers=analyst)
        _failing_once(monkeypatch, error)
        r = c.post("/v1/query", json={"sql": GROUPED, "epsilon": 0.9}, headers=analyst)
    assert normal.status_code == r.status_code == 200, r.text
    body, expected = r.json(), normal.json()
    assert body.keys() == expected.keys() and body["columns"] == expected["columns"]
    assert len(body["rows"]) == len(expected["rows"]) == 3 and [row[0] for row in body["rows"]] == ["F", "M", "X"]
    assert all(len(cells) == len(expected["intervals"][0]) for cells in body["intervals"])
    assert body["epsilon_spent"] == 0.9
    assert "patient" not in r.text and "Conversion" not in r.text
    assert "patient" not in caplog.text and "Conversion" not in caplog.text
    assert type(error).__name__ in caplog.text
    released = [
        rec
        for rec in AuditLog(workspace.settings.audit_dir).records()
        if rec["event"] == "query" and rec.get("phase") == "released"
    ]
    assert released[-1]["reason"] == "fallback" and released[-1]["error"] == type(error).__name__
    assert released[-1]["decision"] == "allowed" and released[-1]["cost"]["epsilon"] == 0.9
    assert released[0]["reason"] == "ok" and "error" not in released[0]
    assert "patient" not in (workspace.settings.audit_dir / "audit.jsonl").read_text()


def test_when_the_default_input_fails_too_the_error_is_fixed(workspace: Workspace, monkeypatch, caplog) -> None:
    import gateway.service as service

    def fails(*args: object, **kwargs: object) -> object:
        raise RuntimeError(SECRET)

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(service, "execute", fails)
    monkeypatch.setattr(service.Bastion, "_default_release", lambda self, plan, pricing: fails())
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": GROUPED, "epsilon": 0.5}, headers=workspace.headers("analyst"))
    rid = r.headers["x-request-id"]
    assert r.status_code == 500
    assert r.json() == {
        "error": {"code": "internal_error", "message": f"internal error (request {rid}); the charge stands"}
    }
    assert "patient" not in caplog.text and "Conversion" not in caplog.text and "Traceback" not in caplog.text
    failed = AuditLog(workspace.settings.audit_dir).records()[-1]
    assert (failed["phase"], failed["decision"], failed["reason"]) == ("failed", "error", "internal_error")
    assert failed["error"] == failed["fallback_error"] == "RuntimeError"
