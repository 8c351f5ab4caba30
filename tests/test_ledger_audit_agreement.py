"""The ledger and the audit log agree: every charge is in the log (as "admitted", or as an orphan charge when its
record could not be written), and a gateway never serves on a ledger that shows less spend than the log."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from audit import report
from audit.log import AuditLog, AuditWriteError
from gateway.http.app import create_app
from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.stores.ledger import Ledger, LedgerBehind
from policies.accountant import PrivacyLoss
from policies.errors import AuditUnavailable
from policies.schema import Budget
from tests.conftest import BIN, Workspace, free_port

SQL = "SELECT COUNT(*) AS n FROM visits WHERE age >= {age}"


def _records(workspace: Workspace) -> list[dict]:
    return AuditLog(workspace.settings.audit_dir).records()


def _bastion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BASTION_WORKSPACE": "", "COLUMNS": "400"},
    )


def _spent(workspace: Workspace, principal: str = "alice", dataset: str = "visits") -> float:
    return Ledger(workspace.settings.ledger).spent(principal, dataset).epsilon


def _query(workspace: Workspace, *ages: int, epsilon: float = 0.5) -> None:
    with workspace.app() as c:
        for age in ages:
            r = c.post(
                "/v1/query", json={"sql": SQL.format(age=age), "epsilon": epsilon}, headers=workspace.headers("analyst")
            )
            assert r.status_code == 200, r.text


def test_a_fresh_workspace_starts(tmp_path: Path) -> None:
    settings = Settings(workspace=tmp_path / "ws")
    settings.save()
    create_app(settings).state.bastion.close()
    assert AuditLog(settings.audit_dir).records() == []
    checked = _bastion("ledger", "check", "--workspace", str(settings.workspace))
    assert checked.returncode == 0, checked.stderr
    assert "not behind" in checked.stdout


def test_a_charge_whose_admitted_record_failed_is_recorded_as_an_orphan_first(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = AuditLog.append
    failures: list[dict] = []

    def fails_once(self: AuditLog, event: dict) -> dict:
        if not failures:
            failures.append(event)
            raise AuditWriteError("disk full")
        return real(self, event)

    analyst = workspace.headers("analyst")
    with workspace.app() as c:
        monkeypatch.setattr(AuditLog, "append", fails_once)
        lost = c.post("/v1/query", json={"sql": SQL.format(age=10), "epsilon": 0.5}, headers=analyst)
        assert lost.status_code == 503 and lost.json()["error"]["code"] == "audit_unavailable"
        assert "rows" not in lost.text
        assert failures[0]["phase"] == "admitted"
        lost_id = lost.headers["x-request-id"]
        (pending,) = Ledger(workspace.settings.ledger).history()
        assert pending["request_id"] == lost_id and not pending["audited"]  # charged, never refunded
        ok = c.post("/v1/query", json={"sql": SQL.format(age=20), "epsilon": 0.25}, headers=analyst)
        assert ok.status_code == 200, ok.text
        spend = c.get("/v1/audit/spend", headers=workspace.headers("auditor")).json()
    records = [r for r in _records(workspace) if r["event"] in ("query", "orphan_charge")]
    # The orphan record comes before anything else of the next request.
    assert [(r["event"], r.get("phase")) for r in records] == [
        ("orphan_charge", "charged"),
        ("query", "admitted"),
        ("query", "released"),
    ]
    orphan = records[0]
    assert orphan["request_id"] == lost_id and orphan["actor"]["principal"] == "alice"
    assert orphan["dataset"] == "visits" and orphan["cost"] == {"epsilon": 0.5, "delta": 0.0}
    assert orphan["decision"] == "allowed" and orphan["kind"] == "query"
    assert spend["datasets"]["visits"]["principals"]["alice"]["epsilon"] == pytest.approx(0.75)
    assert report.privacy_spend(workspace.settings.audit_dir).datasets["visits"].epsilon == pytest.approx(0.75)
    assert all(h["audited"] for h in Ledger(workspace.settings.ledger).history())
    assert _spent(workspace) == pytest.approx(0.75)
    ok, message = AuditLog(workspace.settings.audit_dir).verify()
    assert ok, message


def test_a_failed_record_is_claimed_by_another_process(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The charge of a failed record is claimed by the next charge of any gateway sharing the ledger."""
    one, two = Bastion(workspace.settings), Bastion(workspace.settings)
    try:
        ctx = Context(one.authenticate(workspace.tokens["analyst"]))
        with monkeypatch.context() as m:
            m.setattr(AuditLog, "append", lambda self, event: (_ for _ in ()).throw(AuditWriteError("disk full")))
            with pytest.raises(AuditUnavailable):
                one.query(ctx, SQL.format(age=30), epsilon=0.5)
        two.query(Context(two.authenticate(workspace.tokens["analyst"])), SQL.format(age=40), epsilon=0.5)
    finally:
        one.close()
        two.close()
    events = [(r["event"], r.get("phase")) for r in _records(workspace) if r["event"] in ("query", "orphan_charge")]
    assert events == [("orphan_charge", "charged"), ("query", "admitted"), ("query", "released")]
    assert report.privacy_spend(workspace.settings.audit_dir).datasets["visits"].epsilon == pytest.approx(1.0)


def _charge_then_die(workspace: str, token: str) -> None:
    def die(self: AuditLog, event: dict) -> dict:
        os._exit(17)  # killed between the charge and its "admitted" record

    AuditLog.append = die  # type: ignore[method-assign]
    bastion = Bastion(Settings.load(workspace))
    bastion.query(Context(bastion.authenticate(token)), SQL.format(age=50), epsilon=2.0)


