"""Synthetic-proxy job records in the PostgreSQL store (table `synth_jobs`, schema version 4), shared by gateway
replicas on several hosts: every replica lists and reads the same jobs, and the per-principal cap on unfinished jobs
holds across them. The same `JobStore` interface as the file store (gateway/stores/jobs.py):

- admission: a session-level advisory lock keyed by the principal, taken on a pooled connection, is held across
  counting the principal's unfinished jobs and inserting the new one (committed before the lock is released), so
  two replicas cannot both admit a job when only one fits;
- one runner: the lease on a job is a session-level advisory lock keyed by its id, on a connection of its own that
  lives as long as the run; the server releases it when that connection ends, with its process or its host, so a job
  whose runner died is taken by the next replica that looks (and resumed under its original charge);
- durable failure: `fail` writes the failure to the job's `failure` column (the file store's `failed` file), which
  is read over the record: a job with a recorded failure is failed, whatever its record says.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import psycopg

from gateway.stores.jobs import UNFINISHED, Lease, LeaseLost, _apply
from gateway.stores.pg import _JOB_ADMIT_LOCK, _JOB_RUN_LOCK, _connect, _pool, describe
from policies.errors import LedgerUnavailable

log = logging.getLogger("bastion.synth")

_COLUMNS = "record, failure"


def job_key(job_id: str) -> int:
    """The advisory lock key (an int4) of a job: the first 32 bits of its random id. Two jobs that share it only
    wait for each other's runs."""
    return int(job_id[:8], 16) - 2**31


class _PgLease:
    """A job's lease: its advisory lock, held by the session of `con` (a connection of the lease's own)."""

    def __init__(self, con: psycopg.Connection[Any]) -> None:
        self.con = con

    def held(self) -> bool:
        """Whether the lock's session is still there (a server restart or a terminated backend ends it)."""
        if self.con.closed:
            return False
        try:
            self.con.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True


class PgJobStore:
    """Job records in PostgreSQL (a pool of its own; each run's lease on a connection of its own)."""

    def __init__(self, conninfo: str, *, max_connections: int = 4) -> None:
        self.conninfo = conninfo
        self.location = describe(conninfo)
        self._pool = _pool(conninfo, "bastion-jobs", max_connections)

    @contextlib.contextmanager
    def _con(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as con:
                yield con
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"the synthesis jobs ({self.location}) cannot be {doing}: {exc}") from exc

    @staticmethod
    def _job(row: tuple[Any, ...]) -> dict[str, Any]:
        record, failure = row
        return _apply(json.loads(record), json.loads(failure) if failure is not None else None)

    def create(self, job: dict[str, Any]) -> None:
        with self._con("written") as con:
            con.execute(
                "INSERT INTO synth_jobs (job_id, principal, status, created, record) VALUES (%s, %s, %s, %s, %s)",
                (job["job_id"], job["principal"]["principal"], str(job["status"]), job["created"], _dump(job)),
            )

    def read(self, job_id: str) -> dict[str, Any] | None:
        with self._con("read") as con:
            row = con.execute(f"SELECT {_COLUMNS} FROM synth_jobs WHERE job_id = %s", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def save(self, job: dict[str, Any], lease: Lease | None = None) -> None:
        """With `lease`, on the lease's own connection: a write made through the session that holds the job's
        lock cannot land after that lock is gone (and another runner may hold it)."""
        args = (str(job["status"]), _dump(job), job["job_id"])
        statement = "UPDATE synth_jobs SET status = %s, record = %s WHERE job_id = %s"
        if isinstance(lease, _PgLease):
            try:
                lease.con.execute(statement, args)
            except psycopg.Error:
                raise LeaseLost(job["job_id"]) from None
            return
        with self._con("written") as con:
            con.execute(statement, args)

    def fail(self, job_id: str, failure: dict[str, Any]) -> bool:
        """The failure and the record's new state in one statement (False, logged, if the store cannot be
        written: the caller keeps the failure in memory)."""
        try:
            with self._pool.connection() as con:
                row = con.execute(
                    "UPDATE synth_jobs SET failure = %s, status = %s, "
                    "record = (record::jsonb || %s::jsonb)::text WHERE job_id = %s RETURNING job_id",
                    (_dump(failure), str(failure["status"]), _dump(failure), job_id),
                ).fetchone()
        except psycopg.Error as exc:
            log.error("synthesis job %s: its failure could not be recorded (%s)", job_id, type(exc).__name__)
            return False
        return row is not None

    def clear_failure(self, job_id: str) -> None:
        with self._con("written") as con:
            con.execute("UPDATE synth_jobs SET failure = NULL WHERE job_id = %s", (job_id,))

    def all(self) -> list[dict[str, Any]]:
        with self._con("read") as con:
            rows = con.execute(f"SELECT {_COLUMNS} FROM synth_jobs ORDER BY created, job_id").fetchall()
        return [self._job(r) for r in rows]

    def unfinished(self, principal: str) -> list[str]:
        with self._con("read") as con:
            rows = con.execute(
                "SELECT job_id FROM synth_jobs WHERE principal = %s AND status = ANY(%s) AND failure IS NULL "
                "ORDER BY created",
                (principal, list(UNFINISHED)),
            ).fetchall()
        return [str(r[0]) for r in rows]

    @contextlib.contextmanager
    def admission(self, principal: str) -> Iterator[None]:
        with self._con("locked") as con:
            con.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_JOB_ADMIT_LOCK, principal))
            try:
                yield
            finally:
                # A connection that cannot unlock is broken, and its lock went with its session.
                with contextlib.suppress(psycopg.Error):
                    con.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_JOB_ADMIT_LOCK, principal))

    @contextlib.contextmanager
    def claim(self, job_id: str) -> Iterator[Lease | None]:
        try:
            con = _connect(self.conninfo)
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"the synthesis jobs ({self.location}) cannot be reached: {exc}") from exc
        try:
            try:
                row = con.execute("SELECT pg_try_advisory_lock(%s, %s)", (_JOB_RUN_LOCK, job_key(job_id))).fetchone()
            except psycopg.Error as exc:
                raise LedgerUnavailable(f"the synthesis jobs ({self.location}) cannot be locked: {exc}") from exc
            yield _PgLease(con) if row and row[0] else None
        finally:
            with contextlib.suppress(psycopg.Error):
                con.close()  # ends the session: the lock goes with it

    def close(self) -> None:
        self._pool.close()


def _dump(payload: dict[str, Any]) -> str:
    return json.dumps(payload, default=str)
