"""The token stores, on SQLite and on PostgreSQL alike: create and authenticate, revoke, rotate (one transaction,
one winner of a race), expiry, the last-used time written at most once a minute per token and process, and no
secret stored. Then gateways on one PostgreSQL store: a token revoked through one is refused by another within a
second, and the token commands with --store."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from gateway.cli.main import app as cli
from gateway.stores.pg_tokens import PgTokenStore
from gateway.stores.tokens import TOUCH_SECONDS, TokenRefused, TokenStore
from policies.errors import InvalidRequest, NotFound, Unauthorized
from tests.conftest import Workspace
from tests.stores.conftest import PgServer, open_tokens_at, pg_records

Opener = Callable[[Callable[[], float]], TokenStore]
COUNT = {"sql": "SELECT COUNT(*) FROM visits", "epsilon": 0.1}
T0 = 1_800_000_000.0


class Clock:
    """A settable clock, shared by the stores of one test (as the hosts' clocks would be)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _id(token: str) -> str:
    return token.split("_", 2)[1]


def _secret(token: str) -> str:
    return token.split("_", 2)[2]


def _raw_rows(address: str) -> list[tuple[object, ...]]:
    """Every stored column of every token, read around the store."""
    if address.startswith("postgresql://"):
        with psycopg.connect(address) as con:
            return con.execute("SELECT * FROM tokens").fetchall()
    with sqlite3.connect(Path(address).with_name("tokens.sqlite")) as db:
        return db.execute("SELECT * FROM tokens").fetchall()


def test_create_and_authenticate_store_only_the_hash(open_token_store: Opener, store_address: str) -> None:
    clock = Clock()
    store = open_token_store(clock)
    token, principal = store.create("alice", "analyst", None)
    assert token.startswith("bst_") and principal.name == "alice" and principal.role == "analyst"
    assert store.authenticate(token) == principal
    record = store.get(principal.token_id)
    assert record is not None and record.created == T0 and record.expires is None and record.revoked is None
    assert store.get_by_hash(hashlib.sha256(_secret(token).encode()).hexdigest()) == record
    assert [r.token_id for r in store.list()] == [principal.token_id]
    stored = repr(_raw_rows(store_address))
    assert _secret(token) not in stored and hashlib.sha256(_secret(token).encode()).hexdigest() in stored
    # Another process's store (another replica) knows the token at once.
    assert open_token_store(clock).authenticate(token) == principal
    for bad in (None, "", "nonsense", f"bst_{principal.token_id}_wrong", "bst_00000000_x", token.replace("bst", "xyz")):
        with pytest.raises(Unauthorized) as info:
            store.authenticate(bad)
        assert not isinstance(info.value, TokenRefused)
    with pytest.raises(InvalidRequest):
        store.create("anonymous", "analyst")
    with pytest.raises(InvalidRequest):
        store.create("bob", "superuser")
    assert len(store.list()) == 1


def test_revoke_is_seen_by_every_store_at_once(open_token_store: Opener) -> None:
    clock = Clock()
    one, two = open_token_store(clock), open_token_store(clock)
    token, principal = one.create("bob", "analyst")
    assert two.authenticate(token) == principal
    clock.now += 5
    revoked = one.revoke(principal.token_id)
    assert revoked.revoked == T0 + 5 and revoked.state(clock.now) == "revoked"
    for store in (one, two):
        with pytest.raises(TokenRefused) as info:
            store.authenticate(token)
        assert info.value.reason == "token_revoked" and info.value.principal == principal
        with pytest.raises(TokenRefused):
            store.active(principal.token_id)
    clock.now += 5
    assert two.revoke(principal.token_id).revoked == T0 + 5  # revoking again keeps the first time
    with pytest.raises(NotFound):
        one.revoke("00000000")
    with pytest.raises(NotFound):
        one.find("bob")  # no token of bob is in use


def test_rotate_issues_a_new_token_and_ends_the_old(open_token_store: Opener) -> None:
    clock = Clock()
    store, other = open_token_store(clock), open_token_store(clock)
    old_token, old = store.create("otto", "auditor", 3_600)
    clock.now += 10
    new_token, record, new = store.rotate(old.token_id)
    assert record.token_id == old.token_id and new.name == "otto" and new.role == "auditor"
    assert new.token_id != old.token_id and _secret(new_token) != _secret(old_token)
    assert other.authenticate(new_token) == new
    with pytest.raises(TokenRefused) as info:
        other.authenticate(old_token)
    assert info.value.reason == "token_rotated"
    after = store.get(old.token_id)
    assert after is not None and after.replaced_by == new.token_id and after.revoked == T0 + 10
    fresh = store.get(new.token_id)
    assert fresh is not None and fresh.expires == T0 + 3_600 and fresh.created == T0 + 10  # the same expiry
    assert other.find("otto").token_id == new.token_id
    with pytest.raises(InvalidRequest, match="rotated"):
        other.rotate(old.token_id)
    with pytest.raises(NotFound):
        store.rotate("00000000")
    assert len(store.list()) == 2
    clock.now += 3_600  # past the expiry: a rotation would issue a token dead on arrival
    with pytest.raises(InvalidRequest, match="expired.*create a new one"):
        store.rotate(new.token_id)
    assert len(store.list()) == 2


class RecordFailed(Exception):
    pass


def test_a_change_whose_record_fails_is_rolled_back(open_token_store: Opener) -> None:
    """An administrator's change calls `record` inside its transaction: if the record cannot be written, the token
    is not created, revoked or rotated; when it can, it sees the token as the change leaves it."""
    clock = Clock()
    store, other = open_token_store(clock), open_token_store(clock)
    seen: list[Any] = []

    def fail(record: Any) -> None:
        seen.append(record)
        raise RecordFailed("the audit log refused the record")

    with pytest.raises(RecordFailed):
        store.issue("nora", "analyst", 60, record=fail)
    assert seen[-1].name == "nora" and seen[-1].expires == T0 + 60 and other.list() == []
    token, principal = store.issue("nora", "analyst", 60, record=seen.append)
    assert seen[-1].token_id == principal.token_id and other.authenticate(token) == principal

    clock.now += 5
    with pytest.raises(RecordFailed):
        store.rotate(principal.token_id, record=fail)
    assert seen[-1].token_id == principal.token_id and seen[-1].revoked == T0 + 5 and seen[-1].replaced_by
    assert other.authenticate(token) == principal and len(other.list()) == 1  # neither the new token nor the change

    with pytest.raises(RecordFailed):
        store.revoke(principal.token_id, record=fail)
    assert seen[-1].revoked == T0 + 5 and other.authenticate(token) == principal
    with pytest.raises(NotFound):
        store.revoke("00000000", record=fail)
    assert seen[-1].token_id == principal.token_id  # nothing recorded for a token that does not exist

    new_token, old, new = store.rotate(principal.token_id, record=seen.append)
    assert seen[-1].replaced_by == new.token_id == _id(new_token) and old.token_id == principal.token_id
    revoked = store.revoke(new.token_id, record=seen.append)
    assert seen[-1] == revoked and revoked.revoked == T0 + 5
    with pytest.raises(TokenRefused):
        other.authenticate(new_token)


def test_names_are_ascii_and_reserved_names_are_refused_in_any_case(open_token_store: Opener) -> None:
    store = open_token_store(Clock())
    bad = ("Anonymous", "ANONYMOUS", "bastion", "Bastion", "аnonymous", "alice\u200b", "", "-x", "a b", "x" * 65)
    for name in (*bad, "alice.", "bastion.", "a_"):
        with pytest.raises(InvalidRequest):
            store.issue(name, "analyst")
    assert store.list() == []
    _, principal = store.issue("Alice.Smith-2", "analyst")
    assert principal.name == "Alice.Smith-2"
    for other in ("alice.smith-2", "ALICE.SMITH-2"):  # one principal per name whatever the case, even with --add
        with pytest.raises(InvalidRequest, match="only in case"):
            store.issue(other, "analyst", add=True)
    store.revoke(principal.token_id)
    with pytest.raises(InvalidRequest, match="only in case"):
        store.issue("alice.smith-2", "analyst")  # a revoked name's budget and history are still its own
    assert [r.name for r in store.list()] == ["Alice.Smith-2"]


def _issue_in_process(address: str, role: str, results: Any) -> None:
    store = open_tokens_at(address, time.time)
    try:
        store.issue("racer", role)
        results.put("ok")
    except InvalidRequest:
        results.put("refused")


def test_concurrent_issues_of_one_name_give_it_one_token(store_address: str) -> None:
    """Two administrators creating one name at once (processes, as two `bastion token create` runs): the check
    and the insert are one transaction, so one wins and the other is refused."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_issue_in_process, args=(store_address, role, results)) for role in ROLES_RACING]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outcomes = sorted(results.get(timeout=10) for _ in procs)
    assert outcomes == ["ok"] + ["refused"] * (len(procs) - 1)
    records = open_tokens_at(store_address, time.time).list()
    assert len(records) == 1 and records[0].name == "racer"


ROLES_RACING = ("analyst", "auditor", "analyst", "admin")


def test_issue_refuses_a_name_in_use_unless_added_and_never_a_second_role(open_token_store: Opener) -> None:
    store = open_token_store(Clock())
    _, first = store.issue("carol", "analyst")
    with pytest.raises(InvalidRequest, match="already has 1 token.*--add"):
        store.issue("carol", "analyst")
    with pytest.raises(InvalidRequest, match="one role"):
        store.issue("carol", "admin", add=True)
    _, second = store.issue("carol", "analyst", add=True)
    assert second.name == "carol" and second.token_id != first.token_id
    for p in (first, second):
        store.revoke(p.token_id)
    _, again = store.issue("carol", "auditor")  # no token of the name in use: a new start, any role
    assert again.role == "auditor"


def test_of_two_rotations_of_one_token_at_once_exactly_one_wins(open_token_store: Opener) -> None:
    clock = Clock()
    stores = [open_token_store(clock) for _ in range(4)]
    _, principal = stores[0].create("rita", "analyst")
    start = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def rotate(store: TokenStore) -> None:
        start.wait()
        try:
            store.rotate(principal.token_id)
            outcomes.append("rotated")
        except InvalidRequest:
            outcomes.append("refused")

    threads = [threading.Thread(target=rotate, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["refused"] * 3 + ["rotated"]
    records = stores[0].list()
    assert len(records) == 2 and [r.state(clock.now) for r in records].count("active") == 1


def test_expiry(open_token_store: Opener) -> None:
    clock = Clock()
    one, two = open_token_store(clock), open_token_store(clock)
    token, principal = one.create("eve", "analyst", 60)
    clock.now += 59
    assert two.authenticate(token) == principal and two.active(principal.token_id) == principal
    clock.now += 1
    for store in (one, two):
        with pytest.raises(TokenRefused) as info:
            store.authenticate(token)
        assert info.value.reason == "token_expired"
    one.create("eve", "analyst")
    with pytest.raises(InvalidRequest, match="2 tokens"):
        two.find("eve")  # an expired token is not revoked: with two, one is named by its id


def test_last_used_is_written_at_most_once_a_minute_per_token_and_process(open_token_store: Opener) -> None:
    clock = Clock()
    one, two = open_token_store(clock), open_token_store(clock)
    token, principal = one.create("lena", "lf_author")
    other_token, other = one.create("otto", "auditor")

    def last_used(token_id: str) -> float | None:
        record = one.get(token_id)
        assert record is not None
        return record.last_used

    assert last_used(principal.token_id) is None
    one.authenticate(token)
    assert last_used(principal.token_id) == T0
    for _ in range(5):
        clock.now += 10
        one.authenticate(token)
    assert last_used(principal.token_id) == T0  # within the minute: not written again
    clock.now = T0 + TOUCH_SECONDS + 1
    one.authenticate(token)
    assert last_used(principal.token_id) == T0 + TOUCH_SECONDS + 1
    one.authenticate(other_token)  # another token has its own minute
    assert last_used(other.token_id) == clock.now
    clock.now += 9
    two.authenticate(token)  # another process has its own minute
    assert last_used(principal.token_id) == T0 + TOUCH_SECONDS + 10
    clock.now += 1
    one.authenticate(token)
    assert last_used(principal.token_id) == T0 + TOUCH_SECONDS + 10
    one.touch(principal.token_id, T0)  # only forward
    assert last_used(principal.token_id) == T0 + TOUCH_SECONDS + 10


# --- gateways on one PostgreSQL store -------------------------------------------------------------------------


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_a_token_revoked_through_one_gateway_is_refused_by_another_within_a_second(
    pg_workspace: Workspace, workspace: Workspace, pg_store: str
) -> None:
    token = pg_workspace.tokens["analyst"]
    bearer = {"Authorization": f"Bearer {token}"}
    with pg_workspace.app() as one, pg_workspace.app() as two:
        assert one.post("/v1/query", json=COUNT, headers=bearer).status_code == 200
        assert two.post("/v1/query", json=COUNT, headers=bearer).status_code == 200
        # The workspace's SQLite tokens are not the store's: a gateway on PostgreSQL refuses them.
        refused = two.get("/v1/budget", headers=workspace.headers("analyst"))
        assert refused.status_code == 401, refused.text
        one.app.state.bastion.tokens.revoke(_id(token))
        revoked_at = time.monotonic()
        r = two.post("/v1/query", json=COUNT, headers=bearer)
        assert time.monotonic() - revoked_at < 1.0
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        assert "revoked" in r.json()["error"]["message"]
        assert one.get("/v1/budget", headers=bearer).status_code == 401
        assert two.get("/v1/budget", headers=pg_workspace.headers("auditor")).status_code == 200  # others work
    refusals = [
        r
        for r in pg_records(pg_store, pg_workspace.settings.keys_dir)
        if r["event"] == "authentication" and r.get("reason") == "token_revoked"
    ]
    assert refusals and refusals[0]["actor"]["token_id"] == _id(token)


def test_the_token_commands_act_on_the_store_given(pg_workspace: Workspace, pg_store: str) -> None:
    ws = ["--workspace", str(pg_workspace.settings.workspace)]
    local = {t["token_id"] for t in json.loads(_cli("token", "list", "--json", *ws))}
    created = _cli(
        "token", "create", "--role", "analyst", "--name", "carl", "--expires", "1d", "--store", pg_store, *ws
    )
    token = created.strip()
    assert _id(token) not in {t["token_id"] for t in json.loads(_cli("token", "list", "--json", *ws))}
    shared = {t["token_id"]: t for t in json.loads(_cli("token", "list", "--json", "--store", pg_store, *ws))}
    assert set(shared) == {_id(t) for t in pg_workspace.tokens.values()} | {_id(token)}
    assert not local & set(shared)
    assert shared[_id(token)]["state"] == "active" and shared[_id(token)]["expires"] is not None
    new = _cli("token", "rotate", "carl", "--store", pg_store, *ws).strip()
    bearer = {"Authorization": f"Bearer {new}"}
    with pg_workspace.app() as c:
        assert c.post("/v1/query", json=COUNT, headers=bearer).status_code == 200
        assert c.post("/v1/query", json=COUNT, headers={"Authorization": f"Bearer {token}"}).status_code == 401
        _cli("token", "revoke", _id(new), "--store", pg_store, *ws)
        assert c.post("/v1/query", json=COUNT, headers=bearer).status_code == 401
    states = {t["token_id"]: t["state"] for t in json.loads(_cli("token", "list", "--json", "--store", pg_store, *ws))}
    assert states[_id(token)] == "rotated" and states[_id(new)] == "revoked"
    events = [r["event"] for r in pg_records(pg_store, pg_workspace.settings.keys_dir)]
    assert {"token_created", "token_rotated", "token_revoked"} <= set(events)
    store = PgTokenStore(pg_store)
    try:
        assert store.get(_id(new)) is not None
    finally:
        store.close()


def test_a_rotation_waits_for_one_in_progress_and_then_refuses(pg_store: str) -> None:
    """The rotation's read locks the row: while another transaction holds the token (as a rotation in progress
    does), a second rotation waits, and once the first has revoked it, refuses."""
    store = PgTokenStore(pg_store)
    try:
        _, principal = store.create("rita", "analyst")
        outcome: list[str] = []

        def rotate() -> None:
            try:
                store.rotate(principal.token_id)
                outcome.append("rotated")
            except InvalidRequest:
                outcome.append("refused")

        with psycopg.connect(pg_store) as first:  # one transaction until the block ends
            first.execute("SELECT 1 FROM tokens WHERE token_id = %s FOR UPDATE", (principal.token_id,))
            waiting = threading.Thread(target=rotate)
            waiting.start()
            waiting.join(0.5)
            assert waiting.is_alive() and outcome == []
            first.execute("UPDATE tokens SET revoked = 1 WHERE token_id = %s", (principal.token_id,))
        waiting.join(30)
        assert outcome == ["refused"] and len(store.list()) == 1
    finally:
        store.close()


def test_a_demo_moved_to_the_store_gets_its_tokens_there(tmp_path: Path, pg_store: str) -> None:
    """`bastion demo` made on SQLite and run again with --store: its tokens file names tokens the store knows (made
    there once), and the SQLite tokens stay as they were."""
    from gateway.stores.tokens import open_tokens

    ws = tmp_path / "demo"
    demo = ["demo", "--no-serve", "--rows", "2000", "--workspace", str(ws)]
    _cli(*demo)
    made = json.loads((ws / "demo-tokens.json").read_text())
    _cli(*demo, "--store", pg_store)
    moved = json.loads((ws / "demo-tokens.json").read_text())
    assert {r: t["name"] for r, t in moved.items()} == {r: t["name"] for r, t in made.items()}
    assert all(moved[r]["token"] != made[r]["token"] for r in made)
    _cli(*demo, "--store", pg_store)
    assert json.loads((ws / "demo-tokens.json").read_text()) == moved  # known to the store: kept
    shared, local = PgTokenStore(pg_store), open_tokens(ws / "tokens.json")
    try:
        for role, entry in moved.items():
            assert shared.authenticate(entry["token"]).role == role
            with pytest.raises(Unauthorized):
                local.authenticate(entry["token"])
            assert local.authenticate(made[role]["token"]).role == role
        assert len(shared.list()) == 3
    finally:
        shared.close()
        local.close()
    created = [r["request"] for r in pg_records(pg_store, ws / "keys") if r["event"] == "token_created"]
    assert sorted((c["name"], c["token_id"]) for c in created) == sorted(
        (t["name"], _id(t["token"])) for t in moved.values()
    )  # the tokens made on the store are recorded in its log, as `bastion token create` records them


def test_a_token_store_out_of_reach_answers_503(pg_workspace: Workspace, pg_server: PgServer, pg_store: str) -> None:
    """The store going away under a running gateway: a token cannot be checked, so the answer is 503 (never a
    pass, never a 500), an invalid body included."""
    analyst = pg_workspace.headers("analyst")
    with pg_workspace.app() as c:
        assert c.get("/v1/budget", headers=analyst).status_code == 200
        pg_server.drop_database(pg_store.rsplit("/", 1)[1])
        for r in (
            c.get("/v1/budget", headers=analyst),
            c.post("/v1/query", json={"sql": 5, "epsilon": "x"}, headers=analyst),
            c.post("/v1/query", content=b"{not json", headers={**analyst, "Content-Type": "application/json"}),
        ):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "ledger_unavailable" and "token store" in r.json()["error"]["message"]


def test_token_commands_on_a_host_whose_log_refuses_writes_change_nothing(
    pg_workspace: Workspace, pg_store: str, tmp_path: Path
) -> None:
    """A host with another signing key cannot append to the shared log: its token commands fail, and the tokens
    on the store stay as they were (a change is never made without its record)."""
    with pg_workspace.app() as c:  # the log's first records, signed with the workspace's key
        assert c.post("/v1/query", json=COUNT, headers=pg_workspace.headers("analyst")).status_code == 200
    stray = ["--store", pg_store, "--workspace", str(tmp_path / "stray-host")]
    before = json.loads(_cli("token", "list", "--json", *stray))
    analyst = _id(pg_workspace.tokens["analyst"])
    for args in (
        ["token", "create", "--role", "analyst", "--name", "mallory"],
        ["token", "revoke", analyst],
        ["token", "rotate", analyst],
    ):
        result = CliRunner().invoke(cli, [*args, *stray])
        assert result.exit_code != 0 and "key" in result.output, result.output
    assert json.loads(_cli("token", "list", "--json", *stray)) == before
    with pg_workspace.app() as c:
        assert c.get("/v1/budget", headers=pg_workspace.headers("analyst")).status_code == 200
    events = [r["event"] for r in pg_records(pg_store, pg_workspace.settings.keys_dir)]
    assert not {"token_created", "token_revoked", "token_rotated"} & set(events)
