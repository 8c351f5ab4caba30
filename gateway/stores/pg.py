"""The ledger and the release cache in PostgreSQL, shared by gateway replicas on several hosts (psycopg 3, a
connection pool per store). The schema also holds the tokens' table, used by gateway/stores/pg_tokens.py, and the
audit log's tables, used by gateway/stores/pg_audit.py, and the synthesis jobs' table, used by
gateway/stores/pg_jobs.py.

The schema is versioned: `migrate` (run by `bastion store migrate`) applies the missing versions in one transaction
and records each in `bastion_schema` (by number: every version the store lacks, not only those above its highest);
a store whose schema is behind (or ahead of) this code refuses to open.

The ledger keeps the SQLite ledger's guarantees (gateway/stores/ledger.py) across hosts:

- a charge is one transaction that first takes a transaction-level advisory lock on its dataset, then reads the
  running totals of the principal and of the dataset (`ledger_spent`, kept in the same transaction as every charge,
  never a sum over the history), checks both caps and records the charge: two replicas cannot both pass when only
  one fits. Units are exact integers (BIGINT per charge, NUMERIC totals); nothing is ever refunded.
- owner liveness: each ledger holds a session-level advisory lock keyed by its owner id on a connection of its
  own, for as long as it lives; a pending charge whose owner's lock can be taken belongs to a dead process (the
  server releases a session's locks when its connection ends, whichever host it was on).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from gateway.stores.ledger import (
    AUDITED,
    PENDING,
    PERIOD_SEPARATOR,
    UNRECORDED,
    Charge,
    Ledger,
    LedgerCharge,
    admit,
    budget_keys,
    period_charge,
    recharge_in,
)
from policies.accountant import Accounting, PrivacyLoss
from policies.errors import BudgetExhausted, InvalidRequest, LedgerUnavailable
from policies.schema import Budget

# Advisory lock classes (the first of the two int4 keys), so that Bastion's locks never meet another program's.
_OWNER_LOCK = 0x42A50001
_DATASET_LOCK = 0x42A50002
_SCHEMA_LOCK = 0x42A50003
_JOB_ADMIT_LOCK = 0x42A50004  # a principal's synthesis job admissions (gateway/stores/pg_jobs.py)
_JOB_RUN_LOCK = 0x42A50005  # the lease of the process running a synthesis job
_OWNER = re.compile(r"[0-9a-f]{32}")
CONNECT_TIMEOUT = 5  # seconds to reach the server before a request gets 503
OWNER_CHECK_SECONDS = 1.0  # how often the owner lock's connection is checked
POOL_TIMEOUT = 5.0  # seconds a request waits for a pooled connection (then 503)
# A pool that lost its server retries with an exponential backoff (psycopg_pool: 1 s, 2 s, 4 s, ...), which after a
# long outage would keep the gateway answering 503 for about as long again once the server is back. Each round of
# retries ends after this many seconds instead; the next request then starts a new one at once.
RECONNECT_SECONDS = 5.0

# Versioned schema: each version is applied once, in order, and recorded in bastion_schema.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE ledger_charges (
                id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                ts          DOUBLE PRECISION NOT NULL,
                principal   TEXT     NOT NULL,
                dataset     TEXT     NOT NULL,
                eps_units   BIGINT   NOT NULL CHECK (eps_units >= 0),
                delta_units BIGINT   NOT NULL CHECK (delta_units >= 0),
                rho_units   BIGINT   NOT NULL DEFAULT 0 CHECK (rho_units >= 0),
                request_id  TEXT     NOT NULL,
                kind        TEXT     NOT NULL,
                audited     SMALLINT NOT NULL,
                owner       TEXT,
                accounting  TEXT     NOT NULL DEFAULT 'pure'
            )""",
            "CREATE INDEX ledger_charges_pd ON ledger_charges (principal, dataset)",
            "CREATE INDEX ledger_charges_audited ON ledger_charges (audited) WHERE audited <> 1",
            "CREATE INDEX ledger_charges_accounting ON ledger_charges (dataset, accounting)",
            "CREATE INDEX ledger_charges_request ON ledger_charges (request_id)",
            """CREATE TABLE ledger_spent (
                principal   TEXT NOT NULL,
                dataset     TEXT NOT NULL,
                eps_units   NUMERIC(40, 0) NOT NULL,
                delta_units NUMERIC(40, 0) NOT NULL,
                rho_units   NUMERIC(40, 0) NOT NULL,
                PRIMARY KEY (principal, dataset)
            )""",
            "CREATE INDEX ledger_spent_d ON ledger_spent (dataset)",
            """CREATE TABLE release_cache (
                key       TEXT PRIMARY KEY,
                principal TEXT NOT NULL,
                created   DOUBLE PRECISION NOT NULL,
                response  TEXT NOT NULL
            )""",
        ),
    ),
    (
        2,
        (
            # Bearer tokens (gateway/stores/pg_tokens.py): the SHA-256 hash of each secret, never the secret.
            """CREATE TABLE tokens (
                token_id    TEXT PRIMARY KEY,
                name        TEXT NOT NULL,
                role        TEXT NOT NULL,
                hash        TEXT NOT NULL UNIQUE,
                created     DOUBLE PRECISION NOT NULL,
                expires     DOUBLE PRECISION,
                revoked     DOUBLE PRECISION,
                last_used   DOUBLE PRECISION,
                replaced_by TEXT
            )""",
            "CREATE INDEX tokens_name ON tokens (name)",
        ),
    ),
    (
        3,
        (
            # The audit log of every replica (gateway/stores/pg_audit.py): the exact canonical bytes of each record,
            # the signed checkpoints, and one head row that appends lock (size, last leaf hash, Merkle frontier).
            """CREATE TABLE audit_records (
                seq  BIGINT PRIMARY KEY CHECK (seq >= 0),
                body BYTEA NOT NULL
            )""",
            """CREATE TABLE audit_checkpoints (
                id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tree_size BIGINT NOT NULL CHECK (tree_size >= 0),
                body      BYTEA NOT NULL
            )""",
            """CREATE TABLE audit_head (
                id         SMALLINT PRIMARY KEY CHECK (id = 1),
                size       BIGINT NOT NULL,
                last_leaf  TEXT NOT NULL,
                last_time  TEXT,
                frontier   BYTEA[] NOT NULL,
                ckpt_size  BIGINT NOT NULL,
                ckpt_epoch DOUBLE PRECISION,
                key_id     TEXT
            )""",
            "INSERT INTO audit_head (id, size, last_leaf, frontier, ckpt_size) VALUES (1, 0, repeat('0', 64), '{}', 0)",
        ),
    ),
    (
        4,
        (
            # Synthetic-proxy job records (gateway/stores/pg_jobs.py): `record` is the job's state as the file
            # store's job.json holds it; `failure`, when set, is read over it (the file store's `failed` file).
            """CREATE TABLE synth_jobs (
                job_id    TEXT PRIMARY KEY,
                principal TEXT NOT NULL,
                status    TEXT NOT NULL,
                created   TEXT NOT NULL,
                record    TEXT NOT NULL,
                failure   TEXT
            )""",
            "CREATE INDEX synth_jobs_principal ON synth_jobs (principal, status)",
            "CREATE INDEX synth_jobs_created ON synth_jobs (created)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_ROW = "id, ts, principal, dataset, eps_units, delta_units, request_id, kind, rho_units"
_ALL_BY_REQUEST = (
    "SELECT id, principal, dataset, eps_units, delta_units, rho_units FROM ledger_charges "
    "WHERE request_id = %s AND ts >= %s AND kind <> 'reconcile' ORDER BY id"
)
_BY_REQUEST = (
    "SELECT id, principal, dataset, eps_units, delta_units, rho_units FROM ledger_charges "
    "WHERE request_id = %s AND ts >= %s AND kind <> 'reconcile' ORDER BY id LIMIT 1"
)
# A charge whose transaction fails with a lost connection is tried once more: if its COMMIT did reach the server
# (the answer was lost), the retry finds the charge under its request id, written since the first attempt began,
# instead of charging twice. (Only the retry looks: a request id used again for another charge is charged again.)
CHARGE_ATTEMPTS = 2
_SUMS = "SELECT principal, dataset, SUM(eps_units), SUM(delta_units), SUM(rho_units) FROM ledger_charges GROUP BY 1, 2"
_ADD_SPENT = """INSERT INTO ledger_spent (principal, dataset, eps_units, delta_units, rho_units)
    VALUES (%s, %s, %s, %s, %s)
    ON CONFLICT (principal, dataset) DO UPDATE SET
        eps_units = ledger_spent.eps_units + EXCLUDED.eps_units,
        delta_units = ledger_spent.delta_units + EXCLUDED.delta_units,
        rho_units = ledger_spent.rho_units + EXCLUDED.rho_units"""


class StoreNotMigrated(LedgerUnavailable):
    """The PostgreSQL store's schema is not the version this gateway needs."""

    code = "store_not_migrated"


def describe(conninfo: str) -> str:
    """The store as messages name it: database, user, host and port, never the password."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "a PostgreSQL store (its address does not parse)"
    host = params.get("host") or "localhost"
    port = params.get("port") or 5432
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{host}:{port}/{params.get('dbname') or ''}"


def _connect(conninfo: str) -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT)


def applied_versions(con: psycopg.Connection[Any]) -> set[int]:
    """The schema versions applied to the store (none: not a Bastion store yet)."""
    row = con.execute("SELECT to_regclass('bastion_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return set()
    return {int(r[0]) for r in con.execute("SELECT version FROM bastion_schema")}


def schema_version(con: psycopg.Connection[Any]) -> int:
    """The highest applied schema version (0: none, or not a Bastion store yet)."""
    return max(applied_versions(con), default=0)


def migrate(conninfo: str) -> tuple[int, int]:
    """Apply the missing schema versions in one transaction (idempotent; concurrent runs wait for each other).
    Returns the version before and after."""
    try:
        with _connect(conninfo) as con, con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_SCHEMA_LOCK,))
            con.execute(
                "CREATE TABLE IF NOT EXISTS bastion_schema (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            applied = applied_versions(con)
            before = max(applied, default=0)
            if before > SCHEMA_VERSION:
                raise StoreNotMigrated(_ahead(conninfo, before))
            for version, statements in MIGRATIONS:
                if version in applied:  # by number: a version numbered below one applied earlier is applied too
                    continue
                for statement in statements:
                    con.execute(statement)  # fixed DDL text of this module
                con.execute("INSERT INTO bastion_schema (version) VALUES (%s)", (version,))
            return before, SCHEMA_VERSION
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"the store {describe(conninfo)} cannot be migrated: {exc}") from exc


def _ahead(conninfo: str, version: int) -> str:
    return (
        f"the store {describe(conninfo)} has schema version {version}, newer than this gateway's "
        f"{SCHEMA_VERSION}: upgrade Bastion on this host"
    )


@contextlib.contextmanager
def borrow(pool: ConnectionPool[Any], what: str, doing: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of `pool` for one unit of work; a server that cannot be reached or fails the work makes it
    LedgerUnavailable (503, fail closed), saying that `what` cannot be `doing` ("read", "written")."""
    try:
        with pool.connection() as con:
            yield con
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"{what} cannot be {doing}: {exc}") from exc


def _pool(conninfo: str, name: str, max_size: int) -> ConnectionPool[Any]:
    """A pool on a store whose schema is the version this code needs (StoreNotMigrated if not; LedgerUnavailable,
    at once, if the server cannot be reached)."""
    try:
        with _connect(conninfo) as con:
            applied = applied_versions(con)
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"the store {describe(conninfo)} cannot be reached: {exc}") from exc
    version = max(applied, default=0)
    if version > SCHEMA_VERSION:
        raise StoreNotMigrated(_ahead(conninfo, version))
    missing = sorted({v for v, _ in MIGRATIONS} - applied)
    if missing:
        state = (
            f"has schema version {version} and this gateway needs {SCHEMA_VERSION}"
            if version < SCHEMA_VERSION
            else f"lacks schema version {', '.join(map(str, missing))}"
        )
        raise StoreNotMigrated(
            f"the store {describe(conninfo)} {state}: run 'bastion store migrate --store <the same address>' "
            "(or with BASTION_STORE set) once, then start the gateway again"
        )
    return ConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
        timeout=POOL_TIMEOUT,
        reconnect_timeout=RECONNECT_SECONDS,
        check=ConnectionPool.check_connection,
        name=name,
        open=True,
    )


