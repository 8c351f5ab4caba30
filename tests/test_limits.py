"""Declared limits on a request body, enforced before authentication: 413 from Content-Length or while reading,
400 for a JSON body with too many members or too deep; each refusal audited as a refusal before authentication."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from audit.log import AuditLog
from gateway.http.app import create_app
from gateway.http.limits import json_shape
from gateway.stores.ledger import Ledger
from tests.conftest import Workspace

CHUNK = 64 * 1024


def _call(app: Any, headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, bytes, int]:
    """Drive the ASGI app with a POST whose body is `chunks` chunks of 64 KiB (without end, if negative); returns
    the status, the body and how many chunks the app read."""
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        more = chunks < 0 or read < chunks
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": more}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/query",
        "raw_path": b"/v1/query",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers],
        "client": ("10.0.0.7", 5000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, read


def test_a_huge_body_without_a_token_is_refused_from_its_length_unread(workspace: Workspace) -> None:
    app = create_app(workspace.settings)
    status, body, read = _call(app, [(b"content-length", str(100 * 2**20).encode())], -1)
    assert status == 413 and read == 0
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    app.state.bastion.close()
    records = AuditLog(workspace.settings.audit_dir).records()
    assert [(r["event"], r["reason"], r["source"]) for r in records] == [
        ("authentication", "payload_too_large", "10.0.0.7")
    ]


def test_a_streamed_body_is_refused_once_it_passes_the_limit(workspace: Workspace) -> None:
    app = create_app(workspace.settings)
    status, body, read = _call(app, [], -1)  # no Content-Length, and the body never ends
    app.state.bastion.close()
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert read * CHUNK <= workspace.settings.limits.max_body_bytes + CHUNK


def test_a_body_with_a_million_keys_is_refused_quickly(workspace: Workspace) -> None:
    big = b"{" + b",".join(b'"k%d":1' % i for i in range(1_000_000)) + b"}"
    items = b'{"sql": "SELECT COUNT(*) FROM visits", "epsilon": 1, "x": [' + b",".join([b"1"] * 20_000) + b"]}"
    deep = b'{"sql": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    with workspace.app() as c:
        started = time.perf_counter()
        r = c.post("/v1/query", content=big, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - started
        many = c.post("/v1/query", content=items, headers={"content-type": "application/json"})
        nested = c.post("/v1/query", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 413 and elapsed < 5
    assert len(r.headers["x-request-id"]) == 32  # the refusal carries the gateway's request id like any answer
    assert many.status_code == 400 and "members and elements" in many.json()["error"]["message"]
    assert nested.status_code == 400 and "deep" in nested.json()["error"]["message"]
    assert Ledger(workspace.settings.ledger).history() == []


def test_bodies_within_the_limits_pass(workspace: Workspace) -> None:
    sql = "SELECT COUNT(*) FROM visits WHERE region IN (" + ", ".join(["'north'"] * 1500) + ")"
    with workspace.app() as c:
        r = c.post("/v1/query", json={"sql": sql, "epsilon": 1}, headers=workspace.headers("analyst"))
    assert r.status_code == 200, r.text


def test_json_shape_skips_strings_and_counts_members() -> None:
    assert json_shape(b'{"a": "[[[[,,,,]]]]", "b": [1, 2, 3]}', 6, 2) is None
    assert json_shape(b'{"a": "\\"[[[[", "b": [1, 2, 3]}', 6, 2) is None
    assert json_shape(b'{"a": [1, 2, 3, 4, 5, 6]}', 6, 4) is not None
    assert json_shape(b'{"a": [[[1]]]}', 100, 3) is not None


def test_a_malformed_body_without_a_token_is_refused_and_counted(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.post("/v1/query", content=b'{"sql": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    records = AuditLog(workspace.settings.audit_dir).records()
    assert [(rec["event"], rec["reason"], rec["actor"]["principal"]) for rec in records] == [
        ("authentication", "invalid_request", "anonymous")
    ]
    assert records[0]["request_id"] == r.headers["x-request-id"]
