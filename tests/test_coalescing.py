"""Identical requests in flight at once are served by one release (one charge, one noise draw), and a released
answer is returned even when the release cache cannot be written."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from audit.log import AuditLog
from gateway.service import Bastion, Context
from gateway.stores.ledger import Ledger
from policies.errors import LedgerUnavailable
from tests.conftest import Workspace

SQL = "SELECT region, COUNT(*) AS n, AVG(income) FROM visits GROUP BY region"
N = 6


def _slow_charges(bastion: Bastion, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold every request for a moment after its charge, so that the concurrent ones are surely in flight."""
    charge = bastion.ledger.charge

    def slow(**kwargs: Any) -> Any:
        done = charge(**kwargs)
        time.sleep(0.3)
        return done

    monkeypatch.setattr(bastion.ledger, "charge", slow)


def _together(calls: list[Callable[[], dict[str, Any]]]) -> list[dict[str, Any]]:
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertions
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(o, dict) for o in out), out
    return out


def test_identical_concurrent_requests_share_one_release(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    bastion = Bastion(workspace.settings)
    try:
        _slow_charges(bastion, monkeypatch)
        alice = bastion.tokens.authenticate(workspace.tokens["analyst"])
        answers = _together([lambda: bastion.query(Context(alice), SQL, epsilon=0.5) for _ in range(N)])
    finally:
        bastion.close()
    assert len(Ledger(workspace.settings.ledger).history()) == 1
    assert sorted(a["cached"] for a in answers) == [False] + [True] * (N - 1)
    assert sum(a["epsilon_spent"] for a in answers) == 0.5
    assert len({str((a["rows"], a["intervals"])) for a in answers}) == 1
    assert len({a["query_id"] for a in answers}) == N
    queries = [r for r in AuditLog(workspace.settings.audit_dir).records() if r["event"] == "query"]
    assert sorted(r["reason"] for r in queries) == ["cached"] * (N - 1) + ["ok", "ok"]  # admitted, released


def test_different_principals_are_not_coalesced(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    bastion = Bastion(workspace.settings)
    try:
        _slow_charges(bastion, monkeypatch)
        alice = bastion.tokens.authenticate(workspace.tokens["analyst"])
        bob = bastion.tokens.authenticate(bastion.tokens.create("bob", "analyst")[0])
        answers = _together([partial(bastion.query, Context(p), SQL, epsilon=0.5) for p in (alice, bob)])
    finally:
        bastion.close()
    assert [a["cached"] for a in answers] == [False, False]
    assert sorted(str(c["principal"]) for c in Ledger(workspace.settings.ledger).history()) == ["alice", "bob"]


def test_a_failed_leader_lets_the_next_request_run_on_its_own(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    bastion = Bastion(workspace.settings)
    charge = bastion.ledger.charge
    calls = {"n": 0}

    def first_fails(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(0.3)
            raise LedgerUnavailable("the ledger cannot be written")
        return charge(**kwargs)

    monkeypatch.setattr(bastion.ledger, "charge", first_fails)
    try:
        alice = bastion.tokens.authenticate(workspace.tokens["analyst"])
        results: list[Any] = []

        def ask() -> None:
            try:
                results.append(bastion.query(Context(alice), SQL, epsilon=0.5))
            except LedgerUnavailable as exc:
                results.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
    finally:
        bastion.close()
    assert sorted(type(r).__name__ for r in results) == ["LedgerUnavailable", "dict"]
    assert len(Ledger(workspace.settings.ledger).history()) == 1


def test_a_released_answer_survives_a_full_disk_at_the_cache(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    with workspace.app() as c:
        bastion = c.app.state.bastion

        def full(*args: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(bastion.cache, "put", full)
        r = c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=workspace.headers("analyst"))
    assert r.status_code == 200, r.text
    assert r.json()["epsilon_spent"] == 0.5 and r.json()["rows"]
    released = [r for r in AuditLog(workspace.settings.audit_dir).records() if r.get("phase") == "released"]
    assert [rec["reason"] for rec in released] == ["ok"]
