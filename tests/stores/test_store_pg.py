"""The PostgreSQL store through the gateway and the CLI: `bastion store migrate` (idempotent), a gateway that
refuses an unmigrated store, an unreachable server (LedgerUnavailable: 503, nothing released, no refund), and a
gateway answering from the shared ledger and cache."""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import Any

import psycopg
import pytest

from gateway.http.app import create_app
from gateway.stores.ledger import Ledger
from gateway.stores.pg import MIGRATIONS, SCHEMA_VERSION, PgLedger, StoreNotMigrated
from gateway.stores.pg_audit import PgAuditLog
from policies.accountant import PrivacyLoss
from policies.errors import LedgerUnavailable
from policies.schema import Budget
from tests.conftest import BIN, AppClient, Workspace, free_port
from tests.stores.conftest import PgCluster, PgServer, pg_records

SQL = "SELECT COUNT(*) AS n FROM visits WHERE age >= 30"


def _bastion(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BASTION_WORKSPACE": "", "BASTION_STORE": "", "COLUMNS": "400", **env},
    )


def test_store_migrate_twice_is_a_no_op(pg_database: str) -> None:
    first = _bastion("store", "migrate", "--store", pg_database)
    assert first.returncode == 0, first.stderr
    assert f"from schema version 0 to {SCHEMA_VERSION}" in first.stdout
    second = _bastion("store", "migrate", BASTION_STORE=pg_database)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    with psycopg.connect(pg_database) as con:
        versions = con.execute("SELECT version FROM bastion_schema ORDER BY version").fetchall()
        assert versions == [(v,) for v, _ in MIGRATIONS] and versions[-1] == (SCHEMA_VERSION,)
    PgLedger(pg_database).close()  # opens: the schema is the one it needs


def test_store_migrate_needs_a_postgresql_store() -> None:
    out = _bastion("store", "migrate")
    assert out.returncode == 2 and "need no migration" in " ".join(out.stderr.split())


def test_a_gateway_refuses_an_unmigrated_store(workspace: Workspace, pg_database: str) -> None:
    with pytest.raises(StoreNotMigrated) as info:
        create_app(workspace.settings.model_copy(update={"store": pg_database}))
    assert "bastion store migrate" in info.value.message and "schema version 0" in info.value.message
    out = _bastion(
        "serve", "--port", str(free_port()), "--workspace", str(workspace.settings.workspace), "--store", pg_database
    )
    assert out.returncode == 1, out.stdout + out.stderr
    message = " ".join(out.stderr.split())
    assert "bastion store migrate" in message
    assert "@" in message and "t_" in message  # names the database, never a password


def test_an_unreachable_server_is_ledger_unavailable() -> None:
    with pytest.raises(LedgerUnavailable) as info:
        PgLedger(f"postgresql://bastion:secret@127.0.0.1:{free_port()}/nowhere")
    assert info.value.status == 503 and "cannot be reached" in info.value.message
    assert "secret" not in info.value.message


def test_a_gateway_on_the_shared_store(pg_workspace: Workspace, pg_server: PgServer, pg_store: str) -> None:
    """Two gateways on one PostgreSQL store share the spend and the cached answers, and the workspace's SQLite
    ledger is not used; the store going away answers 503 and releases nothing."""
    settings = pg_workspace.settings
    analyst = pg_workspace.headers("analyst")
    with AppClient(create_app(settings)) as one, AppClient(create_app(settings)) as two:
        first = one.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=analyst)
        assert first.status_code == 200, first.text
        repeat = two.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=analyst)
        assert repeat.status_code == 200 and repeat.json()["cached"] is True
        assert repeat.json()["rows"] == first.json()["rows"]
        other = two.post("/v1/query", json={"sql": SQL + " AND age < 90", "epsilon": 0.25}, headers=analyst)
        assert other.status_code == 200, other.text
        budget = one.get("/v1/budget", headers=analyst).json()
        assert next(b for b in budget if b["dataset"] == "visits")["spent"]["epsilon"] == pytest.approx(0.75)
        assert Ledger(settings.ledger).history() == []  # the workspace's SQLite ledger is not used
        shared = PgLedger(pg_store)
        assert [(h["principal"], h["epsilon"], h["audited"]) for h in shared.history()] == [
            ("alice", 0.5, True),
            ("alice", 0.25, True),
        ]
        shared.close()

        released = [r for r in pg_records(pg_store, settings.keys_dir) if r.get("phase") == "released"]
        assert len(released) == 3  # one log for both gateways, in the store
        assert not (settings.audit_dir / "audit.jsonl").exists()

        pg_server.drop_database(pg_store.rsplit("/", 1)[1])  # the store goes away under the running gateway
        gone = one.post("/v1/query", json={"sql": SQL + " AND age < 80", "epsilon": 0.25}, headers=analyst)
        assert gone.status_code == 503, gone.text
        assert gone.json()["error"]["code"] == "ledger_unavailable" and "rows" not in gone.text


