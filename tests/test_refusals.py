"""The audit log's growth is bounded: refusals before authentication are recorded once per source and window and
counted into one aggregate record, a source over the limit gets 429 without a token check, and long request texts
are stored as a prefix with their digest and length."""

from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient

from audit.log import AuditLog
from audit.record import TEXT_PREFIX_BYTES, bound_texts
from audit.verify import verify_log
from gateway.http.app import create_app
from gateway.refusals import NOT_AN_ADDRESS, RefusalWindows
from gateway.settings import Limits
from tests.conftest import Workspace

COUNT = {"sql": "SELECT COUNT(*) FROM visits", "epsilon": 0.5}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_failed_authentications_are_counted_per_window_then_throttled(workspace: Workspace) -> None:
    settings = workspace.settings.model_copy(update={"limits": Limits(max_refusals=3, refusal_window_seconds=60)})
    clock = Clock()
    bad = {"Authorization": "Bearer bst_nope_nope"}
    with TestClient(create_app(settings)) as c:
        bastion = c.app.state.bastion  # type: ignore[attr-defined]
        bastion.refusals = RefusalWindows(60, 3, 100, clock=clock)
        statuses = [c.post("/v1/query", json=COUNT, headers=bad).status_code for _ in range(3)]
        # Over the limit: 429 before the token is looked at, a good token included.
        throttled = [c.post("/v1/query", json=COUNT, headers=h) for h in (bad, workspace.headers("analyst"))]
        after_first = len(AuditLog(settings.audit_dir).records())
        clock.now += 61  # the window ends; the next record written brings its aggregate first
        ok = c.post("/v1/query", json=COUNT, headers=workspace.headers("analyst"))
    assert statuses == [401, 401, 401]
    assert [r.status_code for r in throttled] == [429, 429]
    assert all(r.json()["error"]["code"] == "too_many_requests" for r in throttled)
    assert ok.status_code == 200, ok.text
    records = AuditLog(settings.audit_dir).records()
    assert after_first == 1  # five refusals, one record
    auth = [r for r in records if r["event"] == "authentication"]
    first, aggregate = auth
    assert first["reason"] == "unauthorized" and first["request"]["path"] == "/v1/query"
    # The test client's address is the text "testclient": no IP address, counted as the one such source.
    assert aggregate["reason"] == "aggregate" and aggregate["source"] == NOT_AN_ADDRESS
    assert aggregate["count"] == 4 and aggregate["reasons"] == {"too_many_requests": 2, "unauthorized": 2}
    assert aggregate["window_start"] < aggregate["window_end"]
    assert records.index(aggregate) < min(i for i, r in enumerate(records) if r["event"] == "query")
    assert verify_log(settings.audit_dir).ok


def test_windows_are_per_source_and_bounded_in_number() -> None:
    clock = Clock()
    windows = RefusalWindows(60, 2, 2, clock=clock)
    assert windows.note("192.0.2.1", "unauthorized") and not windows.note("192.0.2.1", "unauthorized")
    assert windows.blocked("192.0.2.1") and not windows.blocked("192.0.2.2")
    # The third source closes the oldest window (192.0.2.1) early.
    assert windows.note("192.0.2.2", "unauthorized") and windows.note("192.0.2.3", "unauthorized")
    assert [w["source"] for w in windows.closed()] == ["192.0.2.1"]
    assert not windows.blocked("192.0.2.1")
    clock.now += 60
    assert windows.closed() == []  # "192.0.2.2" and "192.0.2.3" counted nothing beyond their first refusal
    assert windows.drain() == []