def replayed(
    found: tuple[Any, ...] | None,
    request_id: str,
    principal: str,
    dataset: str,
    units: tuple[int, int, int],
    charged: PrivacyLoss,
    principal_spent: tuple[int, int, int],
    dataset_spent: tuple[int, int, int],
) -> Charge | None:
    """The retry of a charge whose first attempt's outcome is unknown (its connection was lost): `found` is the row
    (id, principal, dataset, ε, δ, ρ units) the ledger holds under `request_id` written since that first attempt
    began (None: none), read under the store's lock. The same charge is that charge, not a second one; a different
    one is refused, nothing charged. Spent totals already include it."""
    if found is None:
        return None
    row_id, p, d, e, dl, r = found
    if (str(p), str(d), (int(e), int(dl), int(r or 0))) != (principal, dataset, units):
        raise InvalidRequest(f"request id {request_id!r} was charged for another request; nothing was charged")
    ce, cd, cr = units
    pe, pd, pr = principal_spent
    te, td, tr = dataset_spent
    return Charge(
        cost=charged,
        principal_before=PrivacyLoss.from_units(pe - ce, pd - cd, pr - cr),
        principal_after=PrivacyLoss.from_units(pe, pd, pr),
        dataset_after=PrivacyLoss.from_units(te, td, tr),
        id=int(row_id),
    )


