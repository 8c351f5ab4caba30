"""The ledger's guarantees on each store (SQLite file, PostgreSQL server): exact caps, audit states and claims,
owner liveness across processes, recharge, and no overspend when processes race for the last of a budget."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from gateway.stores.base import LedgerStore
from gateway.stores.ledger import LedgerCharge
from policies.accountant import Accounting, PrivacyLoss
from policies.errors import BudgetExhausted
from policies.schema import Budget
from tests.stores.conftest import open_ledger_at

Opener = Callable[[], LedgerStore]
PER, TOTAL = Budget(epsilon=1.0, delta=0), Budget(epsilon=1.5, delta=0)


def _charge(ledger: LedgerStore, principal: str, eps: float, request_id: str | None = None, **kw: Any) -> Any:
    request_id = request_id or uuid.uuid4().hex  # every request has an id of its own
    return ledger.charge(
        principal=principal,
        dataset="d",
        cost=PrivacyLoss(eps),
        per_principal=kw.pop("per", PER),
        total=kw.pop("total", TOTAL),
        request_id=request_id,
        **kw,
    )


def test_caps_are_exact_and_the_total_cap_applies(open_ledger: Opener) -> None:
    ledger = open_ledger()
    for _ in range(10):
        _charge(ledger, "a", 0.1)
    with pytest.raises(BudgetExhausted) as info:
        _charge(ledger, "a", 1e-9)
    assert info.value.details["scope"] == "principal"
    charge = _charge(ledger, "b", 0.5)
    assert charge.principal_before.epsilon == 0 and charge.dataset_after.epsilon == pytest.approx(1.5)
    with pytest.raises(BudgetExhausted) as info:
        _charge(ledger, "c", 0.01)
    assert info.value.details["scope"] == "dataset"
    assert ledger.spent_total("d").epsilon == pytest.approx(1.5)
    assert ledger.spent("a", "d").epsilon == pytest.approx(1.0)
    assert ledger.totals() == {("a", "d"): (10 * 10**11, 0, 0), ("b", "d"): (5 * 10**11, 0, 0)}
    assert len(ledger.history()) == 11 and len(ledger.history("other")) == 0


def test_zcdp_caps_in_rho_and_accountings_do_not_mix(open_ledger: Opener) -> None:
    ledger = open_ledger()
    budget = Budget(epsilon=1.0, delta=1e-6)
    rho = ledger.charge(
        principal="a",
        dataset="d",
        cost=PrivacyLoss(0.0, 0.0, 0.01),
        per_principal=budget,
        total=budget,
        request_id="z",
        accounting=Accounting.ZCDP,
    )
    assert rho.cost.rho == pytest.approx(0.01) and ledger.spent("a", "d").rho == pytest.approx(0.01)
    with pytest.raises(BudgetExhausted) as info:
        _charge(ledger, "a", 0.1)  # pure accounting on a dataset spent under zCDP
    assert "accounted as zcdp" in info.value.message
    with pytest.raises(BudgetExhausted):
        ledger.charge(
            principal="a",
            dataset="d",
            cost=PrivacyLoss(0.0, 0.0, 10.0),
            per_principal=budget,
            total=budget,
            request_id="z2",
            accounting=Accounting.ZCDP,
        )
    assert ledger.spent("a", "d").rho == pytest.approx(0.01)


def test_an_unrecorded_charge_is_claimed_once_by_the_next_charge_of_another_ledger(open_ledger: Opener) -> None:
    one, two = open_ledger(), open_ledger()
    lost = _charge(one, "a", 0.2, "lost")
    assert [h["audited"] for h in one.history()] == [False]  # pending until its record is durable
    one.mark_unrecorded([lost.id])
    nxt = _charge(two, "b", 0.1, "next")
    assert [c.request_id for c in nxt.claimed] == ["lost"]
    assert _charge(one, "b", 0.1, "third").claimed == ()  # claimed once only
    two.mark_audited([lost.id, nxt.id])
    assert [(h["request_id"], h["audited"]) for h in two.history()] == [
        ("lost", True),
        ("next", True),
        ("third", False),
    ]
    assert two.spent_total("d").epsilon == pytest.approx(0.4)  # nothing refunded


def test_a_request_id_used_again_is_charged_again(open_ledger: Opener) -> None:
    """Only a retry of a charge whose connection was lost looks for its own first attempt; a request id used again
    by a caller (an in-process context reused for several queries) is charged each time, never released free."""
    one, two = open_ledger(), open_ledger()
    first = _charge(one, "a", 0.25, "reused")
    again = _charge(two, "a", 0.25, "reused")
    assert again.id != first.id and again.principal_before == first.principal_after
    assert one.totals() == {("a", "d"): (50 * 10**10, 0, 0)} and len(one.history()) == 2


def _charge_and_die(address: str) -> None:
    ledger = open_ledger_at(address)
    _charge(ledger, "a", 0.3, "killed")
    os._exit(17)  # killed before the charge's record: its owner lock goes with the process


def test_the_pending_charge_of_a_killed_process_is_found_by_the_next_one(
    open_ledger: Opener, store_address: str
) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_charge_and_die, args=(store_address,))
    p.start()
    p.join(120)
    assert p.exitcode == 17
    live = open_ledger()
    _charge(live, "b", 0.1, "in-flight")  # pending in a live process: not an orphan
    other = open_ledger()
    assert [c.request_id for c in other.claim_stale()] == ["killed"]
    assert other.claim_stale() == ()  # now owned by `other`, which is alive
    live.close()
    third = open_ledger()
    assert [c.request_id for c in third.claim_stale()] == ["in-flight"]
    assert third.spent_total("d").epsilon == pytest.approx(0.4)


def test_recharge_adds_what_the_log_shows_and_never_removes(open_ledger: Opener) -> None:
    ledger = open_ledger()
    _charge(ledger, "a", 0.2, "kept")
    logged = [
        LedgerCharge(None, 1.0, "a", "d", 2 * 10**11, 0, "kept", "query"),
        LedgerCharge(None, 2.0, "a", "d", 3 * 10**11, 0, "lost", "query"),
    ]
    expected = {("a", "d"): (6 * 10**11, 0, 0), ("b", "d"): (10**11, 0, 0)}
    added = ledger.recharge(logged, expected)
    assert [(c.request_id, c.principal, c.eps_units) for c in added][:1] == [("lost", "a", 3 * 10**11)]
    assert [(c.principal, c.eps_units, c.kind) for c in added][1:] == [
        ("a", 10**11, "reconcile"),
        ("b", 10**11, "reconcile"),
    ]
    assert ledger.totals() == expected
    assert ledger.recharge(logged, expected) == []  # idempotent
    assert ledger.recharge([], {("a", "d"): (0, 0, 0)}) == []  # a ledger ahead of the log is left as it is
    assert ledger.spent("a", "d").epsilon == pytest.approx(0.6)


def _race(address: str, principal: str, go: Any, out: Any) -> None:
    """Charge ε=0.01 again and again until the dataset's total refuses; report how many charges were admitted."""
    ledger = open_ledger_at(address)
    ledger.owner()
    go.wait(120)  # all eight ready: the charges overlap
    admitted = 0
    try:
        for i in range(1_000):
            _charge(ledger, principal, 0.01, f"race-{principal}-{i}", per=Budget(epsilon=10.0, delta=0))
            admitted += 1
    except BudgetExhausted as exc:
        out.put((principal, admitted, exc.details["scope"]))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((principal, admitted, repr(exc)))
    finally:
        ledger.close()


def test_racing_processes_admit_exactly_what_fits(open_ledger: Opener, store_address: str) -> None:
    """Eight processes on their own connections charge ε=0.01 at once, over and over, against a dataset total of
    1.5: exactly 150 charges pass in all, and the total spent is the sum of the admitted charges."""
    open_ledger()  # the schema exists before the race (SQLite makes it on open)
    ctx = mp.get_context("spawn")
    go, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(store_address, f"p{i}", go, out)) for i in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert {scope for _, _, scope in results} == {"dataset"}, results
    assert sum(n for _, n, _ in results) == 150
    ledger = open_ledger()
    assert len(ledger.history()) == 150
    assert {(p, "d"): (n * 10**10, 0, 0) for p, n, _ in results if n} == ledger.totals()
    assert ledger.spent_total("d").epsilon == pytest.approx(1.5)
    assert sum(ledger.spent(p, "d").epsilon for p, _, _ in results) == pytest.approx(1.5)
