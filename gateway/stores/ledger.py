"""Durable privacy budgets: per (principal, dataset) and per dataset, in SQLite.

A charge is one `BEGIN IMMEDIATE` transaction: it reads what was spent, checks both caps and records the charge,
so two processes can never both pass when only one fits. Charges are never refunded; a second charge under one
request id is a second charge (only the PostgreSQL store's retry of a charge whose connection was lost looks for
its own first attempt: gateway/stores/pg.py). What was spent is read from `spent`, running totals per (principal,
dataset) that triggers on `charges` keep in the same transaction as every change of a charge (whichever code makes
it), so a charge costs the same however long the history is.

Under a policy's `accounting: zcdp` a charge is checked in ρ (and δ) against the caps converted from the policy's
(ε, δ) by `policies.accountant.rho_cap`; every charge records the accounting it was made under, and a dataset's
spend cannot go on under the other accounting (the two sums do not compose into one figure).

Every charge also says whether the audit log holds a record of it (`audited`): a charge is made `PENDING`, becomes
`AUDITED` once its "admitted" record (or an "orphan_charge" record standing in for it) is durable, and becomes
`UNRECORDED` when writing that record failed, so that the next charge in any process claims it and records it
first. A pending charge whose process died (a kill between the charge and its record) is found at start-up:
each `Ledger` holds an exclusive lock on a file named after it in ``<ledger>.owners/`` while it lives, and a
pending charge whose owner's lock is free belongs to a dead process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.accountant import RHO_UNIT, Accounting, PrivacyLoss, pure_to_rho, rho_cap, selection_delta_cap
from policies.connections import ThreadConnections
from policies.errors import BudgetExhausted, InvalidRequest, LedgerUnavailable
from policies.schema import Budget

PENDING, AUDITED, UNRECORDED = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          REAL    NOT NULL,
    principal   TEXT    NOT NULL,
    dataset     TEXT    NOT NULL,
    eps_units   INTEGER NOT NULL,
    delta_units INTEGER NOT NULL,
    request_id  TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    audited     INTEGER NOT NULL DEFAULT 1,
    owner       TEXT,
    rho_units   INTEGER NOT NULL DEFAULT 0,
    accounting  TEXT    NOT NULL DEFAULT 'pure'
);
CREATE INDEX IF NOT EXISTS charges_pd ON charges(principal, dataset);
CREATE INDEX IF NOT EXISTS charges_d ON charges(dataset);
"""
# Ledgers made before charges carried their audit state get the two columns; their charges count as audited.
# Ledgers made before zCDP accounting get ρ (none spent) and the accounting (pure) of their charges.
_MIGRATIONS = (
    ("audited", "ALTER TABLE charges ADD COLUMN audited INTEGER NOT NULL DEFAULT 1"),
    ("owner", "ALTER TABLE charges ADD COLUMN owner TEXT"),
    ("rho_units", "ALTER TABLE charges ADD COLUMN rho_units INTEGER NOT NULL DEFAULT 0"),
    ("accounting", "ALTER TABLE charges ADD COLUMN accounting TEXT NOT NULL DEFAULT 'pure'"),
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS charges_audited ON charges(audited)",
    "CREATE INDEX IF NOT EXISTS charges_accounting ON charges(dataset, accounting)",
)
# Running totals of `charges`, maintained by triggers (created, and filled from the charges, in one transaction).
_UPSERT_NEW = """
    INSERT INTO spent (principal, dataset, eps_units, delta_units, rho_units)
    VALUES (NEW.principal, NEW.dataset, NEW.eps_units, NEW.delta_units, NEW.rho_units)
    ON CONFLICT (principal, dataset) DO UPDATE SET
        eps_units = eps_units + excluded.eps_units, delta_units = delta_units + excluded.delta_units,
        rho_units = rho_units + excluded.rho_units;"""
_SUBTRACT_OLD = """
    UPDATE spent SET eps_units = eps_units - OLD.eps_units, delta_units = delta_units - OLD.delta_units,
        rho_units = rho_units - OLD.rho_units
    WHERE principal = OLD.principal AND dataset = OLD.dataset;"""
