"""Every request that touches private data leaves audit records; no record, no answer."""

from __future__ import annotations

from audit.log import AuditLog, AuditWriteError
from tests.conftest import Workspace

SQL = "SELECT sex, COUNT(*) FROM visits GROUP BY sex"


def test_allowed_and_denied_requests_are_recorded(workspace: Workspace) -> None:
    with workspace.app() as c:
        c.post("/v1/query", json={"sql": SQL, "epsilon": 1}, headers=workspace.headers("analyst"))
        c.post("/v1/query", json={"sql": "SELECT MAX(age) FROM visits", "epsilon": 1},
               headers=workspace.headers("analyst"))
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