class PgLedger:
    """The budget ledger in PostgreSQL (same interface and guarantees as gateway.stores.ledger.Ledger)."""

    def __init__(self, conninfo: str, *, max_connections: int = 8) -> None:
        self.conninfo = conninfo
        self.location = describe(conninfo)
        self._pool = _pool(conninfo, "bastion-ledger", max_connections)
        # (pid, owner id, the connection holding its lock, when that connection was last seen alive)
        self._owner: tuple[int, str, psycopg.Connection[Any], float] | None = None
        self._owner_guard = threading.Lock()

    def _con(self, doing: str) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        return borrow(self._pool, f"the budget ledger ({self.location})", doing)

    # --- the owner lock -----------------------------------------------------------------------------------

    @staticmethod
    def _owner_key(owner: str) -> int:
        return int(owner[:8], 16) - 2**31  # an int4

    def owner(self) -> str:
        """This process's owner id, holding its advisory lock on a connection of its own from the first call on.

        The connection is checked at most once a second (a server restart ends it, and the lock with it): a lost
        one is replaced by a new owner id and lock, so later charges are again known to belong to a live process.
        """
        with self._owner_guard:
            if self._owner is not None and self._owner[0] == os.getpid():
                _, owner, con, checked = self._owner
                now = time.monotonic()
                if now - checked < OWNER_CHECK_SECONDS and not con.closed:
                    return owner
                try:
                    con.execute("SELECT 1")
                    self._owner = (os.getpid(), owner, con, now)
                    return owner
                except psycopg.Error:
                    with contextlib.suppress(psycopg.Error):
                        con.close()
            owner = uuid.uuid4().hex
            try:
                con = _connect(self.conninfo)
                con.execute("SELECT pg_advisory_lock(%s, %s)", (_OWNER_LOCK, self._owner_key(owner)))
            except psycopg.Error as exc:
                raise LedgerUnavailable(f"the budget ledger's owner lock cannot be taken: {exc}") from exc
            self._owner = (os.getpid(), owner, con, time.monotonic())
            return owner

    def _alive(self, owner: str | None) -> bool:
        """Whether the process that made a charge as `owner` still holds its lock (on any host)."""
        if owner is None or not _OWNER.fullmatch(owner):
            return False
        if self._owner is not None and self._owner[0] == os.getpid() and self._owner[1] == owner:
            return True
        key = (_OWNER_LOCK, self._owner_key(owner))
        with self._con("read") as con:
            row = con.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()
            if row and row[0]:
                con.execute("SELECT pg_advisory_unlock(%s, %s)", key)
                return False
        return True

    def close(self) -> None:
        """Release this process's owner lock (its pending charges, if any, then count as orphans) and the pool."""
        if self._owner is not None and self._owner[0] == os.getpid():
            with contextlib.suppress(psycopg.Error):
                self._owner[2].close()
        self._owner = None
        self._pool.close()

    # --- charging -----------------------------------------------------------------------------------------

    @staticmethod
    def _sum(con: psycopg.Connection[Any], where: str, args: tuple[str, ...]) -> tuple[int, int, int]:
        row = con.execute(
            "SELECT COALESCE(SUM(eps_units), 0), COALESCE(SUM(delta_units), 0), COALESCE(SUM(rho_units), 0) "
            f"FROM ledger_spent WHERE {where}",  # `where`: one of this module's fixed conditions
            args,
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

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
        """As `Ledger.charge`: the dataset's advisory lock makes the check and the record one step across hosts."""
        ce, cd = cost.units(round_up=True)
        charged = PrivacyLoss(cost.epsilon, cost.delta, Ledger.charged_rho(cost, accounting))
        cr = charged.rho_units(round_up=True)
        principal_caps = Ledger.caps(per_principal, accounting)
        dataset_caps = Ledger.caps(total, accounting)
        started = time.time()
        for attempt in range(1, CHARGE_ATTEMPTS + 1):
            try:
                return self._charge_once(
                    None if attempt == 1 else started,
                    principal,
                    dataset,
                    cost,
                    (ce, cd, cr),
                    charged,
                    principal_caps,
                    dataset_caps,
                    request_id,
                    kind,
                    accounting,
                    periods,
                )
            except LedgerUnavailable as exc:
                # Only a connection lost during the work is tried again; a server that cannot be reached at all
                # (the pool's wait ran out) answers 503 at once.
                cause = exc.__cause__
                lost = isinstance(cause, psycopg.OperationalError) and not isinstance(cause, PoolTimeout)
                if attempt == CHARGE_ATTEMPTS or not lost:
                    raise
        raise AssertionError("unreachable")

    def _charge_once(
        self,
        retry_since: float | None,
        principal: str,
        dataset: str,
        cost: PrivacyLoss,
        units: tuple[int, int, int],
        charged: PrivacyLoss,
        principal_caps: tuple[int, int, int | None],
        dataset_caps: tuple[int, int, int | None],
        request_id: str,
        kind: str,
        accounting: Accounting,
        periods: Sequence[str] = (),
    ) -> Charge:
        ce, cd, cr = units
        other = Accounting.PURE if accounting is Accounting.ZCDP else Accounting.ZCDP
        owner = self.owner()
        keys = budget_keys(dataset, periods)
        ids: list[int] = []
        worst: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
        with self._con("written") as con, con.transaction():
            # One lock per budget key, always in sorted order: two multi-period charges cannot deadlock.
            for key in keys:
                con.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_DATASET_LOCK, key))
            if retry_since is not None and periods:
                rows = con.execute(_ALL_BY_REQUEST, (request_id, retry_since)).fetchall()
                if rows:
                    got = sorted((str(r[1]), str(r[2]), (int(r[3]), int(r[4]), int(r[5] or 0))) for r in rows)
                    if got != [(principal, key, units) for key in keys]:
                        raise InvalidRequest(
                            f"request id {request_id!r} was charged for another request; nothing was charged"
                        )
                    spent = max(self._sum(con, "principal = %s AND dataset = %s", (principal, k)) for k in keys)
                    total_spent = max(self._sum(con, "dataset = %s", (k,)) for k in keys)
                    before = (spent[0] - ce, spent[1] - cd, spent[2] - cr)
                    return period_charge(
                        charged,
                        units,
                        (before, (total_spent[0] - ce, total_spent[1] - cd, total_spent[2] - cr)),
                        [int(r[0]) for r in rows],
                        (),
                        periods,
                    )
            for key in keys:
                pe, pd, pr = self._sum(con, "principal = %s AND dataset = %s", (principal, key))
                te, td, tr = self._sum(con, "dataset = %s", (key,))
                if retry_since is not None and not periods:
                    found = con.execute(_BY_REQUEST, (request_id, retry_since)).fetchone()
                    again = replayed(found, request_id, principal, dataset, units, charged, (pe, pd, pr), (te, td, tr))
                    if again is not None:
                        return again
                if con.execute(
                    "SELECT 1 FROM ledger_charges WHERE dataset = %s AND accounting = %s LIMIT 1", (key, other.value)
                ).fetchone():
                    raise BudgetExhausted(
                        f"the spend on dataset {dataset!r} was accounted as {other.value}, and its policy now says "
                        f"{accounting.value}: spend under one accounting cannot go on under the other "
                        "(register the data as a new dataset to start a new budget)",
                        scope="dataset",
                    )
                admit(
                    key if periods else dataset, cost, units, (pe, pd, pr), (te, td, tr), principal_caps, dataset_caps
                )
                if worst is None or (pe, pd, pr) > worst[0]:
                    worst = ((pe, pd, pr), (te, td, tr))
            if ce or cd or cr:
                for key in keys:
                    row = con.execute(
                        "INSERT INTO ledger_charges (ts, principal, dataset, eps_units, delta_units, request_id, kind, "
                        "audited, owner, rho_units, accounting) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                        "RETURNING id",
                        (time.time(), principal, key, ce, cd, request_id, kind, PENDING, owner, cr, accounting.value),
                    ).fetchone()
                    assert row is not None
                    ids.append(int(row[0]))
                    con.execute(_ADD_SPENT, (principal, key, ce, cd, cr))
            claimed = self._claim(con, owner, "audited = %s", (UNRECORDED,))
        assert worst is not None
        return period_charge(charged, units, worst, ids, claimed, periods)

    @staticmethod
    def _claim(
        con: psycopg.Connection[Any], owner: str, where: str, args: tuple[object, ...]
    ) -> tuple[LedgerCharge, ...]:
        # Two claimers never both get a row: the second UPDATE waits for the first's row locks, then re-checks
        # `where` against the committed row and skips it.
        rows = con.execute(
            f"UPDATE ledger_charges SET audited = %s, owner = %s WHERE {where} RETURNING {_ROW}",
            (PENDING, owner, *args),
        ).fetchall()
        return tuple(sorted((LedgerCharge.of(r) for r in rows), key=lambda c: c.id or 0))

    # --- audit state --------------------------------------------------------------------------------------

    def _set_state(self, ids: Iterable[int | None], state: int, only: int | None = None, *, sync: bool = True) -> None:
        known = [int(i) for i in ids if i is not None]
        if not known:
            return
        with self._con("written") as con, con.transaction():
            if not sync:
                con.execute("SET LOCAL synchronous_commit TO OFF")
            if only is None:
                con.execute("UPDATE ledger_charges SET audited = %s WHERE id = ANY(%s)", (state, known))
            else:
                con.execute(
                    "UPDATE ledger_charges SET audited = %s WHERE id = ANY(%s) AND audited = %s", (state, known, only)
                )

    def mark_audited(self, ids: Iterable[int | None]) -> None:
        """As on SQLite, committed without waiting for the disk: a mark lost in a crash leaves the charge pending,
        and the start-up check then finds its record in the log and marks it again."""
        self._set_state(ids, AUDITED, sync=False)

    def mark_unrecorded(self, ids: Iterable[int | None]) -> None:
        self._set_state(ids, UNRECORDED, only=PENDING)

    def claim_unrecorded(self) -> tuple[LedgerCharge, ...]:
        return self._claim_where("audited = %s", (UNRECORDED,))

    def claim_stale(self) -> tuple[LedgerCharge, ...]:
        """Take over every unrecorded charge and every pending charge whose process is gone (start-up)."""
        with self._con("read") as con:
            owners = [
                r[0] for r in con.execute("SELECT DISTINCT owner FROM ledger_charges WHERE audited = %s", (PENDING,))
            ]
        dead = [o for o in owners if not self._alive(o)]
        claimed = list(self.claim_unrecorded())
        for o in dead:
            if o is None:
                claimed += self._claim_where("audited = %s AND owner IS NULL", (PENDING,))
            else:
                claimed += self._claim_where("audited = %s AND owner = %s", (PENDING, o))
        return tuple(sorted(claimed, key=lambda c: c.id or 0))

    def _claim_where(self, where: str, args: tuple[object, ...]) -> tuple[LedgerCharge, ...]:
        owner = self.owner()
        with self._con("written") as con, con.transaction():
            return self._claim(con, owner, where, args)

    # --- consistency with the audit log -------------------------------------------------------------------

    def totals(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """Spent units (ε, δ, ρ) per (principal, dataset), summed over the charges themselves."""
        with self._con("read") as con:
            rows = con.execute(_SUMS).fetchall()
        return {(str(p), str(d)): (int(e), int(dl), int(r)) for p, d, e, dl, r in rows}

    def recharge(
        self, charges: Iterable[LedgerCharge], expected: Mapping[tuple[str, str], tuple[int, int, int]]
    ) -> list[LedgerCharge]:
        """As `Ledger.recharge`, holding the advisory lock of every dataset it charges (in one order)."""
        charges = list(charges)
        with self._con("written") as con, con.transaction():
            for dataset in sorted({c.dataset for c in charges} | {d for _, d in expected}):
                con.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_DATASET_LOCK, dataset))
            return recharge_in(
                charges,
                expected,
                held={
                    (str(r[0]), str(r[1]))
                    for r in con.execute("SELECT DISTINCT request_id, dataset FROM ledger_charges")
                },
                zcdp={
                    str(r[0])
                    for r in con.execute(
                        "SELECT DISTINCT dataset FROM ledger_charges WHERE accounting = %s", (Accounting.ZCDP.value,)
                    )
                },
                insert=lambda c, zcdp: self._insert(con, c, zcdp),
                sums=lambda: {(str(p), str(d)): (int(e), int(dl), int(r)) for p, d, e, dl, r in con.execute(_SUMS)},
            )

    @staticmethod
    def _insert(con: psycopg.Connection[Any], c: LedgerCharge, zcdp: bool) -> LedgerCharge:
        accounting = Accounting.ZCDP if zcdp else Accounting.PURE
        row = con.execute(
            "INSERT INTO ledger_charges (ts, principal, dataset, eps_units, delta_units, request_id, kind, audited, "
            "rho_units, accounting) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
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
        ).fetchone()
        assert row is not None
        con.execute(_ADD_SPENT, (c.principal, c.dataset, c.eps_units, c.delta_units, c.rho_units))
        return LedgerCharge(
            int(row[0]), c.ts, c.principal, c.dataset, c.eps_units, c.delta_units, c.request_id, c.kind, c.rho_units
        )

    # --- reading ------------------------------------------------------------------------------------------

    def spent(self, principal: str, dataset: str) -> PrivacyLoss:
        with self._con("read") as con:
            return PrivacyLoss.from_units(*self._sum(con, "principal = %s AND dataset = %s", (principal, dataset)))

    def spent_total(self, dataset: str) -> PrivacyLoss:
        with self._con("read") as con:
            return PrivacyLoss.from_units(*self._sum(con, "dataset = %s", (dataset,)))

    def history(self, dataset: str | None = None) -> list[dict[str, object]]:
        """Every charge in order (for the auditor's privacy-spend report)."""
        columns = "ts, principal, dataset, eps_units, delta_units, request_id, kind, audited, rho_units, accounting"
        with self._con("read") as con:
            if dataset is None:
                rows = con.execute(f"SELECT {columns} FROM ledger_charges ORDER BY id").fetchall()
            else:
                # Of the dataset, with the rows of each of its periods (keys `dataset@period`).
                rows = con.execute(
                    f"SELECT {columns} FROM ledger_charges WHERE dataset = %s OR left(dataset, %s) = %s ORDER BY id",
                    (dataset, len(dataset) + 1, dataset + PERIOD_SEPARATOR),
                ).fetchall()
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


class PgReleaseCache:
    """Released answers per principal in PostgreSQL (same interface as gateway.stores.cache.ReleaseCache)."""

    def __init__(self, conninfo: str, *, max_connections: int = 4) -> None:
        self.location = describe(conninfo)
        self._pool = _pool(conninfo, "bastion-cache", max_connections)

    def get(self, key: str) -> dict[str, Any] | None:
        # Fail closed: without the cache a repeat cannot be told from a new request.
        with borrow(self._pool, f"the release cache ({self.location})", "read") as con:
            row = con.execute("SELECT response FROM release_cache WHERE key = %s", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, principal: str, response: dict[str, Any]) -> None:
        # The first stored answer wins, so concurrent identical requests converge on one released answer.
        with self._pool.connection() as con:
            con.execute(
                "INSERT INTO release_cache (key, principal, created, response) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (key) DO NOTHING",
                (key, principal, time.time(), json.dumps(response)),
            )

    def close(self) -> None:
        self._pool.close()
