"""Public computations: an empty in-memory DuckDB for values that are public or already released (post-processing
of a DP release, the values of a key expression over a declared domain). It never opens private data, whatever the
engine that holds the private rows."""

from __future__ import annotations

import os
import threading

import duckdb

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


Error = duckdb.Error
