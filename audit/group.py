"""Group commit: the concurrent appends of one process's threads written together, whatever the log's medium.

The first caller to find no commit in progress becomes the leader: it takes every event queued so far and writes
them with one call of `write` (one write and fsync of the file log, one transaction of the PostgreSQL log), while
the callers that arrive meanwhile queue for the next group. Each caller gets back its own records, or the group's
error as an `AuditWriteError`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from audit.errors import AuditWriteError


class _Pending:
    __slots__ = ("events", "records", "error", "done")

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.done = False


class GroupCommit:
    """`write(events)` durably appends the events and returns their records, one per event in order; it is only
    ever called by one thread at a time. Make a new one in a forked child (its lock may be held by a parent's
    thread that does not exist there)."""

    def __init__(self, write: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        self._write = write
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Pending] = []
        self._leader = False

    def submit(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append `events` (prepared records) in one group; return their records once durable."""
        item = _Pending(events)
        cond = self._cond
        with cond:
            self._queue.append(item)
            while not item.done:
                if self._leader:
                    cond.wait()
                    continue
                self._leader = True
                batch, self._queue = self._queue, []
                cond.release()
                try:
                    self._commit(batch)
                finally:
                    cond.acquire()
                    self._leader = False
                    cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.records

    def _commit(self, batch: list[_Pending]) -> None:
        """Write every pending event of `batch` with one call of `write`; never raises an Exception (each caller
        gets the error)."""
        try:
            records = self._write([e for item in batch for e in item.events])
            start = 0
            for item in batch:
                item.records = records[start : start + len(item.events)]
                start += len(item.events)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must get an answer
            if isinstance(exc, AuditWriteError):
                error = exc
            else:
                error = AuditWriteError(f"audit log write failed: {exc}")
                error.__cause__ = exc
            for item in batch:
                item.error = error
                item.records = []
            if not isinstance(exc, Exception):
                raise
        finally:
            for item in batch:
                item.done = True
