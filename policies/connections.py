"""SQLite connections kept open per thread and process (for the ledger and the release cache).

Opening a connection, and closing the last one (which checkpoints the WAL), cost about a millisecond each, so each
thread keeps its own. A connection that raised is dropped, so the next use opens the file again; a forked child
never reuses its parent's connection.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator


class ThreadConnections:
    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._local = threading.local()

    @contextlib.contextmanager
    def get(self) -> Iterator[sqlite3.Connection]:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.con, local.pid = self._connect(), os.getpid()
        con = local.con
        try:
            yield con
        except sqlite3.Error:
            local.pid = None
            with contextlib.suppress(sqlite3.Error):
                con.close()
            raise