_SPENT = (
    "CREATE TABLE spent (principal TEXT NOT NULL, dataset TEXT NOT NULL, eps_units INTEGER NOT NULL, "
    "delta_units INTEGER NOT NULL, rho_units INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (principal, dataset)) "
    "WITHOUT ROWID",
    f"CREATE TRIGGER spent_insert AFTER INSERT ON charges BEGIN {_UPSERT_NEW}\nEND",
    f"CREATE TRIGGER spent_delete AFTER DELETE ON charges BEGIN {_SUBTRACT_OLD}\nEND",
    "CREATE TRIGGER spent_update AFTER UPDATE OF principal, dataset, eps_units, delta_units, rho_units ON charges "
    f"BEGIN {_SUBTRACT_OLD}{_UPSERT_NEW}\nEND",
)
_SPENT_OBJECTS = {"spent", "spent_insert", "spent_delete", "spent_update"}
_SUMS = "SELECT principal, dataset, SUM(eps_units), SUM(delta_units), SUM(rho_units) FROM charges GROUP BY 1, 2"
_ROW = "id, ts, principal, dataset, eps_units, delta_units, request_id, kind, rho_units"
_OWNER = re.compile(r"[0-9a-f]{32}")


class LedgerBehind(LedgerUnavailable):
    """The ledger records less spend than the audit log shows (deleted, or restored from an older copy)."""

    code = "ledger_behind"


@dataclass(frozen=True)
class Charge:
    """The outcome of a successful charge: what was spent before and after, for the principal and dataset.

    `cost` is the cost as charged: under zCDP with the ρ that a pure cost was converted to.

    `id` is the charge's row (None when nothing was recorded: a zero cost). `claimed` are unrecorded charges of
    earlier requests that this transaction took over: they must be recorded in the audit log with this one.
    """

    cost: PrivacyLoss
    principal_before: PrivacyLoss
    principal_after: PrivacyLoss
    dataset_after: PrivacyLoss
    id: int | None = None
    claimed: tuple[LedgerCharge, ...] = ()
    # A charge on a dataset with periods: the rows it recorded (one per period, `id` is the first) and the periods.
    ids: tuple[int, ...] = ()
    periods: tuple[str, ...] = ()

    @property
    def all_ids(self) -> tuple[int | None, ...]:
        return self.ids or (self.id,)


@dataclass(frozen=True)
class LedgerCharge:
    """One row of the ledger."""

    id: int | None
    ts: float
    principal: str
    dataset: str
    eps_units: int
    delta_units: int
    request_id: str
    kind: str
    rho_units: int = 0

    @property
    def cost(self) -> PrivacyLoss:
        return PrivacyLoss.from_units(self.eps_units, self.delta_units, self.rho_units)

    @staticmethod
    def of(row: tuple[Any, ...]) -> LedgerCharge:
        """The charge of a row selected as `_ROW` (sqlite3 rows are untyped)."""
        i, ts, principal, dataset, e, d, rid, kind, r = row
        return LedgerCharge(
            int(i), float(ts), str(principal), str(dataset), int(e), int(d), str(rid), str(kind), int(r or 0)
        )


def period_charge(
    charged: PrivacyLoss,
    units: tuple[int, int, int],
    worst: tuple[tuple[int, int, int], tuple[int, int, int]],
    ids: Sequence[int],
    claimed: tuple[LedgerCharge, ...],
    periods: Sequence[str],
) -> Charge:
    """The `Charge` of a charge on one or more budget keys (`worst`: the spend of the key with the most spent)."""
    (pe, pd, pr), (te, td, tr) = worst
    ce, cd, cr = units
    return Charge(
        cost=charged,
        principal_before=PrivacyLoss.from_units(pe, pd, pr),
        principal_after=PrivacyLoss.from_units(pe + ce, pd + cd, pr + cr),
        dataset_after=PrivacyLoss.from_units(te + ce, td + cd, tr + cr),
        id=ids[0] if ids else None,
        claimed=claimed,
        ids=tuple(ids) if periods else (),
        periods=tuple(sorted(set(periods))),
    )