def test_an_ipv6_host_is_one_source_and_mapped_ipv4_is_its_address() -> None:
    windows = RefusalWindows(60, 2, 100, clock=Clock())
    # Two addresses of one /64 share a window (a host holds a whole /64): the second is only counted, the third
    # over the limit; another /64 is another source.
    assert windows.note("2001:db8:1:2::1", "unauthorized")
    assert not windows.note("2001:db8:1:2:ffff::9", "unauthorized")
    assert windows.blocked("2001:db8:1:2:aaaa::1") and not windows.blocked("2001:db8:1:3::1")
    assert windows.note("::ffff:192.0.2.7", "unauthorized") and not windows.note("192.0.2.7", "unauthorized")
    assert windows.blocked("::ffff:192.0.2.7") and windows.blocked("192.0.2.7")
    assert not windows.blocked("192.0.2.8")
    # IPv4 written inside IPv6 (NAT64, IPv4-compatible) is that IPv4 host; loopback is itself; text that is no
    # address (a proxy's odd header, with or without a zone) is one source for all.
    assert windows.note("64:ff9b::8.8.8.8", "unauthorized") and not windows.note("8.8.8.8", "unauthorized")
    assert windows.note("::9.9.9.9", "unauthorized") and not windows.blocked("9.9.9.10")
    assert windows.note("::1", "unauthorized") and not windows.blocked("::2")
    assert windows.note("garbage1", "unauthorized") and not windows.note("garbage2", "unauthorized")
    assert windows.blocked("whatever")
    assert windows.note("fe80::1%eth0", "unauthorized") and not windows.note("fe80::2", "unauthorized")  # zone dropped
    sources = {w["source"] for w in windows.drain()}
    assert {"2001:db8:1:2::/64", "192.0.2.7", "8.8.8.8", NOT_AN_ADDRESS} <= sources


def test_a_dead_token_presented_again_is_named_in_the_aggregate(workspace: Workspace) -> None:
    """A revoked token used again and again in one window is not lost in an anonymous count: the aggregate
    record names its id with how often it was presented."""
    settings = workspace.settings.model_copy(update={"limits": Limits(max_refusals=10, refusal_window_seconds=60)})
    clock = Clock()
    with TestClient(create_app(settings)) as c:
        bastion = c.app.state.bastion  # type: ignore[attr-defined]
        bastion.refusals = RefusalWindows(60, 10, 100, clock=clock)
        token, principal = bastion.tokens.create("mallory", "analyst")
        bastion.tokens.revoke(principal.token_id)
        headers = {"Authorization": f"Bearer {token}"}
        statuses = [c.post("/v1/query", json=COUNT, headers=headers).status_code for _ in range(4)]
        c.post("/v1/query", json=COUNT, headers={"Authorization": "Bearer bst_nope_nope"})
        clock.now += 61
        assert c.post("/v1/query", json=COUNT, headers=workspace.headers("analyst")).status_code == 200
    assert statuses == [401] * 4
    auth = [r for r in AuditLog(settings.audit_dir).records() if r["event"] == "authentication"]
    first, aggregate = auth
    assert first["reason"] == "token_revoked" and first["actor"]["token_id"] == principal.token_id
    assert aggregate["reasons"] == {"token_revoked": 3, "unauthorized": 1}
    assert aggregate["tokens"] == {principal.token_id: 3}


def test_long_request_texts_are_stored_as_prefix_digest_and_length(workspace: Workspace) -> None:
    sql = "SELECT COUNT(*) FROM visits WHERE " + " AND ".join(["age > 1"] * 5000)
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst"))
        events = c.get("/v1/audit/events", params={"event": "query"}, headers=workspace.headers("auditor"))
        c.post("/audit/login", data={"token": workspace.tokens["auditor"]})
        page = c.get("/audit")
    assert r.status_code == 400
    assert page.status_code == 200 and "SELECT COUNT(*) FROM visits WHERE age &gt; 1 AND" in page.text
    log_bytes = (workspace.settings.audit_dir / "audit.jsonl").stat().st_size
    assert log_bytes < 3 * TEXT_PREFIX_BYTES < len(sql)
    denied = next(rec for rec in AuditLog(workspace.settings.audit_dir).records() if rec["event"] == "query")
    assert sql.startswith(denied["request"]["sql"])
    assert len(denied["request"]["sql"].encode()) <= TEXT_PREFIX_BYTES
    digest = hashlib.sha256(sql.encode()).hexdigest()
    assert denied["request"]["sql_truncated"] == {"sha256": digest, "length": len(sql)}
    assert events.status_code == 200 and events.json()
    assert verify_log(workspace.settings.audit_dir).ok


def test_bound_texts_cuts_on_a_character_boundary_and_keeps_short_texts() -> None:
    text = "é" * 5000  # two bytes each
    bounded = bound_texts({"a": text, "b": "short", "c": [text, 1]})
    assert bounded["b"] == "short"
    assert bounded["a"] == "é" * (TEXT_PREFIX_BYTES // 2)
    assert bounded["a_truncated"]["length"] == 5000
    assert bounded["c"][0]["prefix"] == bounded["a"] and bounded["c"][1] == 1