def _query_then_die(workspace: str, store: str, token: str) -> None:
    from gateway.service import Bastion, Context
    from gateway.settings import Settings

    def die(self: PgAuditLog, event: dict) -> dict:
        os._exit(17)  # killed between the charge and its "admitted" record

    PgAuditLog.append = die  # type: ignore[method-assign]
    bastion = Bastion(Settings.load(workspace, store=store))
    bastion.query(Context(bastion.authenticate(token)), SQL, epsilon=2.0)


def test_the_charge_of_a_killed_gateway_is_recorded_by_the_next_start(pg_workspace: Workspace, pg_store: str) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    args = (str(pg_workspace.settings.workspace), pg_store, pg_workspace.tokens["analyst"])
    p = ctx.Process(target=_query_then_die, args=args)
    p.start()
    p.join(120)
    assert p.exitcode == 17
    settings = pg_workspace.settings
    with AppClient(create_app(settings)) as c:  # start-up finds the dead process's pending charge
        spend = c.get("/v1/audit/spend", headers=pg_workspace.headers("auditor")).json()
    orphans = [r for r in pg_records(pg_store, settings.keys_dir) if r["event"] == "orphan_charge"]
    assert [(o["actor"]["principal"], o["cost"]["epsilon"]) for o in orphans] == [("alice", 2.0)]
    assert spend["datasets"]["visits"]["principals"] == {"alice": {"epsilon": 2.0, "delta": 0.0, "rho": 0.0}}
    ledger = PgLedger(pg_store)
    try:
        assert [(h["epsilon"], h["audited"]) for h in ledger.history()] == [(2.0, True)]  # charged, not refunded
    finally:
        ledger.close()


def _query_in_process(workspace: str, store: str, token: str, age: int, out: Any) -> None:
    from gateway.service import Bastion, Context
    from gateway.settings import Settings
    from policies.errors import BudgetExhausted

    bastion = Bastion(Settings.load(workspace, store=store))
    try:
        bastion.query(
            Context(bastion.authenticate(token), source="proc"),
            f"SELECT COUNT(*) FROM visits WHERE age > {age}",
            epsilon=3.0,
        )
        out.put("ok")
    except BudgetExhausted:
        out.put("refused")
    finally:
        bastion.close()


