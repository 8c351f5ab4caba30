"""Bearer tokens: created on the gateway host, stored only as SHA-256 hashes, compared in constant time.

`TokenStore` is the interface every implementation keeps (each method is one statement or one short transaction
of a relational store); `TokenChecks` is what they share above their statements. `SqliteTokenStore` is the
embedded one, a SQLite file beside the workspace's other stores, shared by every gateway process of the workspace;
`PgTokenStore` (gateway/stores/pg_tokens.py) keeps the same table in the PostgreSQL store, shared by replicas on
several hosts. A token's state (revoked, expired, rotated) is read from the store on every request, never
cached, so a revocation made by one process is refused by all of them at once. Only the last-used time is written
lazily: at most once per `TOUCH_SECONDS` per token and process.

A token is `bst_<id>_<secret>`. Only the id (8 hex digits, not secret) ever appears in the audit log, the list
or an error; the secret is printed once, at creation or rotation, and its hash is stored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from policies.errors import InvalidRequest, NotFound, Unauthorized

ROLES = ("analyst", "lf_author", "auditor", "admin")
PREFIX = "bst"
ANONYMOUS_NAME = "anonymous"  # the principal of a request without a valid token; no token may take the name
# Names no token may take, compared without regard to case: the principal of requests without a valid token, and
# the gateway's own (the actor of system records).
RESERVED_NAMES = frozenset({ANONYMOUS_NAME, "bastion"})
# ASCII letters and digits, with '.', '-', '_' inside: no Unicode look-alike of another name, no trailing mark.
NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")
MAX_LIFETIME_DAYS = 36_500  # the longest expiry a token may be given
TOUCH_SECONDS = 60.0  # a token's last-used time is written at most this often per gateway process
DURATION = re.compile(r"(\d+)([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    token_id: str

    def as_actor(self) -> dict[str, str]:
        return {"principal": self.name, "role": self.role, "token_id": self.token_id}


@dataclass(frozen=True)
class TokenRecord:
    """A stored token, without anything from which its secret could be recovered or a token forged."""

    token_id: str
    name: str
    role: str
    created: float  # POSIX seconds
    expires: float | None = None
    revoked: float | None = None
    last_used: float | None = None
    replaced_by: str | None = None  # the token id a rotation issued in its place

    @classmethod
    def of(cls, row: tuple[object, ...] | Sequence[Any] | None) -> TokenRecord | None:
        """The record of a row selected as `COLUMNS` (None for no row)."""
        return None if row is None else cls(*row)

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.role, self.token_id)

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "rotated" if self.replaced_by else "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def public(self) -> dict[str, str | None]:
        """The record as text for listings (times in ISO 8601 UTC)."""
        return {
            "token_id": self.token_id,
            "name": self.name,
            "role": self.role,
            "created": iso(self.created),
            "expires": iso(self.expires),
            "last_used": iso(self.last_used),
            "revoked": iso(self.revoked),
            "replaced_by": self.replaced_by,
        }


class TokenRefused(Unauthorized):
    """A token whose secret is right but which no longer works (revoked, rotated or expired): a 401 like any bad
    token, recorded with the token's principal and id so the refusal can be traced."""

    def __init__(self, message: str, principal: Principal, reason: str) -> None:
        super().__init__(message)
        self.principal = principal
        self.reason = reason


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def parse_duration(text: str) -> float:
    """Seconds of a duration such as `90s`, `15m`, `12h`, `30d` (a positive whole number and one unit, at most
    `MAX_LIFETIME_DAYS` days: a time every store and client can represent)."""
    match = DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise InvalidRequest(f"invalid duration {text!r}: a positive whole number and a unit s, m, h or d, e.g. 30d")
    seconds = int(match.group(1)) * UNITS[match.group(2)]
    if seconds > MAX_LIFETIME_DAYS * UNITS["d"]:
        raise InvalidRequest(f"duration {text!r} is too long: at most {MAX_LIFETIME_DAYS}d (100 years)")
    return float(seconds)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_new(name: str, role: str) -> None:
    if role not in ROLES:
        raise InvalidRequest(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not NAME.fullmatch(name):
        raise InvalidRequest(
            "a principal name is 1 to 64 ASCII letters, digits, '-', '_' or '.', starting and ending with a letter "
            "or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise InvalidRequest(
            f"{name!r} is reserved: the audit log records requests without a token as {ANONYMOUS_NAME!r} and the "
            "gateway's own records as 'bastion'"
        )


def _may_take(name: str, role: str, same: list[TokenRecord], add: bool) -> None:
    """Refuse to create a token for `name` given the tokens `same` whose names equal it without regard to case."""
    other = sorted({r.name for r in same} - {name})
    if other:
        raise InvalidRequest(
            f"principal name {name!r} differs from {', '.join(map(repr, other))} only in case: choose another name"
        )
    in_use = [r for r in same if r.revoked is None]
    roles = {r.role for r in in_use}
    if roles - {role}:
        raise InvalidRequest(
            f"principal {name!r} has tokens in use with role {', '.join(sorted(roles))}; a principal has one "
            "role: revoke its tokens first ('bastion token revoke'), or choose another name"
        )
    if in_use and not add:
        ids = ", ".join(r.token_id for r in in_use)
        raise InvalidRequest(
            f"principal {name!r} already has {len(in_use)} token(s) in use ({ids}), which share one budget, "
            "its cached answers and jobs: pass --add to give it another token, 'bastion token rotate' to replace "
            "one, or choose another name"
        )


def _rotatable(old: TokenRecord | None, token_id: str, now: float) -> TokenRecord:
    """The token to rotate, if it may be: it exists, is not revoked and has not expired (a rotation keeps the expiry,
    so rotating an expired token would issue one that is dead on arrival)."""
    if old is None:
        raise NotFound(f"no token {token_id!r}")
    state = old.state(now)
    if state != "active":
        advice = f": create a new one with 'bastion token create --name {old.name} --role {old.role} --add'"
        message = f"token {token_id} is {state}; only an active token is rotated"
        raise InvalidRequest(message + advice * (state == "expired"))
    return old


def _revoked(row: TokenRecord | None, token_id: str) -> TokenRecord:
    """The token a revocation leaves (NotFound if there is none)."""
    if row is None:
        raise NotFound(f"no token {token_id!r}")
    return row


def _new_secret() -> tuple[str, str]:
    return secrets.token_hex(4), secrets.token_urlsafe(32)


def _new_token(clock: Callable[[], float], expires_in: float | None) -> tuple[str, str, float, float | None]:
    """A new token's id, secret, creation time and expiry (None: none)."""
    token_id, secret = _new_secret()
    now = clock()
    return token_id, secret, now, (now + expires_in if expires_in is not None else None)


Record = Callable[[TokenRecord], None]
"""Called by an administrator's token change inside its transaction, after the change's checks and before it
commits, with the token as it will be: the audit log's record of the change is written there. If it raises, the
change is rolled back and never takes effect; so a change is never made without its record (a record without its
change is left only if the store fails at the commit itself, and `token list` shows what holds)."""


class TokenStore(Protocol):
    """What the gateway needs of a token store. Every method maps onto one SQL statement (or, for `rotate`, one
    transaction of two), so an implementation on a shared database keeps the same semantics."""

    def create(self, name: str, role: str, expires_in: float | None = None) -> tuple[str, Principal]:
        """INSERT a new token; the full token is returned once and never stored."""
        ...

    def get(self, token_id: str) -> TokenRecord | None:
        """SELECT one token by id."""
        ...

    def get_by_hash(self, secret_hash: str) -> TokenRecord | None:
        """SELECT one token by the hash of its secret."""
        ...

    def revoke(self, token_id: str, *, record: Record | None = None) -> TokenRecord:
        """UPDATE the token as revoked now (NotFound if unknown; revoking twice keeps the first time). `record` is
        called with the revoked token in the same transaction, before it commits (see `Record`)."""
        ...

    def rotate(self, token_id: str, *, record: Record | None = None) -> tuple[str, TokenRecord, Principal]:
        """One transaction: INSERT a new token for the same principal, role and expiry, and UPDATE the old one as
        revoked and replaced by it. Returns the new full token, the old record and the new principal. `record` is
        called with the old token (as revoked, `replaced_by` the new id) before the transaction commits."""
        ...

    def touch(self, token_id: str, when: float) -> None:
        """UPDATE the last-used time (only forward)."""
        ...

    def list(self) -> list[TokenRecord]:
        """SELECT every token, oldest first."""
        ...

    def authenticate(self, token: str | None) -> Principal:
        """The principal of a working token, else Unauthorized (TokenRefused for a right secret that no longer
        works)."""
        ...

    def active(self, token_id: str) -> Principal:
        """The principal of token `token_id` if it still works (for sessions opened with it), else Unauthorized."""
        ...

    def issue(
        self,
        name: str,
        role: str,
        expires_in: float | None = None,
        *,
        add: bool = False,
        record: Record | None = None,
    ) -> tuple[str, Principal]:
        """`create` for an administrator: refuses a second role for a name, and a name in use unless `add`.
        `record` is called with the new token in the same transaction, before it commits (see `Record`)."""
        ...

    def find(self, name_or_id: str) -> TokenRecord:
        """The token with this id, else the one token of this principal that is not revoked (NotFound/ambiguous)."""
        ...

    def close(self) -> None: ...


class TokenChecks(ABC):
    """What every token store does the same way on top of its statements: parse and check a presented token
    (compared in constant time), refuse one that no longer works, find a token by id or principal, and write the
    last-used time lazily. A subclass gives the statements."""

    clock: Callable[[], float]
    _touched: dict[str, float]  # token id → when this process last wrote its last-used time
    _write_errors: tuple[type[Exception], ...]  # a failed last-used write of these kinds never fails a request

    @abstractmethod
    def get(self, token_id: str) -> TokenRecord | None: ...

    @abstractmethod
    def touch(self, token_id: str, when: float) -> None: ...

    @abstractmethod
    def _with_hash(self, token_id: str) -> tuple[TokenRecord, str] | None:
        """SELECT one token by id with the stored hash of its secret."""

    @abstractmethod
    def _in_use(self, name: str) -> list[TokenRecord]:
        """SELECT the tokens of principal `name` that are not revoked, oldest first."""

    def create(self, name: str, role: str, expires_in: float | None = None) -> tuple[str, Principal]:
        _check_new(name, role)
        return self._create_checked(name, role, expires_in, lambda same: None, None)

    def issue(
        self,
        name: str,
        role: str,
        expires_in: float | None = None,
        *,
        add: bool = False,
        record: Record | None = None,
    ) -> tuple[str, Principal]:
        """Create a token for an administrator: a principal has one role, and every token of a name shares its
        budget, cached answers and jobs, so a name whose tokens are in use is taken only on purpose (`add`), never
        with another role, and never a name that differs from another principal's only in case. The check and the
        insert are one transaction (`_create_checked`), so two concurrent runs cannot both pass it."""
        _check_new(name, role)
        return self._create_checked(name, role, expires_in, lambda same: _may_take(name, role, same, add), record)

    @abstractmethod
    def _create_checked(
        self,
        name: str,
        role: str,
        expires_in: float | None,
        check: Callable[[list[TokenRecord]], None],
        record: Record | None,
    ) -> tuple[str, Principal]:
        """In one transaction that serialises with every other: SELECT the tokens whose name equals `name` without
        regard to case, call `check` on them (it raises to refuse), INSERT the new token as `create` does, and call
        `record` on it before committing."""

    def find(self, name_or_id: str) -> TokenRecord:
        record = self.get(name_or_id)
        if record is not None:
            return record
        records = self._in_use(name_or_id)
        if not records:
            raise NotFound(f"no token with id {name_or_id!r} and no token of principal {name_or_id!r} in use")
        if len(records) > 1:
            ids = ", ".join(r.token_id for r in records)
            raise InvalidRequest(f"principal {name_or_id!r} has {len(records)} tokens ({ids}); name one by its id")
        return records[0]

    def _working(self, record: TokenRecord) -> Principal:
        now = self.clock()
        state = record.state(now)
        if state != "active":
            raise TokenRefused(f"token {record.token_id} is {state}", record.principal, f"token_{state}")
        self._note_use(record.token_id, now)
        return record.principal

    def _note_use(self, token_id: str, now: float) -> None:
        """Write the last-used time if this process has not written it for `TOUCH_SECONDS` (never fails a
        request: a failed write is tried again on the next use)."""
        last = self._touched.get(token_id)
        if last is not None and now - last < TOUCH_SECONDS:
            return
        self._touched[token_id] = now
        try:
            self.touch(token_id, now)
        except self._write_errors as exc:
            self._touched.pop(token_id, None)
            log.warning("last-used time of token %s not written: %s", token_id, exc)

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            raise Unauthorized("invalid token")
        _, token_id, secret = parts
        found = self._with_hash(token_id)
        record, stored = found if found is not None else (None, None)
        # Compare against a dummy hash when the id is unknown, so timing does not tell ids apart.
        if not hmac.compare_digest(stored or _hash(""), _hash(secret)) or record is None:
            raise Unauthorized("invalid token")
        return self._working(record)

    def active(self, token_id: str) -> Principal:
        record = self.get(token_id)
        if record is None:
            raise Unauthorized("invalid token")
        return self._working(record)


SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    last_used REAL,
    replaced_by TEXT
);
CREATE INDEX IF NOT EXISTS tokens_name ON tokens (name);
"""
COLUMNS = "token_id, name, role, created, expires, revoked, last_used, replaced_by"


class SqliteTokenStore(TokenChecks):
    """Tokens in a SQLite file (WAL, so readers in other processes never wait for a writer). An older workspace's
    `tokens.json` is imported on first open, each token with its hash, name, role and creation time (the JSON file
    is then renamed `tokens.json.migrated`, kept for the record)."""

    def __init__(self, path: str | Path, *, legacy: str | Path | None = None, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.legacy = Path(legacy) if legacy is not None else None
        self.clock = clock
        self._write_errors = (sqlite3.Error,)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        if fresh:
            os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._touched = {}
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        if self.legacy is not None and self.legacy.exists():
            self._migrate(self.legacy)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self, legacy: Path) -> None:
        """Import a tokens.json in one transaction; INSERT OR IGNORE makes a repeat (a crash before the rename,
        two processes opening at once) change nothing."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if legacy.exists():
                    entries = json.loads(legacy.read_text() or "{}")
                    for token_id, entry in entries.items():
                        created = dt.datetime.fromisoformat(entry["created"]).timestamp()
                        self._db.execute(
                            "INSERT OR IGNORE INTO tokens (token_id, name, role, hash, created) VALUES (?, ?, ?, ?, ?)",
                            (token_id, entry["name"], entry["role"], entry["hash"], created),
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            with contextlib.suppress(FileNotFoundError):  # another process imported and renamed it meanwhile
                os.replace(legacy, legacy.with_name(legacy.name + ".migrated"))

    def _one(self, where: str, value: str) -> TokenRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {COLUMNS} FROM tokens WHERE {where} = ?", (value,)).fetchone()
        return TokenRecord.of(row)

    def _with_hash(self, token_id: str) -> tuple[TokenRecord, str] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {COLUMNS}, hash FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
        return None if row is None else (TokenRecord(*row[:-1]), str(row[-1]))

    def _in_use(self, name: str) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM tokens WHERE name = ? AND revoked IS NULL ORDER BY created", (name,)
            ).fetchall()
        return [TokenRecord(*row) for row in rows]

    def _create_checked(
        self,
        name: str,
        role: str,
        expires_in: float | None,
        check: Callable[[list[TokenRecord]], None],
        record: Record | None,
    ) -> tuple[str, Principal]:
        token_id, secret, now, expires = _new_token(self.clock, expires_in)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock first: another process's check waits for this one
            try:
                rows = self._db.execute(
                    f"SELECT {COLUMNS} FROM tokens WHERE lower(name) = lower(?) ORDER BY created", (name,)
                ).fetchall()
                check([TokenRecord(*row) for row in rows])
                self._db.execute(
                    "INSERT INTO tokens (token_id, name, role, hash, created, expires) VALUES (?, ?, ?, ?, ?, ?)",
                    (token_id, name, role, _hash(secret), now, expires),
                )
                if record is not None:
                    record(TokenRecord(token_id, name, role, now, expires))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return f"{PREFIX}_{token_id}_{secret}", Principal(name, role, token_id)

    def get(self, token_id: str) -> TokenRecord | None:
        return self._one("token_id", token_id)

    def get_by_hash(self, secret_hash: str) -> TokenRecord | None:
        return self._one("hash", secret_hash)

    def revoke(self, token_id: str, *, record: Record | None = None) -> TokenRecord:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE tokens SET revoked = ? WHERE token_id = ? AND revoked IS NULL", (self.clock(), token_id)
                )
                row = self._db.execute(f"SELECT {COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
                revoked = _revoked(TokenRecord.of(row), token_id)
                if record is not None:
                    record(revoked)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return revoked

    def rotate(self, token_id: str, *, record: Record | None = None) -> tuple[str, TokenRecord, Principal]:
        new_id, secret = _new_secret()
        now = self.clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT {COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
                old = _rotatable(TokenRecord.of(row), token_id, now)
                self._db.execute(
                    "INSERT INTO tokens (token_id, name, role, hash, created, expires) VALUES (?, ?, ?, ?, ?, ?)",
                    (new_id, old.name, old.role, _hash(secret), now, old.expires),
                )
                self._db.execute(
                    "UPDATE tokens SET revoked = ?, replaced_by = ? WHERE token_id = ?", (now, new_id, token_id)
                )
                if record is not None:
                    record(replace(old, revoked=now, replaced_by=new_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return f"{PREFIX}_{new_id}_{secret}", old, Principal(old.name, old.role, new_id)

    def touch(self, token_id: str, when: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE tokens SET last_used = ? WHERE token_id = ? AND (last_used IS NULL OR last_used < ?)",
                (when, token_id, when),
            )

    def list(self) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM tokens ORDER BY created, token_id").fetchall()
        return [TokenRecord(*row) for row in rows]


def open_tokens(json_path: str | Path, *, clock: Callable[[], float] = time.time) -> SqliteTokenStore:
    """The workspace's token store: `tokens.sqlite` beside `json_path` (the workspace's `tokens.json`, imported
    on first open if present)."""
    json_path = Path(json_path)
    return SqliteTokenStore(json_path.with_name("tokens.sqlite"), legacy=json_path, clock=clock)
