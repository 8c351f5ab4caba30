"""The auditor page's sessions: the cookie holds a random session id kept server-side (never the token), sign-out
ends it, it expires, and the state-changing forms refuse another site's Origin or Referer (audited)."""

from __future__ import annotations

import time

import pytest

from audit.log import AuditLog
from gateway.http.sessions import SessionStore
from gateway.stores.tokens import Principal
from tests.conftest import Workspace


def _login(c, workspace: Workspace, **headers: str):  # type: ignore[no-untyped-def]
    return c.post("/audit/login", data={"token": workspace.tokens["auditor"]}, headers=headers, follow_redirects=False)


def test_the_cookie_holds_a_session_id_stored_only_as_a_hash(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = _login(c, workspace)
        assert r.status_code == 303
        session = c.cookies["bastion_audit"]
        assert len(session) >= 40 and workspace.tokens["auditor"] not in r.headers["set-cookie"]
        stored = list((workspace.settings.workspace / "sessions").iterdir())
        assert len(stored) == 1 and session not in stored[0].name and session not in stored[0].read_text()
        assert c.get("/audit").status_code == 200
        # A second sign-in is a second session; signing out of one leaves the other.
        other = _login(c, workspace)
        second = c.cookies["bastion_audit"]
        assert other.status_code == 303 and second != session
        c.post("/audit/logout", follow_redirects=False)
        c.cookies.set("bastion_audit", session, path="/audit")
        assert c.get("/audit").status_code == 200
        c.cookies.set("bastion_audit", second, path="/audit")
        ended = c.get("/audit")
        assert ended.status_code == 401 and "Your session has ended" in ended.text
    assert len(list((workspace.settings.workspace / "sessions").iterdir())) == 1


def test_sessions_expire_and_are_swept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = SessionStore(tmp_path / "sessions", lifetime=1)
    who = Principal("otto", "auditor", "abcd1234")
    sid = store.create(who)
    assert store.principal(sid) == who
    assert store.principal(sid + "x") is None and store.principal("") is None and store.principal("x" * 500) is None
    time.sleep(1.1)
    assert store.principal(sid) is None
    assert list(store.directory.iterdir()) == []
    late = store.create(who)
    time.sleep(1.1)
    store.create(who)  # sweeps the expired one
    assert len(list(store.directory.iterdir())) == 1 and store.principal(late) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"origin": "http://testserver.evil.example"},
        {"referer": "https://evil.example/page"},
    ],
)
def test_cross_site_forms_are_refused_and_audited(workspace: Workspace, headers: dict[str, str]) -> None:
    with workspace.app() as c:
        r = _login(c, workspace, **headers)
        assert r.status_code == 403 and "set-cookie" not in r.headers
        assert "own pages" in r.text
        assert _login(c, workspace).status_code == 303  # same site (no Origin, as a script sends)
        out = c.post("/audit/logout", headers=headers, follow_redirects=False)
        assert out.status_code == 403
        assert c.get("/audit").status_code == 200  # the session was not ended by the cross-site post
        same = {"origin": "http://testserver"}
        assert c.post("/audit/logout", headers=same, follow_redirects=False).status_code == 303
        assert c.get("/audit").status_code == 200 and "Auditor sign-in" in c.get("/audit").text
    records = list(AuditLog(workspace.settings.audit_dir).records())
    refused = [r for r in records if r["event"] == "authentication" and r["reason"] == "cross_site_request"]
    # The first refusal of the window is recorded in full, the second counted into the window's aggregate record
    # (written at shutdown): nobody can grow the log by posting forms from another site.
    assert [r["request"]["path"] for r in refused] == ["/audit/login"]
    assert refused[0]["decision"] == "denied" and refused[0]["request"]["origin"]
    counted = [r for r in records if r["event"] == "authentication" and r["reason"] == "aggregate"]
    assert sum(r["reasons"].get("cross_site_request", 0) for r in counted) == 1