def admit(
    dataset: str,
    cost: PrivacyLoss,
    units: tuple[int, int, int],
    principal_spent: tuple[int, int, int],
    dataset_spent: tuple[int, int, int],
    principal_caps: tuple[int, int, int | None],
    dataset_caps: tuple[int, int, int | None],
) -> None:
    """Raise BudgetExhausted unless a charge of `units` (ε, δ, ρ) fits both caps (see `Ledger.caps`), given what
    the principal and the dataset have spent (every store checks a charge with this, under its lock)."""
    ce, cd, cr = units
    pe, pd, pr = principal_spent
    te, td, tr = dataset_spent
    pe_cap, pd_cap, pr_cap = principal_caps
    te_cap, td_cap, tr_cap = dataset_caps
    if pr_cap is not None:
        if pr + cr > pr_cap or pd + cd > pd_cap:
            left = PrivacyLoss.from_units(0, max(pd_cap - pd, 0), max(pr_cap - pr, 0))
            raise BudgetExhausted(
                f"this request costs ρ={cr / RHO_UNIT:.6g}, δ={cost.delta:.3g} but your budget on "
                f"{dataset!r} has ρ={left.rho:.6g}, δ={left.delta:.3g} left",
                scope="principal",
                remaining={**left.as_dict(), "rho": left.rho},
            )
    elif pe + ce > pe_cap or pd + cd > pd_cap:
        left = PrivacyLoss.from_units(max(pe_cap - pe, 0), max(pd_cap - pd, 0))
        raise BudgetExhausted(
            f"this request costs ε={cost.epsilon:.6g}, δ={cost.delta:.3g} but your budget on "
            f"{dataset!r} has ε={left.epsilon:.6g}, δ={left.delta:.3g} left",
            scope="principal",
            remaining=left.as_dict(),
        )
    over_rho = tr_cap is not None and tr + cr > tr_cap
    if over_rho or (tr_cap is None and te + ce > te_cap) or td + cd > td_cap:
        raise BudgetExhausted(
            f"this request would exceed the total privacy budget of dataset {dataset!r}",
            scope="dataset",
        )


def recharge_in(
    charges: Iterable[LedgerCharge],
    expected: Mapping[tuple[str, str], tuple[int, int, int]],
    *,
    held: set[tuple[str, str]],
    zcdp: set[str],
    insert: Callable[[LedgerCharge, bool], LedgerCharge],
    sums: Callable[[], Mapping[tuple[str, str], tuple[int, int, int]]],
) -> list[LedgerCharge]:
    """The body of `recharge` inside a store's transaction (every store's: one reconciliation rule).

    `held` is the (request id, key) pairs the ledger holds (a charge on a dataset with periods is a row per period,
    under the key `dataset@period`, all of one request id), `zcdp` the keys it charges under zCDP,
    `insert(charge, zcdp)` records one charge and `sums()` reads the spent units per (principal, key) as `totals`
    does."""
    added: list[LedgerCharge] = []
    charges = list(charges)
    zcdp = zcdp | {c.dataset for c in charges if c.rho_units}
    for c in charges:
        if (c.request_id, c.dataset) in held or not (c.eps_units or c.delta_units or c.rho_units):
            continue
        added.append(insert(c, c.dataset in zcdp))
        held.add((c.request_id, c.dataset))
    have = sums()
    for (principal, dataset), (want_e, want_d, want_r) in sorted(expected.items()):
        got_e, got_d, got_r = have.get((principal, dataset), (0, 0, 0))
        if got_e < want_e or got_d < want_d or got_r < want_r:
            top_up = LedgerCharge(
                None,
                time.time(),
                principal,
                dataset,
                max(want_e - got_e, 0),
                max(want_d - got_d, 0),
                f"reconcile-{uuid.uuid4().hex}",
                "reconcile",
                max(want_r - got_r, 0),
            )
            added.append(insert(top_up, dataset in zcdp or want_r > got_r))
    return added