def test_a_charge_of_a_killed_process_is_recorded_at_start_up(workspace: Workspace) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_charge_then_die, args=(str(workspace.settings.workspace), workspace.tokens["analyst"]))
    p.start()
    p.join(120)
    assert p.exitcode == 17
    assert not [r for r in _records(workspace) if r["event"] == "query"]
    # A charge in flight in a live process is not an orphan: this one is still "making" its record.
    live = Ledger(workspace.settings.ledger)
    budget = Budget(epsilon=100, delta=1e-3)
    live.charge(
        principal="bob",
        dataset="visits",
        cost=PrivacyLoss(0.1),
        per_principal=budget,
        total=budget,
        request_id="in-flight",
    )
    try:
        with workspace.app() as c:
            spend = c.get("/v1/audit/spend", headers=workspace.headers("auditor")).json()
    finally:
        live.close()
    orphans = [r for r in _records(workspace) if r["event"] == "orphan_charge"]
    assert [(o["actor"]["principal"], o["cost"]["epsilon"]) for o in orphans] == [("alice", 2.0)]
    assert spend["datasets"]["visits"]["principals"] == {"alice": {"epsilon": 2.0, "delta": 0.0, "rho": 0.0}}
    # Started again: alice's charge is not recorded twice; bob's is recorded now that its process is gone.
    with workspace.app():
        pass
    orphans = [r for r in _records(workspace) if r["event"] == "orphan_charge"]
    assert [(o["actor"]["principal"], o["request_id"]) for o in orphans][1:] == [("bob", "in-flight")]
    assert report.privacy_spend(workspace.settings.audit_dir).datasets["visits"].epsilon == pytest.approx(2.1)


def _copy_ledger(src: Path, dest: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dest) as b:
        a.backup(b)


def _drop_ledger(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def _serve_refuses(workspace: Workspace) -> str:
    out = subprocess.run(
        [str(BIN), "serve", "--port", str(free_port()), "--workspace", str(workspace.settings.workspace)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BASTION_WORKSPACE": "", "COLUMNS": "400"},
    )
    assert out.returncode == 1, out.stdout + out.stderr
    return " ".join(out.stderr.split())


@pytest.mark.parametrize("loss", ["deleted", "older copy"])
def test_a_ledger_behind_the_log_is_refused_until_reconciled(workspace: Workspace, tmp_path: Path, loss: str) -> None:
    _query(workspace, 1, 2)
    old = tmp_path / "old.sqlite"
    _copy_ledger(workspace.settings.ledger, old)
    _query(workspace, 3, 4, 5)
    before = _spent(workspace)
    assert before == pytest.approx(2.5)
    _drop_ledger(workspace.settings.ledger)
    if loss == "older copy":
        _copy_ledger(old, workspace.settings.ledger)

    with pytest.raises(LedgerBehind) as info:
        create_app(workspace.settings)
    message = info.value.message
    assert "behind the audit log" in message and "'alice' on 'visits'" in message
    assert "log ε=2.5" in message and "bastion ledger reconcile" in message
    assert "bastion ledger reconcile" in _serve_refuses(workspace)
    checked = _bastion("ledger", "check", "--workspace", str(workspace.settings.workspace))
    assert checked.returncode == 1 and "behind the audit log" in " ".join(checked.stderr.split())

    fixed = _bastion("ledger", "reconcile", "--workspace", str(workspace.settings.workspace))
    assert fixed.returncode == 0, fixed.stderr
    assert "re-charged" in fixed.stdout and "alice" in fixed.stdout
    assert _spent(workspace) >= before and _spent(workspace) == pytest.approx(before)
    again = _bastion("ledger", "reconcile", "--workspace", str(workspace.settings.workspace))
    assert again.returncode == 0 and "nothing re-charged" in again.stdout  # idempotent
    assert _spent(workspace) == pytest.approx(before)
    reconciled = [r for r in _records(workspace) if r["event"] == "ledger_reconciled"]
    assert reconciled[0]["recharged"][0]["principal"] == "alice" and "cost" not in reconciled[0]
    with workspace.app() as c:  # it starts, and the budget is what was spent
        budget = c.get("/v1/budget", headers=workspace.headers("analyst")).json()
        assert next(b for b in budget if b["dataset"] == "visits")["spent"]["epsilon"] == pytest.approx(before)
    assert report.privacy_spend(workspace.settings.audit_dir).datasets["visits"].epsilon == pytest.approx(before)


def test_reconcile_never_refunds_a_ledger_ahead_of_the_log(workspace: Workspace) -> None:
    _query(workspace, 1)
    ledger = Ledger(workspace.settings.ledger)
    budget = Budget(epsilon=100, delta=1e-3)
    ledger.charge(
        principal="alice",
        dataset="visits",
        cost=PrivacyLoss(1.0),
        per_principal=budget,
        total=budget,
        request_id="not-in-the-log",
    )
    ledger.close()  # its charge was never recorded: an orphan now
    out = _bastion("ledger", "reconcile", "--workspace", str(workspace.settings.workspace))
    assert out.returncode == 0, out.stderr
    assert "nothing re-charged" in out.stdout
    assert _spent(workspace) == pytest.approx(1.5)
    assert [h["request_id"] for h in Ledger(workspace.settings.ledger).history()][-1] == "not-in-the-log"
    assert report.privacy_spend(workspace.settings.audit_dir).datasets["visits"].epsilon == pytest.approx(1.5)
