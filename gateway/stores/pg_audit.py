"""The audit log in the PostgreSQL store: one log, in one total order, for every gateway replica on the store.

The records are the file log's records (audit/log.py, audit/SCHEMA.md), byte for byte: each row of
``audit_records`` holds the exact canonical bytes of one record under its ``seq``, so the hash chain and the
Merkle tree are those of the file format, and an export (`export`) is an ``audit.jsonl`` + ``checkpoints.jsonl``
pair that `audit.verify.verify_log`, the one verifier, checks.

An append (or a group of appends made at once by threads of one process) is one transaction. It locks the one row
of ``audit_head`` (``SELECT ... FOR UPDATE``), which holds the log's size, the leaf hash of its last record and its
Merkle frontier, so appends from all replicas serialise there and each costs O(1), never a re-read of history;
seals the records after the last one, inserts them, signs a checkpoint into ``audit_checkpoints`` when one is due
(every `checkpoint_every` records or `checkpoint_interval` seconds, as the file log), updates the head and commits
(a synchronous commit: durable when `append` returns). Any failure rolls the whole transaction back and raises
`AuditWriteError`, so the caller fails closed.

The signing key never enters the database: each replica reads it from its own key directory. Every replica must
hold the same key (copy the key directory to each host); the head records the id of the log's key, and a replica
whose key differs refuses to append (its requests answer 503) rather than sign checkpoints the verifier would
reject. `rotate_key` records the rotation and signs with both keys as the file log does; the new key directory
must then be copied to the other replicas.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from audit import keys, storage
from audit.checkpoint import Checkpoint
from audit.checkpoint import export as export_checkpoint
from audit.errors import AuditKeyError, AuditWriteError
from audit.group import GroupCommit
from audit.merkle import Frontier, leaf_hash
from audit.record import Event, parse_time, prepare, seal, utc_now
from audit.verify import verify_log
from gateway.stores.pg import _pool, describe
from policies.errors import LedgerUnavailable

__all__ = ["PgAuditLog"]

SYSTEM_ACTOR = {"principal": "bastion", "role": "system"}
_T = TypeVar("_T")
_EXPORT_ROWS = 5000  # rows fetched per round trip when exporting


@dataclass
class _Head:
    """The locked head row: the end of the log as of this transaction."""

    frontier: Frontier
    last_leaf: str
    last_time: str | None
    ckpt_size: int
    ckpt_epoch: float | None  # when the interval to the next checkpoint started (None: no record yet)
    key_id: str | None  # the id of the key the log is signed with (None: nothing signed yet)


@dataclass
class _Copy:
    """What a copy of the log in the file format holds: its records, the last one's bytes, its file's size."""

    records: int = 0
    last: bytes = b""
    size: int = 0

    def add(self, out: Any, body: bytes) -> None:
        out.write(body + b"\n")
        self.records += 1
        self.last = body
        self.size += len(body) + 1


class PgAuditLog:
    """The audit log in the PostgreSQL store at `conninfo` (schema version 3 or later, `bastion store migrate`).

    `key_dir` holds this host's copy of the checkpoint-signing key (generated on first use when the log has none).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        key_dir: str | Path,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
        max_connections: int = 4,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_interval <= 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval > 0")
        self.conninfo = conninfo
        self.location = describe(conninfo)
        self.key_dir = Path(key_dir)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._max_connections = max_connections
        self._pool: ConnectionPool[Any] = _pool(conninfo, "bastion-audit", max_connections)
        self._snapshot_dir: Path | None = None
        self._snapshot_copy: _Copy | None = None
        self._reset()

    def _reset(self) -> None:
        """Fresh in-process state (at creation, and in a forked child, which must not share the parent's pool)."""
        if getattr(self, "_pid", None) not in (None, os.getpid()):
            self._pool = _pool(self.conninfo, "bastion-audit", self._max_connections)
            self._snapshot_dir = None
            self._snapshot_copy = None
        self._pid = os.getpid()
        self._group = GroupCommit(self._write_group)
        self._snapshot_lock = threading.Lock()
        self._signer: keys.Signer | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            try:
                self._reset()
            except LedgerUnavailable as exc:
                raise AuditWriteError(str(exc)) from exc

    # ------------------------------------------------------------------ public API

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append one event; return the stored record once it is committed. Raises AuditWriteError otherwise."""
        return self._submit([event])[0]

    def append_many(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append several events atomically (all committed, or none) in one transaction."""
        events = list(events)
        return self._submit(events) if events else []

    def records(self) -> list[dict[str, Any]]:
        """Every record, in order."""
        return [json.loads(body) for body in self._bodies()]

    def verify(self) -> tuple[bool, str]:
        """Export the log and verify the copy against this host's keyring (the file log's verifier)."""
        report = verify_log(self.snapshot(fresh=True), keys.Keyring.load(self.key_dir))
        return report.ok, report.message

    def checkpoint(self) -> Checkpoint:
        """Sign and store a checkpoint of the log as it is now, and return it."""
        return self._exclusive(self._write_checkpoint)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The last stored checkpoint (read without writing anything)."""
        try:
            with self._pool.connection() as con:
                row = con.execute("SELECT body FROM audit_checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        except psycopg.Error as exc:
            raise AuditWriteError(f"the audit log ({self.location}) cannot be read: {exc}") from exc
        return None if row is None else Checkpoint.from_dict(json.loads(bytes(row[0])))

    def export_checkpoint(self, dest: str | Path) -> Path:
        """Copy the latest checkpoint (signing a new one first if records are not yet covered) to `dest`, a file
        or a directory kept off the database host; return the written path."""

        def covering(con: psycopg.Connection[Any], head: _Head) -> Checkpoint:
            if head.ckpt_size == head.frontier.size and head.ckpt_size > 0:
                row = con.execute("SELECT body FROM audit_checkpoints ORDER BY id DESC LIMIT 1").fetchone()
                if row is not None:
                    found = Checkpoint.from_dict(json.loads(bytes(row[0])))
                    if found.tree_size == head.frontier.size:
                        return found
            return self._write_checkpoint(con, head)

        cp = self._exclusive(covering)
        try:
            return export_checkpoint(cp, dest)
        except OSError as exc:
            raise AuditWriteError(f"cannot export checkpoint to {dest}: {exc}") from exc

    def rotate_key(self, actor: dict[str, Any] | None = None) -> tuple[str, str]:
        """Replace the signing key and record it; return (old key id, new key id).

        In one transaction: append a ``key_rotated`` record naming both keys, sign a checkpoint covering it with the
        old key, then one with the new key, and make the new key the log's. Once committed, the new key is installed
        in this host's key directory (the old public key stays in the keyring); copy that directory to the other
        replicas, which refuse to append until they hold the new key.
        """
        new_key = keys.generate()
        new_id = keys.key_id_of(new_key.public_key())

        def rotate(con: psycopg.Connection[Any], head: _Head) -> tuple[str, str]:
            old = self._current_signer()
            self._write_records(
                con,
                head,
                [
                    prepare(
                        {
                            "event": Event.KEY_ROTATED,
                            "actor": actor or SYSTEM_ACTOR,
                            "decision": "allowed",
                            "reason": "ok",
                            "old_key_id": old.key_id,
                            "new_key_id": new_id,
                            "new_public_key": base64.b64encode(keys.raw_public(new_key.public_key())).decode(),
                        }
                    )
                ],
            )
            self._write_checkpoint(con, head, old)
            self._write_checkpoint(con, head, keys.Signer(new_id, new_key, (0, 0)))
            head.key_id = new_id
            return old.key_id, new_id

        result = self._exclusive(rotate)
        try:
            keys.install(self.key_dir, new_key)
        except OSError as exc:
            raise AuditWriteError(
                f"the rotation to key {new_id} is recorded but the key could not be installed in {self.key_dir}: {exc}"
            ) from exc
        self._signer = None
        return result

    def export(self, dest: str | Path, *, durable: bool = True) -> Path:
        """Write the log as it is now to the directory `dest` in the file format (``audit.jsonl`` and
        ``checkpoints.jsonl``, replacing those files), from one consistent snapshot of the database. Returns dest."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        self._export(dest, durable=durable)
        return dest

    def _export(self, dest: Path, *, durable: bool) -> _Copy:
        log_tmp = dest / f".{storage.LOG}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with self._connection("read") as con, con.transaction():
                con.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                copy = _Copy()
                with open(log_tmp, "wb") as out:
                    for body in self._stream(con, "SELECT body FROM audit_records ORDER BY seq"):
                        copy.add(out, body)
                    if durable:
                        out.flush()
                        os.fsync(out.fileno())
                # The log first: a reader between the two renames sees checkpoints older than the log, never newer.
                os.replace(log_tmp, dest / storage.LOG)
                self._write_checkpoints(con, dest, durable=durable)
            if durable:
                storage.fsync_dir(dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                log_tmp.unlink()
        return copy

    def _write_checkpoints(self, con: psycopg.Connection[Any], dest: Path, *, durable: bool) -> None:
        tmp = dest / f".{storage.CHECKPOINTS}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as out:
                for body in self._stream(con, "SELECT body FROM audit_checkpoints ORDER BY id"):
                    out.write(body + b"\n")
                if durable:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, dest / storage.CHECKPOINTS)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _extend(self, dest: Path, copy: _Copy) -> bool:
        """Bring the copy in `dest` up to date by appending the records written since it was made, if its last
        record is still the database's record at that position and its file is as it was left (else False: the
        caller exports afresh). The checkpoints (about one per thousand records) are rewritten whole."""
        log_path = dest / storage.LOG
        try:
            if os.stat(log_path).st_size != copy.size:
                return False
        except FileNotFoundError:
            return False
        with self._connection("read") as con, con.transaction():
            con.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if copy.records:
                row = con.execute("SELECT body FROM audit_records WHERE seq = %s", (copy.records - 1,)).fetchone()
                if row is None or bytes(row[0]) != copy.last:
                    return False
            # Readers take sizes under the shared lock (audit.storage.snapshot), so they never see half a record.
            lock = os.open(dest / storage.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                with open(log_path, "ab") as out:
                    query = "SELECT body FROM audit_records WHERE seq >= %s ORDER BY seq"
                    for body in self._stream(con, query, (copy.records,)):
                        copy.add(out, body)
            finally:
                os.close(lock)
            self._write_checkpoints(con, dest, durable=False)
        return True

    def snapshot(self, *, fresh: bool = False) -> Path:
        """A private directory holding a copy of the whole log in the file format, for the readers of audit.report
        and audit.verify. The copy of an earlier call is extended with the records appended since (after checking
        that its last record is still the database's); `fresh` (verification) exports the whole log again, so that
        it shows every record as the database holds it now."""
        self._check_pid()
        with self._snapshot_lock:
            if self._snapshot_dir is None or not self._snapshot_dir.is_dir():
                self._snapshot_dir = Path(tempfile.mkdtemp(prefix="bastion-audit-"))
                self._snapshot_copy = None
            directory = self._snapshot_dir
            try:
                if fresh or self._snapshot_copy is None or not self._extend(directory, self._snapshot_copy):
                    self._snapshot_copy = None
                    self._snapshot_copy = self._export(directory, durable=False)
            except OSError as exc:
                self._snapshot_copy = None
                raise AuditWriteError(f"the audit log ({self.location}) cannot be copied for reading: {exc}") from exc
            except AuditWriteError:
                self._snapshot_copy = None
                raise
        return directory

    def close(self, *, seal: bool = True) -> None:
        """Checkpoint records not yet covered by one (unless `seal` is false: a log opened only to be read), then
        release the pool and the snapshot directory. In a forked child that never used the log, the pool is the
        parent's: it is left alone."""
        if self._pid != os.getpid():
            return
        try:
            if seal and not self._pool.closed:

                def seal_tail(con: psycopg.Connection[Any], head: _Head) -> None:
                    if head.frontier.size > head.ckpt_size:
                        self._write_checkpoint(con, head)

                self._exclusive(seal_tail)
        finally:
            self._pool.close()
            if self._snapshot_dir is not None:
                shutil.rmtree(self._snapshot_dir, ignore_errors=True)
                self._snapshot_dir = None
                self._snapshot_copy = None

    def __enter__(self) -> PgAuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ group commit

    def _submit(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prepared = [prepare(e) for e in events]
        self._check_pid()
        return self._group.submit(prepared)

    def _write_group(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write a group of events in one transaction (`GroupCommit`); return their records."""

        def write(con: psycopg.Connection[Any], head: _Head) -> list[dict[str, Any]]:
            records = self._write_records(con, head, events)
            self._maybe_checkpoint(con, head)
            return records

        return self._exclusive(write)

    # ------------------------------------------------------------------ the locked head

    @contextlib.contextmanager
    def _connection(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        self._check_pid()
        try:
            with self._pool.connection() as con:
                yield con
        except psycopg.Error as exc:
            raise AuditWriteError(f"the audit log ({self.location}) cannot be {doing}: {exc}") from exc

    def _exclusive(self, fn: Callable[[psycopg.Connection[Any], _Head], _T]) -> _T:
        """Run `fn(con, head)` in one transaction holding the head row's lock; write the head back and commit."""
        try:
            with self._connection("written") as con, con.pipeline(), con.transaction():
                row = con.execute(
                    "SELECT size, last_leaf, last_time, frontier, ckpt_size, ckpt_epoch, key_id "
                    "FROM audit_head WHERE id = 1 FOR UPDATE"
                ).fetchone()
                if row is None:
                    raise AuditWriteError(f"the audit log ({self.location}) has lost its head row")
                size, last_leaf, last_time, frontier, ckpt_size, ckpt_epoch, key_id = row
                head = _Head(
                    Frontier(int(size), [bytes(h) for h in frontier or []]),
                    str(last_leaf),
                    last_time,
                    int(ckpt_size),
                    ckpt_epoch,
                    key_id,
                )
                self._check_key(head)
                result = fn(con, head)
                con.execute(
                    "UPDATE audit_head SET size = %s, last_leaf = %s, last_time = %s, frontier = %s, ckpt_size = %s, "
                    "ckpt_epoch = %s, key_id = %s WHERE id = 1",
                    (
                        head.frontier.size,
                        head.last_leaf,
                        head.last_time,
                        head.frontier.hashes,
                        head.ckpt_size,
                        head.ckpt_epoch,
                        head.key_id,
                    ),
                )
            return result
        except (OSError, AuditKeyError) as exc:
            raise AuditWriteError(f"the audit log ({self.location}) cannot be signed: {exc}") from exc

    def _check_key(self, head: _Head) -> None:
        """Refuse to write with a signing key other than the log's (this host's key directory is stale or new)."""
        signer = self._current_signer()
        if head.key_id is None:
            head.key_id = signer.key_id
        elif signer.key_id != head.key_id:
            raise AuditWriteError(
                f"the audit log ({self.location}) is signed with key {head.key_id} but this host's key directory "
                f"{self.key_dir} holds key {signer.key_id}: copy the key directory of a replica that holds the log's "
                "key to this host"
            )

    def _current_signer(self) -> keys.Signer:
        if self._signer is None or not keys.signer_is_current(self.key_dir, self._signer):
            self._signer = keys.ensure_signer(self.key_dir)
        return self._signer

    def _write_records(
        self, con: psycopg.Connection[Any], head: _Head, events: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Seal `events` after the head and insert them (committed with the transaction)."""
        records: list[dict[str, Any]] = []
        rows: list[tuple[int, bytes]] = []
        for event in events:
            now = utc_now()
            if head.last_time is not None and now < head.last_time:
                now = head.last_time  # one order for all replicas: a record's time never precedes the one before
            seq = head.frontier.size
            record, body = seal(event, seq, now, head.last_leaf)
            leaf = leaf_hash(body)
            head.frontier.append(leaf)
            head.last_leaf = leaf.hex()
            head.last_time = now
            if head.ckpt_epoch is None:
                head.ckpt_epoch = parse_time(now).timestamp()  # the interval runs from the first record
            records.append(record)
            rows.append((seq, body))
        with con.cursor() as cur:
            cur.executemany("INSERT INTO audit_records (seq, body) VALUES (%s, %s)", rows)
        return records

    def _maybe_checkpoint(self, con: psycopg.Connection[Any], head: _Head) -> None:
        pending = head.frontier.size - head.ckpt_size
        started = head.ckpt_epoch if head.ckpt_epoch is not None else time.time()
        if pending >= self.checkpoint_every or (pending > 0 and time.time() - started >= self.checkpoint_interval):
            self._write_checkpoint(con, head)

    def _write_checkpoint(
        self, con: psycopg.Connection[Any], head: _Head, signer: keys.Signer | None = None
    ) -> Checkpoint:
        cp = Checkpoint.create(head.frontier.size, head.frontier.root(), signer or self._current_signer())
        con.execute(
            "INSERT INTO audit_checkpoints (tree_size, body) VALUES (%s, %s)", (cp.tree_size, cp.to_line()[:-1])
        )
        head.ckpt_size = cp.tree_size
        head.ckpt_epoch = parse_time(cp.time).timestamp()
        return cp

    # ------------------------------------------------------------------ reading

    def _bodies(self) -> list[bytes]:
        with self._connection("read") as con:
            rows = con.execute("SELECT body FROM audit_records ORDER BY seq").fetchall()
        return [bytes(r[0]) for r in rows]

    @staticmethod
    def _stream(con: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Iterator[bytes]:
        """The first column of `query`'s rows, fetched through a server-side cursor (the log may be large)."""
        with con.cursor(name=f"bastion_audit_{threading.get_ident()}") as cur:
            cur.itersize = _EXPORT_ROWS
            cur.execute(query, params)  # fixed text of this module
            for row in cur:
                yield bytes(row[0])