def test_gateway_processes_on_one_store_never_overspend(pg_workspace: Workspace, pg_store: str) -> None:
    """Six gateway processes query at once through one PostgreSQL store: the analyst's ε=10 fits three charges of
    3, and the one log of all of them, in the store, agrees with the shared ledger."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ws, token = str(pg_workspace.settings.workspace), pg_workspace.tokens["analyst"]
    procs = [ctx.Process(target=_query_in_process, args=(ws, pg_store, token, age, out)) for age in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert sorted(out.get(timeout=5) for _ in procs) == ["ok"] * 3 + ["refused"] * 3
    ledger = PgLedger(pg_store)
    try:
        assert ledger.spent("alice", "visits").epsilon == pytest.approx(9.0)
        assert all(h["audited"] for h in ledger.history())
    finally:
        ledger.close()
    released = [r for r in pg_records(pg_store, pg_workspace.settings.keys_dir) if r.get("phase") == "released"]
    assert len(released) == 3  # one log for every process
    shared = PgAuditLog(pg_store, key_dir=pg_workspace.settings.keys_dir)
    try:
        ok, message = shared.verify()  # the six processes' records make one chain
        assert ok, message
    finally:
        shared.close(seal=False)


def test_a_lost_owner_lock_is_taken_again_under_a_new_owner(pg_store: str) -> None:
    """A server restart (here: the owner lock's connection terminated) ends the lock; within a second the ledger
    notices and takes a new owner id and lock, so its later pending charges are not taken for a dead process's."""
    import time

    from gateway.stores.pg import _OWNER_LOCK, OWNER_CHECK_SECONDS

    ledger, other = PgLedger(pg_store), PgLedger(pg_store)
    try:
        first = ledger.owner()
        with psycopg.connect(pg_store, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid::bigint = %s",
                (_OWNER_LOCK,),
            ).fetchall()
        assert ended == [(True,)]
        time.sleep(OWNER_CHECK_SECONDS + 0.2)
        budget = Budget(epsilon=1.0, delta=0)
        ledger.charge(
            principal="a",
            dataset="d",
            cost=PrivacyLoss(0.1),
            per_principal=budget,
            total=budget,
            request_id=uuid.uuid4().hex,
        )
        assert ledger.owner() != first
        assert other.claim_stale() == ()  # the pending charge's owner is alive
    finally:
        ledger.close()
        other.close()


def test_a_store_at_schema_version_1_is_upgraded_keeping_its_spend(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store migrated before the tokens' table (version 1) is refused until `migrate` adds it (version 2); the
    upgrade keeps the spend."""
    import gateway.stores.pg as pg
    from gateway.stores.pg_tokens import PgTokenStore

    monkeypatch.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:1])
    monkeypatch.setattr(pg, "SCHEMA_VERSION", 1)
    assert pg.migrate(pg_database) == (0, 1)
    ledger = PgLedger(pg_database)
    budget = Budget(epsilon=1.0, delta=0)
    try:
        ledger.charge(
            principal="a",
            dataset="d",
            cost=PrivacyLoss(0.25),
            per_principal=budget,
            total=budget,
            request_id=uuid.uuid4().hex,
        )
    finally:
        ledger.close()
    monkeypatch.undo()
    with pytest.raises(StoreNotMigrated, match="schema version 1"):
        PgTokenStore(pg_database)
    assert pg.migrate(pg_database) == (1, SCHEMA_VERSION)
    ledger, tokens = PgLedger(pg_database), PgTokenStore(pg_database)
    try:
        assert ledger.spent("a", "d").epsilon == pytest.approx(0.25)
        token, principal = tokens.create("alice", "analyst")
        assert tokens.authenticate(token) == principal
    finally:
        ledger.close()
        tokens.close()


@pytest.mark.parametrize("committed", [True, False])
def test_a_charge_whose_connection_is_lost_is_tried_once_more_and_charged_once(
    pg_store: str, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """A connection lost during a charge leaves its outcome unknown to the gateway: the charge is tried once more,
    and the request id makes the retry find a charge that did commit instead of charging twice."""
    from psycopg_pool import PoolTimeout

    ledger = PgLedger(pg_store)
    real = PgLedger._charge_once
    calls: list[int] = []

    def flaky(self: PgLedger, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            if committed:
                real(self, *args)  # the COMMIT reached the server; its answer did not reach us
            raise LedgerUnavailable("the budget ledger cannot be written") from psycopg.OperationalError("lost")
        return real(self, *args)

    budget = Budget(epsilon=1.0, delta=0)
    charge: dict[str, Any] = dict(
        principal="a", dataset="d", cost=PrivacyLoss(0.25), per_principal=budget, total=budget
    )
    try:
        monkeypatch.setattr(PgLedger, "_charge_once", flaky)
        done = ledger.charge(**charge, request_id="lost-answer")
        assert len(calls) == 2 and done.id is not None
        assert ledger.totals() == {("a", "d"): (25 * 10**10, 0, 0)} and len(ledger.history()) == 1

        def unreachable(self: PgLedger, *args: Any) -> Any:
            calls.append(1)
            raise LedgerUnavailable("the budget ledger cannot be written") from PoolTimeout("no connection")

        calls.clear()
        monkeypatch.setattr(PgLedger, "_charge_once", unreachable)
        with pytest.raises(LedgerUnavailable):
            ledger.charge(**charge, request_id="unreachable")
        assert len(calls) == 1  # a server that cannot be reached is not waited for twice
    finally:
        ledger.close()


def test_the_first_request_after_a_long_outage_reaches_the_server_again(pg_cluster: PgCluster) -> None:
    """After 16 s without a server (each request a 503 after POOL_TIMEOUT) the first request once it is back gets a
    connection: the pool's retries end after RECONNECT_SECONDS and each request starts new ones, where psycopg_pool's
    own backoff (1, 2, 4, 8, 16 s apart) would have its next try 15 s after the restart."""
    import time

    from gateway.stores.pg import POOL_TIMEOUT, migrate

    store = pg_cluster.server.url(pg_cluster.server.create_database())
    migrate(store)
    ledger = PgLedger(store)
    try:
        assert ledger.spent("alice", "visits").epsilon == 0
        pg_cluster.stop()
        down = time.monotonic()
        while time.monotonic() - down < 16:
            with pytest.raises(LedgerUnavailable):
                ledger.spent("alice", "visits")
        pg_cluster.start()
        back = time.monotonic()
        assert ledger.spent("alice", "visits").epsilon == 0
        assert time.monotonic() - back < POOL_TIMEOUT
    finally:
        ledger.close()
