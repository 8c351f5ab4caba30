"""The token lifecycle on a real gateway: revoke, expiry, rotation, last-used time, the audit records of each, the
anonymous actor of requests without a working token, and the import of an older workspace's tokens.json."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from audit.log import AuditLog
from gateway.cli.main import app as cli
from gateway.stores.tokens import TOUCH_SECONDS, SqliteTokenStore, open_tokens, parse_duration
from policies.errors import InvalidRequest
from tests.conftest import Workspace, gateways

COUNT = {"sql": "SELECT COUNT(*) FROM visits", "epsilon": 0.1}


def _cli(workspace: Workspace, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--workspace", str(workspace.settings.workspace)])
    assert result.exit_code == 0, result.output
    return result.output


def _records(workspace: Workspace) -> list[dict[str, Any]]:
    return list(AuditLog(workspace.settings.audit_dir, key_dir=workspace.settings.keys_dir).records())


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token_id(token: str) -> str:
    return token.split("_", 2)[1]


def test_a_token_revoked_on_the_host_is_refused_by_another_gateway_within_a_second(workspace: Workspace) -> None:
    token = _cli(workspace, "token", "create", "--role", "analyst", "--name", "bob").strip()
    with workspace.app() as one, workspace.app() as two:
        assert one.post("/v1/query", json=COUNT, headers=_bearer(token)).status_code == 200
        assert two.post("/v1/query", json=COUNT, headers=_bearer(token)).status_code == 200
        out = _cli(workspace, "token", "revoke", "bob")
        revoked_at = time.monotonic()
        assert _token_id(token) in out
        r = two.post("/v1/query", json=COUNT, headers=_bearer(token))
        assert time.monotonic() - revoked_at < 1.0
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        assert "revoked" in r.json()["error"]["message"]
        assert one.post("/v1/query", json=COUNT, headers=_bearer(token)).status_code == 401
        # Other tokens are untouched.
        assert one.post("/v1/query", json=COUNT, headers=workspace.headers("analyst")).status_code == 200
    records = _records(workspace)
    revoke = [r for r in records if r["event"] == "token_revoked"]
    assert [r["request"]["token_id"] for r in revoke] == [_token_id(token)]
    assert revoke[0]["actor"] == {"principal": "admin", "role": "admin", "token_id": None}
    refused = [r for r in records if r["event"] == "authentication" and r.get("reason") == "token_revoked"]
    assert refused and refused[0]["actor"] == {"principal": "bob", "role": "analyst", "token_id": _token_id(token)}
    assert refused[0]["decision"] == "denied"
    # Nothing recorded lets anyone rebuild or forge the token: no secret, no hash of it.
    secret = token.split("_", 2)[2]
    text = b"".join(f.read_bytes() for f in Path(workspace.settings.audit_dir).rglob("*") if f.is_file())
    assert secret.encode() not in text and hashlib.sha256(secret.encode()).hexdigest().encode() not in text
    result = CliRunner().invoke(cli, ["audit", "verify", "--workspace", str(workspace.settings.workspace)])
    assert result.exit_code == 0, result.output


def test_an_expired_token_is_refused_and_recorded(workspace: Workspace) -> None:
    now = [time.time()]
    with workspace.app() as c:
        store = c.app.state.bastion.tokens
        store.clock = lambda: now[0]
        token, principal = store.create("carol", "analyst", parse_duration("30m"))
        assert c.post("/v1/query", json=COUNT, headers=_bearer(token)).status_code == 200
        now[0] += 29 * 60
        assert c.post("/v1/query", json=COUNT, headers=_bearer(token)).status_code == 200
        now[0] += 60
        r = c.post("/v1/query", json=COUNT, headers=_bearer(token))
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert "expired" in r.json()["error"]["message"]
    refused = [r for r in _records(workspace) if r.get("reason") == "token_expired"]
    assert [r["actor"]["token_id"] for r in refused] == [principal.token_id]


def test_expiry_from_the_command_line_in_real_time(workspace: Workspace) -> None:
    token = _cli(workspace, "token", "create", "--role", "analyst", "--name", "dan", "--expires", "1s").strip()
    with workspace.app() as c:
        assert c.get("/v1/budget", headers=_bearer(token)).status_code == 200
        time.sleep(1.2)
        assert c.get("/v1/budget", headers=_bearer(token)).status_code == 401
    listed = json.loads(_cli(workspace, "token", "list", "--json"))
    (dan,) = [t for t in listed if t["name"] == "dan"]
    assert dan["state"] == "expired" and dan["expires"] is not None
    created = [r for r in _records(workspace) if r["event"] == "token_created" and r["request"]["name"] == "dan"]
    assert created[0]["request"]["expires"] == dan["expires"]


@pytest.mark.parametrize(("text", "seconds"), [("45s", 45), ("15m", 900), ("12h", 43_200), ("30d", 2_592_000)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0d", "30", "d", "1.5h", "-1d", "2w", "30 days"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match="s, m, h or d"):
        parse_duration(text)


def test_bad_expiry_on_the_command_line_creates_nothing(workspace: Workspace) -> None:
    result = CliRunner().invoke(
        cli,
        ["token", "create", "--role", "analyst", "--name", "eve", "--expires", "soon"]
        + ["--workspace", str(workspace.settings.workspace)],
    )
    assert result.exit_code != 0 and "s, m, h or d" in result.output
    assert "eve" not in _cli(workspace, "token", "list", "--json")


def test_rotation_replaces_the_secret_and_ends_sessions(workspace: Workspace) -> None:
    old = workspace.tokens["auditor"]
    with workspace.app() as c:
        login = c.post("/audit/login", data={"token": old}, follow_redirects=False)
        assert login.status_code == 303, login.text
        assert c.get("/audit", follow_redirects=False).status_code == 200
        new = _cli(workspace, "token", "rotate", _token_id(old)).strip()
        assert new.startswith("bst_") and new != old
        assert c.get("/v1/audit/events", headers=_bearer(old)).status_code == 401
        r = c.get("/v1/audit/events", headers=_bearer(new))
        assert r.status_code == 200
        # The session opened with the old token has ended.
        c.headers.pop("authorization", None)
        assert c.get("/audit", follow_redirects=False).status_code in (303, 401)
    listed = {t["token_id"]: t for t in json.loads(_cli(workspace, "token", "list", "--json"))}
    assert listed[_token_id(old)]["state"] == "rotated"
    assert listed[_token_id(old)]["replaced_by"] == _token_id(new)
    assert listed[_token_id(new)]["name"] == "otto" and listed[_token_id(new)]["role"] == "auditor"
    rotated = [r for r in _records(workspace) if r["event"] == "token_rotated"]
    assert rotated[0]["request"] == {
        "name": "otto",
        "role": "auditor",
        "token_id": _token_id(old),
        "new_token_id": _token_id(new),
    }
    # A rotated token cannot be rotated or used again.
    result = CliRunner().invoke(cli, ["token", "rotate", _token_id(old), "-w", str(workspace.settings.workspace)])
    assert result.exit_code != 0 and "rotated" in result.output


def test_a_name_with_several_tokens_in_use_must_be_named_by_id(workspace: Workspace) -> None:
    refused = CliRunner().invoke(
        cli, ["token", "create", "--role", "analyst", "--name", "alice", "-w", str(workspace.settings.workspace)]
    )
    assert refused.exit_code != 0 and "--add" in refused.output  # alice has a token in use: only on purpose
    _cli(workspace, "token", "create", "--role", "analyst", "--name", "alice", "--add")
    result = CliRunner().invoke(cli, ["token", "revoke", "alice", "-w", str(workspace.settings.workspace)])
    assert result.exit_code != 0 and "2 tokens" in result.output
    result = CliRunner().invoke(cli, ["token", "revoke", "nobody", "-w", str(workspace.settings.workspace)])
    assert result.exit_code != 0 and "no token" in result.output


def test_last_used_is_written_at_most_once_a_minute_per_token(workspace: Workspace) -> None:
    now = [time.time()]
    with workspace.app() as c:
        store = c.app.state.bastion.tokens
        store.clock = lambda: now[0]
        writes: list[tuple[str, float]] = []
        touch = store.touch

        def counting(token_id: str, when: float) -> None:
            writes.append((token_id, when))
            touch(token_id, when)

        store.touch = counting
        first = now[0]
        for _ in range(5):
            assert c.get("/v1/budget", headers=workspace.headers("analyst")).status_code == 200
            now[0] += 10
        assert writes == [(_token_id(workspace.tokens["analyst"]), first)]
        assert store.get(_token_id(workspace.tokens["analyst"])).last_used == first
        now[0] = first + TOUCH_SECONDS + 1
        assert c.get("/v1/budget", headers=workspace.headers("analyst")).status_code == 200
        assert len(writes) == 2 and store.get(_token_id(workspace.tokens["analyst"])).last_used == now[0]
        # Another token has its own minute.
        assert c.get("/v1/budget", headers=workspace.headers("lf_author")).status_code in (200, 403)
        assert len(writes) == 3
    listed = {t["token_id"]: t for t in json.loads(_cli(workspace, "token", "list", "--json"))}
    assert listed[_token_id(workspace.tokens["analyst"])]["last_used"] is not None
    assert listed[_token_id(workspace.tokens["auditor"])]["last_used"] is None


@pytest.mark.parametrize("header", [None, "Bearer bst_00000000_nope", "Bearer nonsense", "Basic abc"])
def test_requests_without_a_working_token_are_recorded_as_anonymous(workspace: Workspace, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with workspace.app() as c:
        r = c.post("/v1/query", json=COUNT, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        found = c.get("/v1/audit/events", params={"actor": "anonymous"}, headers=workspace.headers("auditor"))
        assert found.status_code == 200
        (record,) = found.json()["events"]
    assert record["actor"] == {"principal": "anonymous", "role": None, "token_id": None}
    assert record["event"] == "authentication" and record["decision"] == "denied"
    # Only the command line's admin actions on the host are recorded as `admin`.
    assert all(r["source"] == "cli" for r in _records(workspace) if r["actor"]["principal"] == "admin")
    shown = _cli(workspace, "audit", "events", "--actor", "anonymous", "--format", "jsonl").splitlines()
    assert [json.loads(line)["seq"] for line in shown] == [record["seq"]]


def test_the_anonymous_name_is_reserved(workspace: Workspace) -> None:
    result = CliRunner().invoke(
        cli, ["token", "create", "--role", "admin", "--name", "anonymous", "-w", str(workspace.settings.workspace)]
    )
    assert result.exit_code != 0 and "reserved" in result.output


def test_an_old_tokens_json_is_imported_on_first_open_losing_nothing(tmp_path: Path) -> None:
    secrets = {"a1b2c3d4": "s3cret-one", "0f0f0f0f": "s3cret-two"}
    old = {
        "a1b2c3d4": {"name": "alice", "role": "analyst", "created": "2026-01-02T03:04:05+00:00"},
        "0f0f0f0f": {"name": "otto", "role": "auditor", "created": "2026-02-03T04:05:06.123456+00:00"},
    }
    for token_id, entry in old.items():
        entry["hash"] = hashlib.sha256(secrets[token_id].encode()).hexdigest()
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(old))
    store = open_tokens(path)
    try:
        for token_id, secret in secrets.items():
            principal = store.authenticate(f"bst_{token_id}_{secret}")
            assert (principal.name, principal.role, principal.token_id) == (
                old[token_id]["name"],
                old[token_id]["role"],
                token_id,
            )
        listed = {r.token_id: r for r in store.list()}
        assert set(listed) == set(old)
        for token_id, entry in old.items():
            created = dt.datetime.fromisoformat(entry["created"]).timestamp()
            assert listed[token_id].created == created and listed[token_id].revoked is None
        store.revoke("a1b2c3d4")
    finally:
        store.close()
    assert not path.exists() and (tmp_path / "tokens.json.migrated").exists()
    # A second import of the same file (a crash before the rename) neither duplicates nor un-revokes.
    (tmp_path / "tokens.json.migrated").rename(path)
    again = SqliteTokenStore(tmp_path / "tokens.sqlite", legacy=path)
    try:
        revoked = again.get("a1b2c3d4")
        assert len(again.list()) == 2 and revoked is not None and revoked.revoked is not None
    finally:
        again.close()


def test_a_workspace_with_tokens_json_keeps_working_through_the_gateway(workspace: Workspace) -> None:
    """A workspace made before the SQLite store: its tokens.json is imported when the gateway opens it."""
    settings = workspace.settings
    token_id, secret = workspace.tokens["analyst"].split("_", 2)[1:]
    legacy = {
        token_id: {
            "name": "alice",
            "role": "analyst",
            "hash": hashlib.sha256(secret.encode()).hexdigest(),
            "created": dt.datetime.now(dt.UTC).isoformat(),
        }
    }
    for name in ("tokens.sqlite", "tokens.sqlite-wal", "tokens.sqlite-shm"):
        (settings.workspace / name).unlink(missing_ok=True)
    settings.tokens.write_text(json.dumps(legacy))
    with workspace.app() as c:
        assert c.post("/v1/query", json=COUNT, headers=workspace.headers("analyst")).status_code == 200
        assert c.get("/v1/budget", headers=workspace.headers("auditor")).status_code == 401
    assert not settings.tokens.exists()


def _open_store(json_path: str) -> int:
    store = open_tokens(json_path)
    try:
        return len(store.list())
    finally:
        store.close()


def test_two_processes_opening_an_old_workspace_at_once_import_it_once(tmp_path: Path) -> None:
    old = {
        f"{i:08x}": {"name": f"p{i}", "role": "analyst", "hash": f"{i:064x}", "created": "2026-01-01T00:00:00+00:00"}
        for i in range(200)
    }
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(old))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        counts = pool.map(_open_store, [str(path)] * 2)
    assert counts == [200, 200] and not path.exists()


def test_a_token_revoked_on_the_host_is_refused_by_every_serving_process(workspace: Workspace) -> None:
    token = _cli(workspace, "token", "create", "--role", "analyst", "--name", "frank").strip()
    with gateways(2, "--workspace", str(workspace.settings.workspace)) as urls:
        for url in urls:
            assert httpx.get(f"{url}/v1/budget", headers=_bearer(token), timeout=30).status_code == 200
        _cli(workspace, "token", "revoke", _token_id(token))
        revoked_at = time.monotonic()
        codes = [httpx.get(f"{url}/v1/budget", headers=_bearer(token), timeout=30).status_code for url in urls]
        assert codes == [401, 401] and time.monotonic() - revoked_at < 1.0
