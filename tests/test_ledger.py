"""Budgets: durable, charged before execution, never overspent across processes, never refunded."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import uuid
from pathlib import Path

import pytest

from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.stores.ledger import Ledger
from policies.accountant import PrivacyLoss
from policies.errors import BudgetExhausted
from policies.schema import Budget
from tests.conftest import Workspace

SQL = "SELECT COUNT(*) FROM visits WHERE age > {age}"


def _query_in_process(workspace: str, token: str, age: int, out: mp.Queue) -> None:
    bastion = Bastion(Settings.load(workspace))
    ctx = Context(bastion.authenticate(token), source="proc")
    try:
        bastion.query(ctx, SQL.format(age=age), epsilon=3.0)
        out.put("ok")
    except BudgetExhausted:
        out.put("refused")
    finally:
        bastion.close()


def test_concurrent_processes_never_overspend(workspace: Workspace) -> None:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_query_in_process, args=(str(workspace.settings.workspace), workspace.tokens["analyst"], age, out)
        )
        for age in range(6)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = sorted(out.get(timeout=5) for _ in procs)
    # The analyst's budget is ε=10: three charges of 3 fit, a fourth does not.
    assert results == ["ok"] * 3 + ["refused"] * 3
    spent = Ledger(workspace.settings.ledger).spent("alice", "visits")
    assert spent.epsilon == pytest.approx(9.0)


def _charge_then_crash(workspace: str, token: str) -> None:
    import gateway.service as service

    def crash(*args: object, **kwargs: object) -> None:
        os._exit(17)  # the process dies between the charge and the answer

    service.execute = crash  # type: ignore[assignment]
    bastion = Bastion(Settings.load(workspace))
    bastion.query(Context(bastion.authenticate(token)), "SELECT COUNT(*) FROM visits", epsilon=2.0)


def test_crash_between_charge_and_answer_keeps_the_charge(workspace: Workspace) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_charge_then_crash, args=(str(workspace.settings.workspace), workspace.tokens["analyst"]))
    p.start()
    p.join(120)
    assert p.exitcode == 17
    assert Ledger(workspace.settings.ledger).spent("alice", "visits").epsilon == pytest.approx(2.0)
    records = [r for r in _audit(workspace) if r.get("event") == "query"]
    assert records[-1]["phase"] == "admitted"  # admitted was durable before the crash; nothing was released


def _audit(workspace: Workspace) -> list[dict]:
    from audit.log import AuditLog

    return AuditLog(workspace.settings.audit_dir).records()


def test_caps_are_exact_and_total_cap_applies(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    per, total = Budget(epsilon=1.0, delta=0), Budget(epsilon=1.5, delta=0)
    for _ in range(10):
        ledger.charge(
            principal="a",
            dataset="d",
            cost=PrivacyLoss(0.1),
            per_principal=per,
            total=total,
            request_id=uuid.uuid4().hex,
        )
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge(
            principal="a",
            dataset="d",
            cost=PrivacyLoss(1e-9),
            per_principal=per,
            total=total,
            request_id=uuid.uuid4().hex,
        )
    assert info.value.details["scope"] == "principal"
    ledger.charge(
        principal="b", dataset="d", cost=PrivacyLoss(0.5), per_principal=per, total=total, request_id=uuid.uuid4().hex
    )
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge(
            principal="c",
            dataset="d",
            cost=PrivacyLoss(0.01),
            per_principal=per,
            total=total,
            request_id=uuid.uuid4().hex,
        )
    assert info.value.details["scope"] == "dataset"
    assert ledger.spent_total("d").epsilon == pytest.approx(1.5)


def _charge(ledger: Ledger, principal: str, eps: float, per: float = 1.0, total: float = 1.5) -> None:
    ledger.charge(
        principal=principal,
        dataset="d",
        cost=PrivacyLoss(eps),
        per_principal=Budget(epsilon=per, delta=0),
        total=Budget(epsilon=total, delta=0),
        request_id=uuid.uuid4().hex,
    )


def test_running_totals_are_filled_from_a_ledger_made_before_them(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    for _ in range(9):
        _charge(ledger, "a", 0.1)
    _charge(ledger, "b", 0.5)
    ledger.close()
    with sqlite3.connect(path) as con:  # the ledger as an older version left it: charges, no running totals
        for name in ("spent_insert", "spent_delete", "spent_update"):
            con.execute(f"DROP TRIGGER {name}")
        con.execute("DROP TABLE spent")
    ledger = Ledger(path)
    assert ledger.spent("a", "d").epsilon == pytest.approx(0.9)
    assert ledger.spent_total("d").epsilon == pytest.approx(1.4)
    _charge(ledger, "a", 0.1)  # exactly the principal's cap
    with pytest.raises(BudgetExhausted) as info:
        _charge(ledger, "a", 1e-9)
    assert info.value.details["scope"] == "principal"
    with pytest.raises(BudgetExhausted) as info:
        _charge(ledger, "c", 0.01)  # the dataset's total of 1.5 is reached
    assert info.value.details["scope"] == "dataset"


def test_running_totals_follow_every_change_of_the_charges(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    for _ in range(5):
        _charge(ledger, "a", 0.1)
    with sqlite3.connect(path) as con:  # an older copy restored by hand, or a row edited: the totals follow
        con.execute("DELETE FROM charges WHERE id IN (SELECT id FROM charges ORDER BY id LIMIT 2)")
        con.execute("UPDATE charges SET principal = 'b' WHERE id = (SELECT max(id) FROM charges)")
    assert ledger.spent("a", "d").epsilon == pytest.approx(0.2)
    assert ledger.spent("b", "d").epsilon == pytest.approx(0.1)
    with sqlite3.connect(path) as con:
        held = {
            (p, d): (e, dl, r)
            for p, d, e, dl, r in con.execute("SELECT principal, dataset, eps_units, delta_units, rho_units FROM spent")
        }
    assert held == ledger.totals()  # the running totals against the charges, summed
    with sqlite3.connect(path) as con:  # totals edited behind the triggers' back are rebuilt on the next open
        con.execute("UPDATE spent SET eps_units = 0")
    assert Ledger(path).spent("a", "d").epsilon == pytest.approx(0.2)
