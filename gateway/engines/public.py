"""Public computations: an empty in-memory DuckDB for values that are public or already released (post-processing
of a DP release, the values of a key expression over a declared domain). It never opens private data, whatever the
engine that holds the private rows."""

from __future__ import annotations

import os
import threading
from typing import Any

import duckdb
from sqlglot import exp

_scratch_lock = threading.Lock()
_scratch_dbs: dict[int, duckdb.DuckDBPyConnection] = {}


def scratch() -> duckdb.DuckDBPyConnection:
    """A cursor on an empty in-memory DuckDB, never the private database, for computing over public or released
    values. Opening a database costs ~20 ms, so each process keeps one and hands out cursors: a cursor is its own
    connection, so the views that concurrent requests register there do not meet. Close the cursor after use."""
    with _scratch_lock:
        db = _scratch_dbs.get(os.getpid())  # per process: a forked child must not share its parent's database
        if db is None:
            db = _scratch_dbs[os.getpid()] = duckdb.connect(":memory:")
        return db.cursor()


class PublicError(Exception):
    """A computation over public or released values failed (its message names the expression's problem)."""


def public_rows(query: exp.Query, tables: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run `query` on the public engine, with `tables` (name → pandas frame or Arrow table of released or public
    values) readable by name."""
    cur = scratch()
    try:
        for name, table in (tables or {}).items():
            cur.register(name, table)
        return cur.execute(query.sql(dialect="duckdb")).fetchall()
    except duckdb.Error as exc:
        raise PublicError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    finally:
        cur.close()
