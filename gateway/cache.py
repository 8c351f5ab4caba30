"""Released answers per principal: an identical repeat gets the same answer at no cost."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ReleaseCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        with closing(self._connect()) as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS releases (key TEXT PRIMARY KEY, principal TEXT NOT NULL, "
                "created REAL NOT NULL, response TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, kept open between requests (opening one, and closing the last one, which
        checkpoints the WAL, cost about a millisecond each). A connection that raised is dropped."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # never use a connection across fork
            local.con, local.pid = self._connect(), os.getpid()
        con = local.con
        try:
            yield con
        except sqlite3.Error:
            local.pid = None
            with contextlib.suppress(sqlite3.Error):
                con.close()
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        with self._connection() as con:
            row = con.execute("SELECT response FROM releases WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, principal: str, response: dict[str, Any]) -> None:
        # The first stored answer wins, so concurrent identical requests converge on one released answer.
        with self._connection() as con:
            con.execute(
                "INSERT OR IGNORE INTO releases (key, principal, created, response) VALUES (?, ?, ?, ?)",
                (key, principal, time.time(), json.dumps(response)),
            )
