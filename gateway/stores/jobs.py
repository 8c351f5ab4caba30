"""Synthetic-proxy job records: the `JobStore` protocol and its file implementation (the default: one directory
per job under `Settings.synth_jobs_dir`, its state in job.json). The PostgreSQL implementation, shared by replicas,
is gateway/stores/pg_jobs.py; `gateway.stores.base.open_job_store` picks one from the settings.

Whichever store holds the records, a job's files (its DP model, proxy and report) are in its directory under
`Settings.synth_jobs_dir`, which replicas share through `Settings.shared_dir`.

A store keeps three promises:

- admission: `admission(principal)` holds a lock, for one principal, across counting that principal's unfinished
  jobs and creating the new one, so the per-principal cap holds among every process that uses the store;
- one runner: `claim(job_id)` gives a lease on the job to one process at a time, which ends when its process ends
  (whatever ends it), so a job whose runner died is taken by the next process that looks;
- durable failure: `fail` records a failure where it needs no new space (the file store overwrites a preallocated
  file in place), and a failure read back overrides the record, so a failed job is never resumed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("bastion.synth")

FAILED_FILE = "failed"
FAILED_BYTES = 4096  # preallocated: the failure state fits in it (the error message is cut to fit)
# A job counts as unfinished in these states (gateway.synth_jobs.ACTIVE, as the values the records hold).
UNFINISHED = ("queued", "approved", "running")


class LeaseLost(BaseException):
    """A process's lease on a job ended while it ran the job (its store connection was lost): the run stops, and
    the process that takes the job next goes on from what was stored. A BaseException, so that no handler of the
    run's own failures (which fall back or fail the job) takes it for one."""


class Lease(Protocol):
    """The right to run one job, held by one process until `release` (or its process's end)."""

    def held(self) -> bool:
        """Whether the lease still holds (a PostgreSQL lease ends with its connection)."""
        ...


class JobStore(Protocol):
    """Durable records of synthesis jobs (each a JSON-ready dict with `job_id`, `principal`, `status`, `created`)."""

    location: str

    def create(self, job: dict[str, Any]) -> None: ...

    def read(self, job_id: str) -> dict[str, Any] | None:
        """The record with a recorded failure applied over it, or None if there is no such job."""
        ...

    def save(self, job: dict[str, Any], lease: Lease | None = None) -> None:
        """Write the record; with `lease`, only while it holds (LeaseLost if not), so that a runner that lost its
        lease never overwrites what the next runner wrote."""
        ...

    def fail(self, job_id: str, failure: dict[str, Any]) -> bool:
        """Record `failure` over the job's record; whether it was recorded durably."""
        ...

    def clear_failure(self, job_id: str) -> None: ...

    def all(self) -> list[dict[str, Any]]:
        """Every job's record, oldest first."""
        ...

    def unfinished(self, principal: str) -> list[str]:
        """Ids of `principal`'s jobs that are queued, approved or running (and not failed)."""
        ...

    def admission(self, principal: str) -> contextlib.AbstractContextManager[None]:
        """Held across counting `principal`'s unfinished jobs and creating one."""
        ...

    def claim(self, job_id: str) -> contextlib.AbstractContextManager[Lease | None]:
        """The job's lease while the block runs, or None if another process holds it."""
        ...

    def close(self) -> None: ...


def _apply(job: dict[str, Any], failure: dict[str, Any] | None) -> dict[str, Any]:
    """The record with a recorded failure over it: a job that was unfinished (or failed) when it failed is failed."""
    if failure is not None and job.get("status") in (*UNFINISHED, "failed"):
        job.update(failure)
    return job


def write_json(path: Path, payload: Any) -> None:
    """`payload` as JSON at `path`, atomically (a temporary file, synced, then renamed), mode 0600."""
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def reserve(path: Path) -> None:
    """A file of FAILED_BYTES blanks whose blocks are allocated now, to be overwritten in place later."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b" " * FAILED_BYTES)
        with contextlib.suppress(OSError):  # not every file system supports it; the blanks are written anyway
            os.posix_fallocate(fd, 0, FAILED_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_in_place(path: Path, state: dict[str, Any] | None) -> None:
    """`state` as JSON over the reserved file, in place (no new blocks), padded to its size (None: blanks)."""
    data = json.dumps(state).encode() if state is not None else b""
    if len(data) > FAILED_BYTES:
        raise ValueError("the failure state does not fit its reserved file")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data + b" " * (FAILED_BYTES - len(data)), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_in_place(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    with contextlib.suppress(json.JSONDecodeError):
        state = json.loads(text)
        return state if isinstance(state, dict) else None
    return None


class _FileLease:
    def held(self) -> bool:
        return True  # an flock lasts as long as its open file, which the claim keeps open


class FileJobStore:
    """Job records as files: `<root>/<job id>/job.json`, written atomically, with the preallocated `failed` file.

    The lease on a job is an flock on the `lock` file of its directory, and admission an flock on `jobs.admission`
    beside `<root>` (with a thread lock): both hold among the processes of one host, which is what a workspace's
    files serve.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._admit = threading.Lock()

    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, job: dict[str, Any]) -> None:
        job_dir = self._dir(job["job_id"])
        job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        reserve(job_dir / FAILED_FILE)
        write_json(job_dir / "job.json", job)

    def read(self, job_id: str) -> dict[str, Any] | None:
        try:
            job = json.loads((self._dir(job_id) / "job.json").read_text())
        except FileNotFoundError:
            return None
        return _apply(job, read_in_place(self._dir(job_id) / FAILED_FILE))

    def save(self, job: dict[str, Any], lease: Lease | None = None) -> None:
        write_json(self._dir(job["job_id"]) / "job.json", job)  # an flock lease holds while its process lives

    def fail(self, job_id: str, failure: dict[str, Any]) -> bool:
        """The reserved file overwritten in place (no new space needed), then job.json if it can be rewritten."""
        path = self._dir(job_id) / FAILED_FILE
        with contextlib.suppress(OSError, ValueError):
            write_in_place(path, failure)
        durable = read_in_place(path) == failure
        try:
            job = json.loads((self._dir(job_id) / "job.json").read_text())
            write_json(self._dir(job_id) / "job.json", {**job, **failure})
        except (OSError, json.JSONDecodeError) as exc:
            kind = "the disk is full" if getattr(exc, "errno", None) == errno.ENOSPC else type(exc).__name__
            log.error("synthesis job %s: its record could not be rewritten (%s); its failure is kept", job_id, kind)
        return durable

    def clear_failure(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            write_in_place(self._dir(job_id) / FAILED_FILE, None)

    def all(self) -> list[dict[str, Any]]:
        jobs = []
        for d in sorted(self.root.iterdir()) if self.root.exists() else []:
            if not d.is_dir():
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                job = self.read(d.name)
                if job is not None:
                    jobs.append(job)
        return sorted(jobs, key=lambda j: j["created"])

    def unfinished(self, principal: str) -> list[str]:
        return [
            j["job_id"] for j in self.all() if j["principal"]["principal"] == principal and j["status"] in UNFINISHED
        ]

    @contextlib.contextmanager
    def admission(self, principal: str) -> Iterator[None]:
        with self._admit, open(self.root.parent / "jobs.admission", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def claim(self, job_id: str) -> Iterator[Lease | None]:
        with open(self._dir(job_id) / "lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None  # another process runs it
                return
            yield _FileLease()

    def close(self) -> None:
        pass