PERIOD_SEPARATOR = "@"


def budget_keys(dataset: str, periods: Sequence[str]) -> list[str]:
    """The ledger's keys of a charge: the dataset, or for a dataset with periods `dataset@period` for each period
    charged, sorted (every store takes them, and their locks, in this order). A dataset's name has no `@`."""
    if not periods:
        return [dataset]
    return sorted({f"{dataset}{PERIOD_SEPARATOR}{p}" for p in periods})


def base_dataset(key: str) -> str:
    """The dataset a ledger key belongs to."""
    return key.split(PERIOD_SEPARATOR, 1)[0]


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)  # what messages and records name the ledger by
        self.owners_dir = self.path.with_name(self.path.name + ".owners")
        self._connections = ThreadConnections(self._connect)
        self._owner: tuple[int, str, int] | None = None  # (pid, owner id, fd of its held lock file)
        try:
            with closing(self._connect()) as con:
                con.executescript(_SCHEMA)
                columns = {row[1] for row in con.execute("PRAGMA table_info(charges)")}
                if any(name not in columns for name, _ in _MIGRATIONS):
                    con.execute("BEGIN IMMEDIATE")
                    try:
                        columns = {row[1] for row in con.execute("PRAGMA table_info(charges)")}
                        for name, ddl in _MIGRATIONS:
                            if name not in columns:
                                con.execute(ddl)
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                for index in _INDEXES:
                    con.execute(index)
                self._ensure_spent(con)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be opened: {exc}") from exc

    @staticmethod
    def _ensure_spent(con: sqlite3.Connection) -> None:
        """Create the running totals and their triggers if missing, and (re)fill them from the charges if they do
        not agree with them (a ledger from before the totals, or one edited with its triggers dropped)."""
        con.execute("BEGIN IMMEDIATE")
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')")}
            if "spent" in names and "rho_units" not in {r[1] for r in con.execute("PRAGMA table_info(spent)")}:
                names.discard("spent")  # totals from before ρ: made again, with their triggers
            if not _SPENT_OBJECTS <= names:
                for name in sorted(_SPENT_OBJECTS):
                    kind = "TABLE" if name == "spent" else "TRIGGER"
                    con.execute(f"DROP {kind} IF EXISTS {name}")
                for statement in _SPENT:
                    con.execute(statement)
            sums = {(p, d): (e, dl, r) for p, d, e, dl, r in con.execute(_SUMS)}
            held = {
                (p, d): (e, dl, r)
                for p, d, e, dl, r in con.execute(
                    "SELECT principal, dataset, eps_units, delta_units, rho_units FROM spent"
                )
                if e or dl or r or (p, d) in sums
            }
            if held != sums:
                con.execute("DELETE FROM spent")
                con.execute(f"INSERT INTO spent (principal, dataset, eps_units, delta_units, rho_units) {_SUMS}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    # --- the owner lock -----------------------------------------------------------------------------------

    def owner(self) -> str:
        """This process's owner id, holding its lock file from the first call on (once per process)."""
        if self._owner is not None and self._owner[0] == os.getpid():
            return self._owner[1]
        owner = uuid.uuid4().hex
        try:
            self.owners_dir.mkdir(mode=0o700, exist_ok=True)
            # Locked under a temporary name, then renamed: a sweeper never sees the file unlocked.
            tmp = self.owners_dir / f".{owner}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(tmp, self.owners_dir / f"{owner}.lock")
        except OSError as exc:
            raise LedgerUnavailable(f"the budget ledger's owner lock cannot be taken: {exc}") from exc
        self._owner = (os.getpid(), owner, fd)
        return owner

    def _alive(self, owner: str | None) -> bool:
        """Whether the process that made a charge as `owner` still holds its lock."""
        if owner is None or not _OWNER.fullmatch(owner):
            return False
        if self._owner is not None and self._owner[0] == os.getpid() and self._owner[1] == owner:
            return True
        path = self.owners_dir / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return False

    def close(self) -> None:
        """Release this process's owner lock (its pending charges, if any, then count as orphans)."""
        if self._owner is not None and self._owner[0] == os.getpid():
            _, owner, fd = self._owner
            with contextlib.suppress(OSError):
                (self.owners_dir / f"{owner}.lock").unlink()
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owner = None

    # --- charging -----------------------------------------------------------------------------------------

    @staticmethod
    def _sum(con: sqlite3.Connection, where: str, args: tuple[str, ...]) -> tuple[int, int, int]:
        """Spent units (ε, δ, ρ) where `where` holds, from the running totals."""
        row = con.execute(
            "SELECT COALESCE(SUM(eps_units), 0), COALESCE(SUM(delta_units), 0), COALESCE(SUM(rho_units), 0) "
            f"FROM spent WHERE {where}",
            args,
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    @staticmethod
    def caps(budget: Budget, accounting: Accounting) -> tuple[int, int, int | None]:
        """A declared (ε, δ) cap in ledger units (ε, δ, ρ), rounded down: under zCDP ε is not capped itself (None
        stands for no cap), ρ is capped by its conversion and δ by what the conversion leaves."""
        delta = selection_delta_cap(budget.delta, accounting)
        if accounting is Accounting.ZCDP:
            rho = PrivacyLoss(0.0, 0.0, rho_cap(budget.epsilon, budget.delta)).rho_units(round_up=False)
            return -1, PrivacyLoss(0.0, delta).units(round_up=False)[1], rho
        e, d = PrivacyLoss(budget.epsilon, delta).units(round_up=False)
        return e, d, None

    @staticmethod
    def charged_rho(cost: PrivacyLoss, accounting: Accounting) -> float:
        """The ρ a charge records: none under pure accounting; under zCDP the cost's ρ plus ε²/2 for its pure part
        (an LF statistic or a synthetic proxy: OpenDP's pure-DP to zCDP conversion, which needs δ = 0 there)."""
        if accounting is Accounting.PURE or not cost.epsilon:
            return cost.rho
        if cost.delta:
            raise InvalidRequest(
                "this release is (ε, δ)-DP with δ > 0, which has no zCDP form; the dataset's policy accounts in "
                "ρ (accounting: zcdp), so give it δ = 0 or use a dataset with accounting: pure"
            )
        return cost.rho + pure_to_rho(cost.epsilon)

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
        accounting: Accounting = Accounting.PURE,
        periods: Sequence[str] = (),
    ) -> Charge:
        """Record `cost` (pending its audit record) if both caps allow it; raise BudgetExhausted (nothing
        recorded) if not. Unrecorded charges of earlier requests are claimed in the same transaction.

        Under zCDP (`accounting`) the caps are on ρ and δ (see `caps`), and the cost's pure ε counts as ε²/2.

        `periods` (a dataset with periods): the cost is charged to each of these periods' budgets, each under both
        caps, in one transaction: all of them or none. The budgets before and after are those of the period with
        the most spent."""
        ce, cd = cost.units(round_up=True)
        charged = PrivacyLoss(cost.epsilon, cost.delta, self.charged_rho(cost, accounting))
        cr = charged.rho_units(round_up=True)
        pe_cap, pd_cap, pr_cap = self.caps(per_principal, accounting)
        te_cap, td_cap, tr_cap = self.caps(total, accounting)
        other = Accounting.PURE if accounting is Accounting.ZCDP else Accounting.ZCDP
        owner = self.owner()
        keys = budget_keys(dataset, periods)
        ids: list[int] = []
        worst: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
        try:
            with self._connections.get() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    # Every period is checked before any is recorded: one refusal charges none (the transaction).
                    for key in keys:
                        spent = self._sum(con, "principal = ? AND dataset = ?", (principal, key))
                        total_spent = self._sum(con, "dataset = ?", (key,))
                        if con.execute(
                            "SELECT 1 FROM charges WHERE dataset = ? AND accounting = ? LIMIT 1", (key, other.value)
                        ).fetchone():
                            raise BudgetExhausted(
                                f"the spend on dataset {dataset!r} was accounted as {other.value}, and its policy now "
                                f"says {accounting.value}: spend under one accounting cannot go on under the other "
                                "(register the data as a new dataset to start a new budget)",
                                scope="dataset",
                            )
                        admit(
                            key if periods else dataset,
                            cost,
                            (ce, cd, cr),
                            spent,
                            total_spent,
                            (pe_cap, pd_cap, pr_cap),
                            (te_cap, td_cap, tr_cap),
                        )
                        if worst is None or spent > worst[0]:
                            worst = (spent, total_spent)
                    if ce or cd or cr:
                        for key in keys:
                            row_id = con.execute(
                                "INSERT INTO charges (ts, principal, dataset, eps_units, delta_units, request_id, kind,"
                                " audited, owner, rho_units, accounting) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (
                                    time.time(),
                                    principal,
                                    key,
                                    ce,
                                    cd,
                                    request_id,
                                    kind,
                                    PENDING,
                                    owner,
                                    cr,
                                    accounting.value,
                                ),
                            ).lastrowid
                            assert row_id is not None
                            ids.append(row_id)
                    claimed = self._claim(con, owner, "audited = ?", (UNRECORDED,))
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be written: {exc}") from exc
        assert worst is not None
        return period_charge(charged, (ce, cd, cr), worst, ids, claimed, periods)

    @staticmethod
    def _claim(con: sqlite3.Connection, owner: str, where: str, args: tuple[object, ...]) -> tuple[LedgerCharge, ...]:
        rows = con.execute(
            f"UPDATE charges SET audited = ?, owner = ? WHERE {where} RETURNING {_ROW}", (PENDING, owner, *args)
        ).fetchall()
        return tuple(sorted((LedgerCharge.of(r) for r in rows), key=lambda c: c.id or 0))

    # --- audit state --------------------------------------------------------------------------------------

    def _set_state(self, ids: Iterable[int | None], state: int, only: int | None = None, *, sync: bool = True) -> None:
        ids = [i for i in ids if i is not None]
        if not ids:
            return
        marks = ", ".join("?" * len(ids))
        where = f"id IN ({marks})" + ("" if only is None else f" AND audited = {int(only)}")
        try:
            with self._connections.get() as con:
                if not sync:
                    con.execute("PRAGMA synchronous=NORMAL")
                try:
                    con.execute(f"UPDATE charges SET audited = ? WHERE {where}", (state, *ids))
                finally:
                    if not sync:
                        con.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be written: {exc}") from exc

    def mark_audited(self, ids: Iterable[int | None]) -> None:
        """The audit log durably holds a record of these charges.

        Committed without waiting for the disk: a mark lost in a crash leaves the charge pending, and the
        start-up check then finds its record in the log and marks it again.
        """
        self._set_state(ids, AUDITED, sync=False)

    def mark_unrecorded(self, ids: Iterable[int | None]) -> None:
        """Writing the audit record of these (pending) charges failed: the next charge claims them."""
        self._set_state(ids, UNRECORDED, only=PENDING)

    def claim_unrecorded(self) -> tuple[LedgerCharge, ...]:
        """Take over every unrecorded charge, for this process to record it in the audit log."""
        return self._claim_where("audited = ?", (UNRECORDED,))

    def claim_stale(self) -> tuple[LedgerCharge, ...]:
        """Take over every unrecorded charge and every pending charge whose process is gone (start-up)."""
        try:
            with self._connections.get() as con:
                owners = [r[0] for r in con.execute("SELECT DISTINCT owner FROM charges WHERE audited = ?", (PENDING,))]
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be read: {exc}") from exc
        dead = [o for o in owners if not self._alive(o)]
        claimed = list(self.claim_unrecorded())
        for o in dead:
            if o is None:
                claimed += self._claim_where("audited = ? AND owner IS NULL", (PENDING,))
            else:
                claimed += self._claim_where("audited = ? AND owner = ?", (PENDING, o))
        return tuple(sorted(claimed, key=lambda c: c.id or 0))

    def _claim_where(self, where: str, args: tuple[object, ...]) -> tuple[LedgerCharge, ...]:
        owner = self.owner()
        try:
            with self._connections.get() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    claimed = self._claim(con, owner, where, args)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be written: {exc}") from exc
        return claimed

    # --- consistency with the audit log -------------------------------------------------------------------

    def totals(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """Spent units (ε, δ, ρ) per (principal, dataset)."""
        try:
            with self._connections.get() as con:
                rows = con.execute(_SUMS).fetchall()
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be read: {exc}") from exc
        return {(str(p), str(d)): (int(e), int(dl), int(r)) for p, d, e, dl, r in rows}

    def recharge(
        self, charges: Iterable[LedgerCharge], expected: Mapping[tuple[str, str], tuple[int, int, int]]
    ) -> list[LedgerCharge]:
        """Bring the ledger up to what the audit log shows, in one transaction; never removes anything.

        Each of `charges` (from the log) whose request id the ledger does not hold is charged again, as audited
        (its record is in the log); then every (principal, dataset) still below `expected` gets one charge of
        the difference. Caps are not checked: this re-records spend that happened. Returns what was added.
        A charge in ρ is recorded under zCDP accounting, and so is any charge on a dataset that has one.
        """
        try:
            with self._connections.get() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    added = recharge_in(
                        charges,
                        expected,
                        held={
                            (str(r[0]), str(r[1]))
                            for r in con.execute("SELECT DISTINCT request_id, dataset FROM charges")
                        },
                        zcdp={
                            str(r[0])
                            for r in con.execute(
                                "SELECT DISTINCT dataset FROM charges WHERE accounting = ?", (Accounting.ZCDP.value,)
                            )
                        },
                        insert=lambda c, zcdp: self._insert(con, c, zcdp),
                        sums=lambda: {
                            (str(p), str(d)): (int(e), int(dl), int(r)) for p, d, e, dl, r in con.execute(_SUMS)
                        },
                    )
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the budget ledger cannot be written: {exc}") from exc
        return added

    @staticmethod
    def _insert(con: sqlite3.Connection, c: LedgerCharge, zcdp: bool) -> LedgerCharge:
        accounting = Accounting.ZCDP if zcdp else Accounting.PURE
        row_id = con.execute(
            "INSERT INTO charges (ts, principal, dataset, eps_units, delta_units, request_id, kind, audited,"
            " rho_units, accounting) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                c.ts,
                c.principal,
                c.dataset,
                c.eps_units,
                c.delta_units,
                c.request_id,
                c.kind,
                AUDITED,
                c.rho_units,
                accounting.value,
            ),
        ).lastrowid
        return LedgerCharge(
            row_id, c.ts, c.principal, c.dataset, c.eps_units, c.delta_units, c.request_id, c.kind, c.rho_units
        )

    # --- reading ------------------------------------------------------------------------------------------

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
        """Every charge in order (for the auditor's privacy-spend report); of `dataset`, with the rows of each of
        its periods (keys `dataset@period`)."""
        q = (
            "SELECT ts, principal, dataset, eps_units, delta_units, request_id, kind, audited, rho_units, accounting "
            "FROM charges"
        )
        args: tuple[str | int, ...] = ()
        if dataset is not None:
            q += " WHERE dataset = ? OR substr(dataset, 1, ?) = ?"
            args = (dataset, len(dataset) + 1, dataset + PERIOD_SEPARATOR)
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
                **({"rho": PrivacyLoss.from_units(0, 0, r[8]).rho} if r[8] else {}),
                "accounting": r[9],
                "request_id": r[5],
                "kind": r[6],
                "audited": r[7] == AUDITED,
            }
            for r in rows
        ]
