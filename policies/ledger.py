"""Durable privacy budgets: per (principal, dataset) and per dataset, in SQLite.

A charge is one `BEGIN IMMEDIATE` transaction: it reads what was spent, checks both caps and records the charge,
so two processes can never both pass when only one fits. Charges are never refunded.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from policies.accountant import PrivacyLoss
from policies.connections import ThreadConnections
from policies.errors import BudgetExhausted, LedgerUnavailable
from policies.schema import Budget

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          REAL    NOT NULL,
    principal   TEXT    NOT NULL,
    dataset     TEXT    NOT NULL,
    eps_units   INTEGER NOT NULL,
    delta_units INTEGER NOT NULL,
    request_id  TEXT    NOT NULL,
    kind        TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_pd ON charges(principal, dataset);
CREATE INDEX IF NOT EXISTS charges_d ON charges(dataset);
"""


@dataclass(frozen=True)
class Charge:
    """The outcome of a successful charge: what was spent before and after, for the principal and dataset."""

    cost: PrivacyLoss
    principal_before: PrivacyLoss
    principal_after: PrivacyLoss
    dataset_after: PrivacyLoss


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._connections = ThreadConnections(self._connect)
        try:
            with closing(self._connect()) as con:
                con.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be opened: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    @staticmethod
    def _sum(con: sqlite3.Connection, where: str, args: tuple[str, ...]) -> tuple[int, int]:
        row = con.execute(
            f"SELECT COALESCE(SUM(eps_units), 0), COALESCE(SUM(delta_units), 0) FROM charges WHERE {where}", args
        ).fetchone()
        return int(row[0]), int(row[1])

    def charge(
        self,
        *,
        principal: str,
        dataset: str,
        cost: PrivacyLoss,
        per_principal: Budget,
        total: Budget,
        request_id: str,
        kind: str = "query",
    ) -> Charge:
        """Record `cost` if both caps allow it; raise BudgetExhausted (nothing recorded) if not."""
        ce, cd = cost.units(round_up=True)
        pe_cap, pd_cap = PrivacyLoss(per_principal.epsilon, per_principal.delta).units(round_up=False)
        te_cap, td_cap = PrivacyLoss(total.epsilon, total.delta).units(round_up=False)
        try:
            with self._connections.get() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    pe, pd = self._sum(con, "principal = ? AND dataset = ?", (principal, dataset))
                    te, td = self._sum(con, "dataset = ?", (dataset,))
                    if pe + ce > pe_cap or pd + cd > pd_cap:
                        left = PrivacyLoss.from_units(max(pe_cap - pe, 0), max(pd_cap - pd, 0))
                        raise BudgetExhausted(
                            f"this request costs ε={cost.epsilon:.6g}, δ={cost.delta:.3g} but your budget on "
                            f"{dataset!r} has ε={left.epsilon:.6g}, δ={left.delta:.3g} left",
                            scope="principal",
                            remaining=left.as_dict(),
                        )
                    if te + ce > te_cap or td + cd > td_cap:
                        raise BudgetExhausted(
                            f"this request would exceed the total privacy budget of dataset {dataset!r}",
                            scope="dataset",
                        )
                    if ce or cd:
                        con.execute(
                            "INSERT INTO charges (ts, principal, dataset, eps_units, delta_units, request_id, kind)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (time.time(), principal, dataset, ce, cd, request_id, kind),
                        )
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be written: {exc}") from exc
        return Charge(
            cost=cost,
            principal_before=PrivacyLoss.from_units(pe, pd),
            principal_after=PrivacyLoss.from_units(pe + ce, pd + cd),
            dataset_after=PrivacyLoss.from_units(te + ce, td + cd),
        )

    def spent(self, principal: str, dataset: str) -> PrivacyLoss:
        return self._read("principal = ? AND dataset = ?", (principal, dataset))

    def spent_total(self, dataset: str) -> PrivacyLoss:
        return self._read("dataset = ?", (dataset,))

    def _read(self, where: str, args: tuple[str, ...]) -> PrivacyLoss:
        try:
            with self._connections.get() as con:
                return PrivacyLoss.from_units(*self._sum(con, where, args))
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be read: {exc}") from exc

    def history(self, dataset: str | None = None) -> list[dict[str, object]]:
        """Every charge in order (for the auditor's privacy-spend report)."""
        q = "SELECT ts, principal, dataset, eps_units, delta_units, request_id, kind FROM charges"
        args: tuple[str, ...] = ()
        if dataset is not None:
            q += " WHERE dataset = ?"
            args = (dataset,)
        try:
            with closing(self._connect()) as con:
                rows = con.execute(q + " ORDER BY id", args).fetchall()
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be read: {exc}") from exc
        return [
            {
                "ts": r[0],
                "principal": r[1],
                "dataset": r[2],
                **PrivacyLoss.from_units(r[3], r[4]).as_dict(),
                "request_id": r[5],
                "kind": r[6],
            }
            for r in rows
        ]
