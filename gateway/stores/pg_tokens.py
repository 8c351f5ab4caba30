"""Bearer tokens in the PostgreSQL store, shared by gateway replicas on several hosts.

The same table and semantics as `SqliteTokenStore` (gateway/stores/tokens.py): only the SHA-256 hash of each
secret is stored; each method is one statement, `rotate` one transaction; a token's state is read on every
request, never cached, so a token revoked through any replica is refused by all of them at once. The table is
created by schema version 2 (`bastion store migrate`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg

from gateway.stores.pg import _pool, borrow, describe
from gateway.stores.tokens import (
    COLUMNS,
    PREFIX,
    Principal,
    Record,
    TokenChecks,
    TokenRecord,
    _hash,
    _new_secret,
    _new_token,
    _revoked,
    _rotatable,
)
from policies.errors import LedgerUnavailable

_NAME_LOCK = 0x42A50010  # advisory lock class of token names (beside pg.py's ledger locks)


class PgTokenStore(TokenChecks):
    """Tokens in the PostgreSQL store (a pool of its own). A server that cannot be reached makes a request 503
    `ledger_unavailable`, never a pass; a last-used write that fails is logged and tried again on the next use."""

    def __init__(self, conninfo: str, *, clock: Callable[[], float] = time.time, max_connections: int = 4) -> None:
        self.location = describe(conninfo)
        self.clock = clock
        self._touched = {}
        self._write_errors = (LedgerUnavailable,)
        self._pool = _pool(conninfo, "bastion-tokens", max_connections)

    def close(self) -> None:
        self._pool.close()

    def _con(self, doing: str) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        return borrow(self._pool, f"the token store ({self.location})", doing)

    def _create_checked(
        self,
        name: str,
        role: str,
        expires_in: float | None,
        check: Callable[[list[TokenRecord]], None],
        record: Record | None,
    ) -> tuple[str, Principal]:
        token_id, secret, now, expires = _new_token(self.clock, expires_in)
        with self._con("written") as con, con.transaction():
            # One name (in any case) at a time across every host: a second check waits for the first's insert.
            con.execute("SELECT pg_advisory_xact_lock(%s, hashtext(lower(%s)))", (_NAME_LOCK, name))
            rows = con.execute(
                f"SELECT {COLUMNS} FROM tokens WHERE lower(name) = lower(%s) ORDER BY created", (name,)
            ).fetchall()
            check([TokenRecord(*row) for row in rows])
            con.execute(
                "INSERT INTO tokens (token_id, name, role, hash, created, expires) VALUES (%s, %s, %s, %s, %s, %s)",
                (token_id, name, role, _hash(secret), now, expires),
            )
            if record is not None:
                record(TokenRecord(token_id, name, role, now, expires))
        return f"{PREFIX}_{token_id}_{secret}", Principal(name, role, token_id)

    def get(self, token_id: str) -> TokenRecord | None:
        with self._con("read") as con:
            row = con.execute(f"SELECT {COLUMNS} FROM tokens WHERE token_id = %s", (token_id,)).fetchone()
        return TokenRecord.of(row)

    def get_by_hash(self, secret_hash: str) -> TokenRecord | None:
        with self._con("read") as con:
            row = con.execute(f"SELECT {COLUMNS} FROM tokens WHERE hash = %s", (secret_hash,)).fetchone()
        return TokenRecord.of(row)

    def _with_hash(self, token_id: str) -> tuple[TokenRecord, str] | None:
        with self._con("read") as con:
            row = con.execute(f"SELECT {COLUMNS}, hash FROM tokens WHERE token_id = %s", (token_id,)).fetchone()
        return None if row is None else (TokenRecord(*row[:-1]), str(row[-1]))

    def _in_use(self, name: str) -> list[TokenRecord]:
        with self._con("read") as con:
            rows = con.execute(
                f"SELECT {COLUMNS} FROM tokens WHERE name = %s AND revoked IS NULL ORDER BY created, token_id",
                (name,),
            ).fetchall()
        return [TokenRecord(*row) for row in rows]

    def revoke(self, token_id: str, *, record: Record | None = None) -> TokenRecord:
        # One statement (a second revocation keeps the first time), and the record before it commits.
        with self._con("written") as con, con.transaction():
            row = con.execute(
                f"UPDATE tokens SET revoked = COALESCE(revoked, %s) WHERE token_id = %s RETURNING {COLUMNS}",
                (self.clock(), token_id),
            ).fetchone()
            revoked = _revoked(TokenRecord.of(row), token_id)
            if record is not None:
                record(revoked)
        return revoked

    def rotate(self, token_id: str, *, record: Record | None = None) -> tuple[str, TokenRecord, Principal]:
        new_id, secret = _new_secret()
        now = self.clock()
        with self._con("written") as con, con.transaction():
            # FOR UPDATE: of two rotations of one token, the second waits, then finds it revoked.
            row = con.execute(f"SELECT {COLUMNS} FROM tokens WHERE token_id = %s FOR UPDATE", (token_id,)).fetchone()
            old = _rotatable(TokenRecord.of(row), token_id, now)
            con.execute(
                "INSERT INTO tokens (token_id, name, role, hash, created, expires) VALUES (%s, %s, %s, %s, %s, %s)",
                (new_id, old.name, old.role, _hash(secret), now, old.expires),
            )
            con.execute("UPDATE tokens SET revoked = %s, replaced_by = %s WHERE token_id = %s", (now, new_id, token_id))
            if record is not None:
                record(replace(old, revoked=now, replaced_by=new_id))
        return f"{PREFIX}_{new_id}_{secret}", old, Principal(old.name, old.role, new_id)

    def touch(self, token_id: str, when: float) -> None:
        with self._con("written") as con:
            con.execute(
                "UPDATE tokens SET last_used = %s WHERE token_id = %s AND (last_used IS NULL OR last_used < %s)",
                (when, token_id, when),
            )

    def list(self) -> list[TokenRecord]:
        with self._con("read") as con:
            rows = con.execute(f"SELECT {COLUMNS} FROM tokens ORDER BY created, token_id").fetchall()
        return [TokenRecord(*row) for row in rows]
