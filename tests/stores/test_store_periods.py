"""Charges on a dataset with periods (`Policy.period`) on each store: one budget per period, a charge covering
several periods is all or nothing, and locks are taken in one order (no deadlock between racing charges)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest

from gateway.stores.base import LedgerStore
from gateway.stores.ledger import base_dataset, budget_keys
from policies.accountant import PrivacyLoss
from policies.errors import BudgetExhausted
from policies.schema import Budget

Opener = Callable[[], LedgerStore]
PER, TOTAL = Budget(epsilon=1.0, delta=0), Budget(epsilon=1.5, delta=0)
UNIT = 10**12  # ledger units per ε


def _charge(ledger: LedgerStore, principal: str, eps: float, periods: list[str]) -> object:
    return ledger.charge(
        principal=principal,
        dataset="v",
        cost=PrivacyLoss(eps),
        per_principal=PER,
        total=TOTAL,
        request_id=uuid.uuid4().hex,
        periods=periods,
    )


def test_budget_keys_are_sorted_and_name_their_dataset() -> None:
    assert budget_keys("v", []) == ["v"]
    assert budget_keys("v", ["2024-03", "2024-01", "2024-03"]) == ["v@2024-01", "v@2024-03"]
    assert {base_dataset(k) for k in budget_keys("v", ["2024-01", "2024-02"])} == {"v"}


def test_each_period_has_its_own_caps(open_ledger: Opener) -> None:
    ledger = open_ledger()
    for _ in range(10):
        _charge(ledger, "a", 0.1, ["2024-06"])
    # The last period is spent for a; the others are untouched, so a query on them is still answered.
    with pytest.raises(BudgetExhausted):
        _charge(ledger, "a", 0.01, ["2024-06"])
    charge = _charge(ledger, "a", 1.0, ["2024-01", "2024-02"])
    assert charge.periods == ("2024-01", "2024-02")  # type: ignore[attr-defined]
    assert len(charge.ids) == 2  # type: ignore[attr-defined]
    assert ledger.totals() == {
        ("a", "v@2024-06"): (UNIT, 0, 0),
        ("a", "v@2024-01"): (UNIT, 0, 0),
        ("a", "v@2024-02"): (UNIT, 0, 0),
    }
    # The total cap is per period too: b may spend 0.5 on 2024-06 (1.0 + 0.5 = 1.5) but not more.
    _charge(ledger, "b", 0.5, ["2024-06"])
    with pytest.raises(BudgetExhausted) as info:
        _charge(ledger, "c", 0.01, ["2024-06"])
    assert info.value.details["scope"] == "dataset"
    assert ledger.spent_total("v@2024-06").epsilon == pytest.approx(1.5)


def test_a_refusal_in_one_period_charges_none_of_the_others(open_ledger: Opener) -> None:
    ledger = open_ledger()
    _charge(ledger, "a", 0.9, ["2024-03"])
    before = ledger.totals()
    with pytest.raises(BudgetExhausted):
        _charge(ledger, "a", 0.2, ["2024-01", "2024-02", "2024-03", "2024-04"])
    assert ledger.totals() == before
    assert len(ledger.history()) == 1
    # What fits in every period is charged in every period, as one request.
    _charge(ledger, "a", 0.1, ["2024-01", "2024-02", "2024-03", "2024-04"])
    rows = ledger.history()
    assert len(rows) == 5 and len({r["request_id"] for r in rows[1:]}) == 1
    assert ledger.spent("a", "v@2024-03").epsilon == pytest.approx(1.0)


def test_racing_charges_over_overlapping_periods_neither_deadlock_nor_overspend(open_ledger: Opener) -> None:
    ledgers = [open_ledger() for _ in range(4)]
    outcomes: list[str] = []
    guard = threading.Lock()

    def run(ledger: LedgerStore, periods: list[str]) -> None:
        for _ in range(6):
            try:
                _charge(ledger, "a", 0.1, periods)
                result = "ok"
            except BudgetExhausted:
                result = "refused"
            with guard:
                outcomes.append(result)

    spans = [["2024-01", "2024-02"], ["2024-02", "2024-01"], ["2024-02", "2024-03"], ["2024-03", "2024-01"]]
    threads = [threading.Thread(target=run, args=(ledger, s)) for ledger, s in zip(ledgers, spans, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    totals = ledgers[0].totals()
    assert all(units[0] <= UNIT for units in totals.values())
    # Every answered charge is in both of its periods: the sum over periods is twice the answered count.
    assert sum(u[0] for u in totals.values()) == 2 * outcomes.count("ok") * UNIT // 10
