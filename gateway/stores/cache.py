"""Released answers per principal: an identical repeat gets the same answer at no cost."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from policies.connections import ThreadConnections


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ReleaseCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._connections = ThreadConnections(self._connect)
        with closing(self._connect()) as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS releases (key TEXT PRIMARY KEY, principal TEXT NOT NULL, "
                "created REAL NOT NULL, response TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        # Committed without waiting for the disk (a crashed process loses nothing; a power loss may lose the last
        # answers): an answer missing from the cache is computed and charged anew, never released uncharged.
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    def get(self, key: str) -> dict[str, Any] | None:
        with self._connections.get() as con:
            row = con.execute("SELECT response FROM releases WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, principal: str, response: dict[str, Any]) -> None:
        # The first stored answer wins, so concurrent identical requests converge on one released answer.
        with self._connections.get() as con:
            con.execute(
                "INSERT OR IGNORE INTO releases (key, principal, created, response) VALUES (?, ?, ?, ?)",
                (key, principal, time.time(), json.dumps(response)),
            )

    def close(self) -> None:
        """Nothing to release: each thread's connection closes with the thread."""
