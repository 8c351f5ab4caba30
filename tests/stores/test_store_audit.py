"""The audit log on the file system and in PostgreSQL alike: append/records/verify round trip, writers in two
processes making one chain, export verified by the one verifier. Then the PostgreSQL log only: a record changed
through SQL is found, a rewritten history is caught by an exported (trusted) checkpoint, a replica with another key
refuses to append, key rotation, a gateway whose log cannot be written answers 503 releasing nothing (the charge
stays and is recorded later), a query through the HTTP app is recorded in PostgreSQL, and the audit commands with
--store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from audit import keys
from audit.checkpoint import Checkpoint
from audit.errors import AuditWriteError
from audit.log import AuditLog
from audit.merkle import leaf_hash
from audit.record import seal
from audit.verify import verify_log
from gateway.stores.base import AuditStore
from gateway.stores.pg import PgLedger
from gateway.stores.pg_audit import PgAuditLog
from tests.conftest import BIN, Workspace
from tests.stores.conftest import pg_records as pg_records_of

SQL = "SELECT COUNT(*) AS n FROM visits WHERE age >= 30"
Opener = Callable[..., AuditStore]


def _event(i: int, who: str = "t") -> dict[str, Any]:
    return {"event": "query", "actor": {"principal": who, "role": "analyst"}, "n": i, "decision": "allowed"}


def open_log_at(address: str, key_dir: Path, **kw: Any) -> AuditStore:
    if address.startswith("postgresql://"):
        return PgAuditLog(address, key_dir=key_dir, **kw)
    return AuditLog(address, key_dir=key_dir, **kw)


@pytest.fixture(params=["file", "postgresql"])
def log_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a log of the parametrized kind lives: a directory or a migrated PostgreSQL database."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_store"))
    return str(tmp_path / "audit")


@pytest.fixture
def open_log(log_address: str, tmp_path: Path) -> Iterator[Opener]:
    opened: list[AuditStore] = []

    def make(**kw: Any) -> AuditStore:
        log = open_log_at(log_address, tmp_path / "keys", **kw)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def test_append_records_verify_export_round_trip(open_log: Opener, tmp_path: Path) -> None:
    log = open_log(checkpoint_every=4)
    one = log.append(_event(0))
    many = log.append_many([_event(i) for i in range(1, 10)])
    assert [r["seq"] for r in [one, *many]] == list(range(10))
    assert log.records() == [one, *many]
    assert log.append_many([]) == []
    ok, message = log.verify()
    assert ok, message
    cp = log.latest_checkpoint()
    assert cp is not None and cp.tree_size == 10  # due every 4 records, signed after the batch that reaches it
    made = log.checkpoint()
    assert made.tree_size == 10 and log.latest_checkpoint() == made

    out = log.export(tmp_path / "copy")
    lines = (out / "audit.jsonl").read_bytes().split(b"\n")[:-1]
    assert [json.loads(line) for line in lines] == log.records()
    report = verify_log(out, keys.Keyring.load(tmp_path / "keys"), strict=True)
    assert report.ok and report.records == 10 and report.covered == 10, report.message
    # The chain is the file format's, byte for byte: each record links to the leaf hash of the line before.
    assert json.loads(lines[5])["prev_hash"] == leaf_hash(lines[4]).hex()
    anchor = log.export_checkpoint(tmp_path / "anchor")
    assert Checkpoint.from_dict(json.loads(anchor.read_text())).tree_size == 10


def _append_in_process(address: str, key_dir: str, who: str, rounds: int) -> None:
    log = open_log_at(address, Path(key_dir), checkpoint_every=25)
    try:
        for i in range(rounds):
            if i % 3 == 0:
                log.append_many([_event(i, who), _event(i, who)])
            else:
                log.append(_event(i, who))
    finally:
        log.close()


def test_two_processes_append_to_one_chain(log_address: str, tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    keys.keygen(key_dir)  # one key, as installed on every replica host
    ctx = mp.get_context("spawn")
    rounds = 60
    procs = [ctx.Process(target=_append_in_process, args=(log_address, str(key_dir), w, rounds)) for w in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    log = open_log_at(log_address, key_dir)
    try:
        records = log.records()
        per = rounds + (rounds + 2) // 3  # appends plus the second event of every third round
        assert [r["seq"] for r in records] == list(range(2 * per))  # one total order, no gap, nothing lost
        for who in "ab":
            mine = [r["n"] for r in records if r["actor"]["principal"] == who]
            assert len(mine) == per and mine == sorted(mine)  # each writer's records in its own order
        ok, message = log.verify()
        assert ok, message
        assert "2 records" not in message and f"{2 * per} records" in message
    finally:
        log.close()


# --- PostgreSQL only ---------------------------------------------------------------------------------------------


def _pg_log(pg_store: str, tmp_path: Path, **kw: Any) -> PgAuditLog:
    return PgAuditLog(pg_store, key_dir=tmp_path / "keys", **kw)


def test_a_record_changed_through_sql_fails_verification_there(pg_store: str, tmp_path: Path) -> None:
    log = _pg_log(pg_store, tmp_path, checkpoint_every=1000)
    try:
        log.append_many([_event(i) for i in range(12)])
        log.checkpoint()
        assert log.verify()[0]
        with psycopg.connect(pg_store, autocommit=True) as con:
            changed = con.execute(
                "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), "
                "'\"n\":7', '\"n\":8'), 'UTF8') WHERE seq = 7"
            ).rowcount
        assert changed == 1
        report = verify_log(log.snapshot(fresh=True), keys.Keyring.load(tmp_path / "keys"))
        assert not report.ok and report.first_bad == 7, report.message
        ok, message = log.verify()
        assert not ok and "position 7" in message
    finally:
        log.close(seal=False)


def test_the_readers_copy_is_extended_and_made_again_when_its_tail_changed(pg_store: str, tmp_path: Path) -> None:
    """Readers' copies (events, spend, the ledger check) grow by the records appended since the last read; a copy
    whose last record the database no longer holds is exported whole; a verification always exports whole."""
    log = _pg_log(pg_store, tmp_path, checkpoint_every=5)
    try:
        log.append_many([_event(i) for i in range(7)])
        first = log.snapshot()
        before = (first / "audit.jsonl").read_bytes()
        log.append_many([_event(i) for i in range(7, 12)])
        second = log.snapshot()
        assert second == first
        after = (second / "audit.jsonl").read_bytes()
        assert after.startswith(before) and after.count(b"\n") == 12
        assert after == _bodies(pg_store)
        assert (second / "checkpoints.jsonl").read_bytes().count(b"\n") == _count(pg_store, "audit_checkpoints")
        assert verify_log(second, keys.Keyring.load(tmp_path / "keys")).ok
        with psycopg.connect(pg_store, autocommit=True) as con:  # the last record changed: the copy starts again
            con.execute(
                "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), "
                "'\"n\":11', '\"n\":99'), 'UTF8') WHERE seq = 11"
            )
        assert (log.snapshot() / "audit.jsonl").read_bytes() == _bodies(pg_store)
        with psycopg.connect(pg_store, autocommit=True) as con:  # a middle record: only a fresh copy shows it
            con.execute(
                "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), "
                "'\"n\":3', '\"n\":33'), 'UTF8') WHERE seq = 3"
            )
        assert (log.snapshot() / "audit.jsonl").read_bytes() != _bodies(pg_store)
        assert (log.snapshot(fresh=True) / "audit.jsonl").read_bytes() == _bodies(pg_store)
        ok, message = log.verify()
        assert not ok and "position 3" in message
    finally:
        log.close(seal=False)


def _bodies(conninfo: str) -> bytes:
    with psycopg.connect(conninfo) as con:
        return b"".join(bytes(r[0]) + b"\n" for r in con.execute("SELECT body FROM audit_records ORDER BY seq"))


def _count(conninfo: str, table: str) -> int:
    with psycopg.connect(conninfo) as con:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        row = con.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def test_a_trusted_checkpoint_catches_a_rewritten_history(pg_store: str, tmp_path: Path) -> None:
    """A database administrator rewrites records 3.. and recomputes their chain, and deletes the checkpoints that
    covered them (it cannot sign new ones): the log then verifies on its own, but not against a checkpoint exported
    off the database host before."""
    log = _pg_log(pg_store, tmp_path, checkpoint_every=4)
    try:
        log.append_many([_event(i) for i in range(2)])
        log.checkpoint()
        log.append_many([_event(i) for i in range(2, 10)])
        anchor = log.export_checkpoint(tmp_path / "off-host")
        lines = (log.snapshot() / "audit.jsonl").read_bytes().split(b"\n")[:-1]
        with psycopg.connect(pg_store) as con, con.transaction():
            prev = leaf_hash(lines[1]).hex()
            for record in map(json.loads, lines[2:]):
                event = {k: v for k, v in record.items() if k not in ("schema_version", "seq", "time", "prev_hash")}
                if record["seq"] == 3:
                    event["n"] = 300  # the rewrite
                _, body = seal(event, record["seq"], record["time"], prev)
                con.execute("UPDATE audit_records SET body = %s WHERE seq = %s", (body, record["seq"]))
                prev = leaf_hash(body).hex()
            con.execute("DELETE FROM audit_checkpoints WHERE tree_size > 2")
        ring = keys.Keyring.load(tmp_path / "keys")
        alone = verify_log(log.snapshot(fresh=True), ring)
        assert alone.ok, alone.message  # undetectable without an anchor kept elsewhere
        anchored = verify_log(log.snapshot(fresh=True), ring, trusted_checkpoint=anchor)
        assert not anchored.ok and "Merkle root differs" in anchored.message
        assert anchored.first_bad == 2  # the records after the last good checkpoint are untrusted
    finally:
        log.close(seal=False)


def test_a_replica_with_another_key_refuses_to_append(pg_store: str, tmp_path: Path) -> None:
    first = _pg_log(pg_store, tmp_path)
    stray = PgAuditLog(pg_store, key_dir=tmp_path / "other-keys")
    try:
        first.append(_event(0))
        with pytest.raises(AuditWriteError, match="copy the key directory"):
            stray.append(_event(1))
        assert [r["n"] for r in first.records()] == [0]  # nothing written by the refused append
    finally:
        stray.close(seal=False)
        first.close()


def test_key_rotation_on_postgresql(pg_store: str, tmp_path: Path) -> None:
    log = _pg_log(pg_store, tmp_path)
    try:
        log.append(_event(0))
        old, new = log.rotate_key()
        assert old != new and keys.load_signer(tmp_path / "keys").key_id == new
        log.append(_event(1))
        log.checkpoint()
        ok, message = log.verify()
        assert ok, message
        assert [r["event"] for r in log.records()] == ["query", "key_rotated", "query"]
        cp = log.latest_checkpoint()
        assert cp is not None and cp.key_id == new
    finally:
        log.close()


def _released(pg_store: str, key_dir: Path) -> list[dict[str, Any]]:
    log = PgAuditLog(pg_store, key_dir=key_dir)
    try:
        return [r for r in log.records() if r.get("phase") == "released"]
    finally:
        log.close(seal=False)


def test_a_query_through_the_app_is_recorded_in_postgresql(pg_workspace: Workspace, pg_store: str) -> None:
    settings = pg_workspace.settings
    with pg_workspace.app() as c:
        answer = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=pg_workspace.headers("analyst"))
        assert answer.status_code == 200, answer.text
        checked = c.get("/v1/audit/verify", headers=pg_workspace.headers("auditor"))
        assert checked.status_code == 200 and checked.json()["verdict"] == "OK", checked.text
        events = c.get("/v1/audit/events", headers=pg_workspace.headers("auditor"), params={"event": "query"})
        assert [e["phase"] for e in events.json()["events"]] == ["admitted", "released"]
    log = PgAuditLog(pg_store, key_dir=settings.keys_dir)
    try:
        records = [r for r in log.records() if r["event"] == "query"]
        assert [r["phase"] for r in records] == ["admitted", "released"]
        assert records[0]["request_id"] == records[1]["request_id"]
        assert records[1]["release_digest"]
        assert log.verify()[0]
    finally:
        log.close(seal=False)
    assert not (settings.audit_dir / "audit.jsonl").exists()  # the workspace's file log is not used


def test_a_log_that_cannot_be_written_answers_503_and_keeps_the_charge(pg_workspace: Workspace, pg_store: str) -> None:
    """The audit table goes out of reach under a running gateway: the query is charged, answers 503 and releases
    nothing; the charge is never refunded and, once the log is back, is recorded as an orphan charge."""
    settings = pg_workspace.settings
    analyst = pg_workspace.headers("analyst")
    with pg_workspace.app() as c:
        first = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=analyst)
        assert first.status_code == 200, first.text
        with psycopg.connect(pg_store, autocommit=True) as con:
            con.execute("ALTER TABLE audit_records RENAME TO audit_records_away")
        try:
            gone = c.post("/v1/query", json={"sql": SQL + " AND age < 80", "epsilon": 0.25}, headers=analyst)
            assert gone.status_code == 503, gone.text
            assert gone.json()["error"]["code"] == "audit_unavailable" and "rows" not in gone.text
        finally:
            with psycopg.connect(pg_store, autocommit=True) as con:
                con.execute("ALTER TABLE audit_records_away RENAME TO audit_records")
        assert len(_released(pg_store, settings.keys_dir)) == 1  # nothing released by the refused query
        ledger = PgLedger(pg_store)
        try:
            assert ledger.spent("alice", "visits").epsilon == pytest.approx(0.75)  # charged, not refunded
        finally:
            ledger.close()
        again = c.post("/v1/query", json={"sql": SQL + " AND age < 70", "epsilon": 0.25}, headers=analyst)
        assert again.status_code == 200, again.text
    log = PgAuditLog(pg_store, key_dir=settings.keys_dir)
    try:
        orphans = [r for r in log.records() if r["event"] == "orphan_charge"]
        assert [(o["actor"]["principal"], o["cost"]["epsilon"]) for o in orphans] == [("alice", 0.25)]
        assert log.verify()[0]
    finally:
        log.close(seal=False)


def _bastion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BASTION_WORKSPACE": "", "BASTION_STORE": "", "COLUMNS": "400"},
    )


def test_audit_commands_on_the_postgresql_log(pg_workspace: Workspace, pg_store: str, tmp_path: Path) -> None:
    settings = pg_workspace.settings
    ws = ["--workspace", str(settings.workspace), "--store", pg_store]
    with pg_workspace.app() as c:
        answer = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=pg_workspace.headers("analyst"))
        assert answer.status_code == 200, answer.text
    anchor = _bastion("audit", "export-checkpoint", str(tmp_path / "anchor"), *ws)
    assert anchor.returncode == 0, anchor.stderr
    checked = _bastion("audit", "verify", *ws, "--trusted-checkpoint", str(next((tmp_path / "anchor").iterdir())))
    assert checked.returncode == 0 and "audit log OK" in checked.stdout, checked.stdout + checked.stderr
    exported = _bastion("audit", "export", "--to", str(tmp_path / "copy"), *ws)
    assert exported.returncode == 0, exported.stderr
    offline = _bastion("audit", "verify", "--log-dir", str(tmp_path / "copy"), "--keyring", str(settings.keys_dir))
    assert offline.returncode == 0, offline.stdout + offline.stderr
    events = _bastion("audit", "events", *ws, "--format", "jsonl", "--event", "query")
    assert [json.loads(line)["phase"] for line in events.stdout.splitlines()] == ["admitted", "released"]
    spend = _bastion("audit", "spend", *ws, "--format", "json")
    assert json.loads(spend.stdout)["datasets"]["visits"]["principals"]["alice"]["epsilon"] == pytest.approx(0.5)
    checkpointed = _bastion("audit", "checkpoint", *ws)
    assert checkpointed.returncode == 0, checkpointed.stderr
    rotated = _bastion("audit", "rotate-key", *ws)
    assert rotated.returncode == 0 and "signing key rotated" in rotated.stdout, rotated.stderr
    after = _bastion("audit", "verify", *ws, "--json")
    assert after.returncode == 0, after.stdout + after.stderr
    assert json.loads(after.stdout)["verdict"] == "OK"
    log = PgAuditLog(pg_store, key_dir=settings.keys_dir)
    try:
        latest = log.latest_checkpoint()
        assert latest is not None and latest.key_id == keys.load_signer(settings.keys_dir).key_id  # the new key
    finally:
        log.close(seal=False)
    events_now = [r["event"] for r in pg_records_of(pg_store, settings.keys_dir)]
    assert {"checkpoint_requested", "checkpoint_exported", "key_rotated"} <= set(events_now)
    assert not (settings.audit_dir / "audit.jsonl").exists()

    with psycopg.connect(pg_store, autocommit=True) as con:
        con.execute("UPDATE audit_records SET body = body || '\\x20'::bytea WHERE seq = 1")
    broken = _bastion("audit", "verify", *ws)
    assert broken.returncode == 1 and "position 1" in broken.stderr, broken.stdout + broken.stderr


def test_an_auditor_read_of_a_log_out_of_reach_is_503(pg_workspace: Workspace, pg_store: str) -> None:
    """The read is recorded, then the log cannot be exported (its checkpoints' table is gone): 503, not a verdict."""
    with pg_workspace.app() as c:
        with psycopg.connect(pg_store, autocommit=True) as con:
            con.execute("ALTER TABLE audit_checkpoints RENAME TO audit_checkpoints_away")
        try:
            r = c.get("/v1/audit/events", headers=pg_workspace.headers("auditor"))
        finally:
            with psycopg.connect(pg_store, autocommit=True) as con:
                con.execute("ALTER TABLE audit_checkpoints_away RENAME TO audit_checkpoints")
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable", r.text
    reads = [e for e in pg_records_of(pg_store, pg_workspace.settings.keys_dir) if e["event"] == "audit_read"]
    assert [(e["request"]["action"], e["decision"]) for e in reads] == [("events", "allowed")]  # recorded first
