"""The append-only, tamper-evident audit log: the entry point of the package.

Records are canonical JSON lines in ``audit.jsonl``. Each record carries ``prev_hash``, the RFC 6962 leaf hash
of the record before it, and the log as a whole is a Merkle tree whose root is signed into
``checkpoints.jsonl`` every `checkpoint_every` records or `checkpoint_interval` seconds (checked on append),
and on `checkpoint()` and `close()`. See SCHEMA.md for the formats and `audit.verify` for checking a log.

Durability: `append` returns only after its record is written and fsync'd; any failure raises
`AuditWriteError` and leaves no partial record behind (a failed write is truncated away). Concurrency: writers
from any number of processes serialise on an exclusive ``flock``; within a process, concurrent appends are
committed in groups that share one write and one fsync. Appends are O(1): each writer caches the end of the
log (byte offset, Merkle frontier, last leaf hash) and only re-reads what other processes appended since,
detected by the file size.

A torn final record (a crash in the middle of an append, which therefore never returned) is repaired by the
next writer under the lock: the torn bytes are saved to ``audit.torn``, cut off the log, and a
``log_repaired`` record saying so is appended before anything else.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from audit import keys, storage
from audit.checkpoint import Checkpoint, last_valid, latest
from audit.checkpoint import export as export_checkpoint
from audit.errors import AuditError, AuditKeyError, AuditRecordError, AuditWriteError
from audit.group import GroupCommit
from audit.merkle import Frontier, leaf_hash
from audit.record import GENESIS, Event, canonical, parse_time, prepare, seal, utc_now
from audit.verify import verify_log

__all__ = ["AuditLog", "AuditWriteError", "AuditRecordError", "canonical"]

SYSTEM_ACTOR = {"principal": "bastion", "role": "system"}
_T = TypeVar("_T")


@dataclass
class _Tail:
    """What a writer knows about the end of the log file."""

    inode: int
    offset: int  # bytes of complete records
    frontier: Frontier  # frontier.size == number of records
    last_leaf: str  # hex leaf hash of the last record (the next record's prev_hash)
    torn: tuple[int, bytes] | None = None  # (offset, bytes) of an incomplete final record


class AuditLog:
    """An audit log in `directory` (files are created on first write).

    `key_dir` holds the checkpoint-signing key; it must be outside `directory` and defaults to
    ``directory.parent / "keys"``. A key is generated there on first use.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        key_dir: str | Path | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
    ) -> None:
        self.directory = Path(directory)
        self.key_dir = Path(key_dir) if key_dir is not None else self.directory.parent / "keys"
        resolved, key_resolved = self.directory.resolve(), self.key_dir.resolve()
        if key_resolved == resolved or resolved in key_resolved.parents:
            raise ValueError("the signing key directory must be outside the log directory")
        if checkpoint_every < 1 or checkpoint_interval <= 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval > 0")
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.location = str(self.directory)
        self.path = self.directory / storage.LOG
        self.checkpoints_path = self.directory / storage.CHECKPOINTS
        self.lock_path = self.directory / storage.LOCK
        self._reset()

    def _reset(self) -> None:
        """Forget every descriptor, cache and in-process lock (at creation, and in a forked child)."""
        self._pid = os.getpid()
        self._group = GroupCommit(self._write_group)
        self._io = threading.Lock()
        self._lock_fd = -1
        self._log_fd = -1
        self._tail: _Tail | None = None
        self._ckpt_key: tuple[int, int] | None = None
        self._ckpt: Checkpoint | None = None
        self._ckpt_epoch = time.time()
        self._signer: keys.Signer | None = None

    # ------------------------------------------------------------------ public API

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append one event; return the stored record once it is durable. Raises AuditWriteError otherwise."""
        return self._submit([event])[0]

    def append_many(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append several events atomically (all durable, or none written) with a single fsync."""
        events = list(events)
        return self._submit(events) if events else []

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in order (a torn final record is left out)."""
        if self._pid != os.getpid():
            self._reset()
        snap = storage.snapshot(self.directory)
        data = storage.read_prefix(self.path, snap.log_size)
        lines = data.split(b"\n")
        return [json.loads(line) for line in lines[:-1]]

    def verify(self) -> tuple[bool, str]:
        """Verify the whole log against its checkpoints and the keyring in `key_dir` (see `audit.verify`)."""
        report = verify_log(self.directory, keys.Keyring.load(self.key_dir))
        return report.ok, report.message

    def snapshot(self, *, fresh: bool = False) -> Path:
        """The directory readers of `audit.report` and `audit.verify` work on: the log's own (always as it is now,
        so `fresh` changes nothing here)."""
        return self.directory

    def export(self, dest: str | Path, *, durable: bool = True) -> Path:
        """Copy the log's records and checkpoints, as of one snapshot, into the directory `dest` (replacing its
        ``audit.jsonl`` and ``checkpoints.jsonl``). Returns dest."""
        dest = Path(dest)
        if dest.resolve() == self.directory.resolve():
            raise ValueError("cannot export a log onto itself")
        dest.mkdir(parents=True, exist_ok=True)
        snap = storage.snapshot(self.directory)
        for name, size in ((storage.LOG, snap.log_size), (storage.CHECKPOINTS, snap.checkpoints_size)):
            tmp = dest / f".{name}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as out:
                    if size:
                        with open(self.directory / name, "rb") as src:
                            remaining = size
                            while remaining:
                                chunk = src.read(min(1 << 22, remaining))
                                if not chunk:
                                    break
                                out.write(chunk)
                                remaining -= len(chunk)
                    if durable:
                        out.flush()
                        os.fsync(out.fileno())
                os.replace(tmp, dest / name)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        if durable:
            storage.fsync_dir(dest)
        return dest

    def checkpoint(self) -> Checkpoint:
        """Sign and durably store a checkpoint of the log as it is now, and return it."""
        return self._exclusive(lambda tail: self._write_checkpoint(tail))

    def latest_checkpoint(self) -> Checkpoint | None:
        """The last checkpoint in the checkpoints file (read without writing anything)."""
        return latest(self.checkpoints_path)

    def export_checkpoint(self, dest: str | Path) -> Path:
        """Copy the latest checkpoint (signing a new one first if records are not yet covered) to `dest`, a
        file or a directory kept apart from the log; return the written path."""

        def covering(tail: _Tail) -> Checkpoint:
            if self._ckpt is not None and self._ckpt.tree_size == tail.frontier.size:
                return self._ckpt
            return self._write_checkpoint(tail)

        try:
            return export_checkpoint(self._exclusive(covering), dest)
        except OSError as exc:
            raise AuditWriteError(f"cannot export checkpoint to {dest}: {exc}") from exc

    def rotate_key(self, actor: dict[str, Any] | None = None) -> tuple[str, str]:
        """Replace the signing key and record it; return (old key id, new key id).

        Under the log lock: append a ``key_rotated`` record naming both keys, sign a checkpoint covering it
        with the old key (the old key vouches for the new one), install the new key (the old public key stays
        in the keyring, the old private key is destroyed), then sign a checkpoint with the new key.
        """

        def rotate(tail: _Tail) -> tuple[str, str]:
            old = self._current_signer()
            new_key = keys.generate()
            new_id = keys.key_id_of(new_key.public_key())
            self._write_records(
                tail,
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
            self._write_checkpoint(tail, old)
            keys.install(self.key_dir, new_key)
            self._signer = None
            self._write_checkpoint(tail)
            return old.key_id, new_id

        return self._exclusive(rotate)

    def close(self) -> None:
        """Checkpoint records not yet covered by one and release the files (appending later reopens them)."""
        if self._pid != os.getpid():
            self._reset()
        with self._io:
            try:
                if self._log_fd >= 0 or self.path.exists():
                    self._locked(self._seal_on_close)
            finally:
                self._close_fds()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ group commit

    def _submit(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prepared = [prepare(e) for e in events]
        if self._pid != os.getpid():
            self._reset()
        return self._group.submit(prepared)

    def _write_group(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write a group of events with one write and one fsync (`GroupCommit`); return their records."""

        def write(tail: _Tail) -> list[dict[str, Any]]:
            records = self._write_records(tail, events)
            try:
                self._maybe_checkpoint(tail)
            except (OSError, AuditError) as exc:
                raise AuditWriteError(
                    f"records {records[0]['seq']}..{records[-1]['seq']} were written but the log could "
                    f"not be checkpointed: {exc}"
                ) from exc
            return records

        return self._exclusive(write)

    def _exclusive(self, fn: Callable[[_Tail], _T]) -> _T:
        """Run `fn(tail)` holding the in-process I/O lock and the exclusive file lock, the tail in sync."""
        if self._pid != os.getpid():
            self._reset()
        with self._io:
            return self._locked(fn)

    def _locked(self, fn: Callable[[_Tail], _T]) -> _T:
        try:
            self._open()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except OSError as exc:
            self._close_fds()
            raise AuditWriteError(f"audit log {self.directory} is not writable: {exc}") from exc
        try:
            return fn(self._sync())
        except OSError as exc:
            self._tail = None
            raise AuditWriteError(f"audit log {self.directory} could not be written: {exc}") from exc
        except AuditKeyError as exc:
            raise AuditWriteError(f"audit log {self.directory} cannot be signed: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ files and the cached tail

    def _open(self) -> None:
        if self._lock_fd < 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        if self._log_fd >= 0:
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._log_fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return
            os.close(self._log_fd)
            self._log_fd = -1
            self._tail = None
        self._log_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        storage.fsync_dir(self.directory)

    def _close_fds(self) -> None:
        for fd in (self._log_fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._log_fd = self._lock_fd = -1
        self._tail = None

    def _sync(self) -> _Tail:
        """Bring the cached tail up to date with the file (under the lock) and repair a torn final record."""
        st = os.fstat(self._log_fd)
        tail = self._tail
        if tail is None or tail.inode != st.st_ino or tail.offset > st.st_size:
            tail = self._load(st)
        elif tail.offset < st.st_size:
            self._scan(tail, st.st_size)
        self._tail = tail
        self._sync_checkpoints()
        covered = self._ckpt.tree_size if self._ckpt is not None else 0
        if tail.torn is not None and tail.frontier.size < covered:
            self._tail = None
            raise AuditWriteError(
                f"audit log is corrupt: record {tail.frontier.size} is unreadable although checkpointed; "
                "refusing to append (run verification)"
            )
        if tail.frontier.size < covered:
            self._tail = None
            raise AuditWriteError(
                f"audit log has {tail.frontier.size} records but its last checkpoint covers {covered}: "
                "it was truncated; refusing to append (run verification)"
            )
        if tail.torn is not None:
            self._repair(tail)
        return tail

    def _load(self, st: os.stat_result) -> _Tail:
        tail = _Tail(st.st_ino, 0, Frontier(), GENESIS)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            state = json.loads((self.directory / storage.STATE).read_bytes())
            offset, size = state["offset"], state["tree_size"]
            frontier = Frontier(size, [bytes.fromhex(h) for h in state["frontier"]])
            if state["inode"] == st.st_ino and 0 < offset <= st.st_size and size > 0:
                line = self._line_before(offset)
                if line is not None and leaf_hash(line).hex() == state["last_leaf"]:
                    tail = _Tail(st.st_ino, offset, frontier, state["last_leaf"])
        self._scan(tail, st.st_size)
        return tail

    def _line_before(self, offset: int) -> bytes | None:
        """The complete line ending with the newline at `offset - 1`, or None if there is none."""
        block = 4096
        while True:
            start = max(0, offset - block)
            data = os.pread(self._log_fd, offset - start, start)
            if len(data) != offset - start or not data.endswith(b"\n"):
                return None
            cut = data.rfind(b"\n", 0, len(data) - 1)
            if cut >= 0:
                return data[cut + 1 : -1]
            if start == 0:
                return data[:-1]
            block *= 4

    def _scan(self, tail: _Tail, end: int) -> None:
        """Hash the records from `tail.offset` to `end`; set `tail.torn` if the last one is incomplete."""
        fd, pos, buf = self._log_fd, tail.offset, b""
        held: bytes | None = None  # the last complete line, appended only once known not to be the last
        sha, frontier = hashlib.sha256, tail.frontier
        while pos < end:
            chunk = os.pread(fd, min(1 << 22, end - pos), pos)
            if not chunk:
                break
            pos += len(chunk)
            lines = (buf + chunk).split(b"\n")
            buf = lines.pop()
            for line in lines:
                if held is not None:
                    leaf = sha(b"\x00" + held).digest()
                    frontier.append(leaf)
                    tail.offset += len(held) + 1
                    tail.last_leaf = leaf.hex()
                held = line
        tail.torn = None
        if held is not None:
            try:
                json.loads(held)
            except ValueError:
                tail.torn = (tail.offset, held + b"\n" + buf)
                return
            leaf = leaf_hash(held)
            frontier.append(leaf)
            tail.offset += len(held) + 1
            tail.last_leaf = leaf.hex()
        if buf:
            tail.torn = (tail.offset, buf)

    def _repair(self, tail: _Tail) -> None:
        assert tail.torn is not None
        offset, data = tail.torn
        digest = hashlib.sha256(data).hexdigest()
        line = tail.frontier.size + 1
        saved = (
            canonical(
                {
                    "time": utc_now(),
                    "line": line,
                    "offset": offset,
                    "bytes": len(data),
                    "sha256": digest,
                    "data": base64.b64encode(data).decode(),
                }
            )
            + b"\n"
        )
        fd = os.open(self.directory / storage.TORN, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            storage.write_all(fd, saved)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.ftruncate(self._log_fd, offset)
        os.fsync(self._log_fd)
        tail.torn = None
        self._write_records(
            tail,
            [
                prepare(
                    {
                        "event": Event.LOG_REPAIRED,
                        "actor": SYSTEM_ACTOR,
                        "decision": "allowed",
                        "reason": "torn_final_record",
                        "torn_line": line,
                        "torn_offset": offset,
                        "torn_bytes": len(data),
                        "torn_sha256": digest,
                        "saved_to": storage.TORN,
                    }
                )
            ],
        )

    def _write_records(self, tail: _Tail, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Seal, write and fsync `events` at the end of the log; on failure cut the file back and raise."""
        frontier = tail.frontier.copy()
        prev = tail.last_leaf
        records, lines = [], []
        for event in events:
            record, line = seal(event, frontier.size, utc_now(), prev)
            leaf = leaf_hash(line)
            frontier.append(leaf)
            prev = leaf.hex()
            records.append(record)
            lines.append(line)
        data = b"\n".join(lines) + b"\n"
        try:
            storage.write_all(self._log_fd, data)
            os.fsync(self._log_fd)
        except OSError:
            self._tail = None
            with contextlib.suppress(OSError):
                os.ftruncate(self._log_fd, tail.offset)
                os.fsync(self._log_fd)
            raise
        tail.offset += len(data)
        tail.frontier = frontier
        tail.last_leaf = prev
        return records

    # ------------------------------------------------------------------ checkpoints

    def _sync_checkpoints(self) -> None:
        try:
            st = os.stat(self.checkpoints_path)
        except FileNotFoundError:
            if self._ckpt_key != (0, 0):  # no checkpoint yet: the interval runs from the first record
                self._ckpt, self._ckpt_key = None, (0, 0)
                self._ckpt_epoch = self._first_record_epoch()
            return
        if (st.st_ino, st.st_size) == self._ckpt_key:
            return
        with open(self.checkpoints_path, "rb+") as f:
            start = max(0, st.st_size - 65536)
            f.seek(start)
            data = f.read()
            if data and not data.endswith(b"\n"):  # torn checkpoint line: it was never acknowledged
                cut = data.rfind(b"\n")
                if cut < 0 and start > 0:
                    raise AuditWriteError("checkpoints file ends with an over-long incomplete line")
                f.truncate(start + cut + 1)
                os.fsync(f.fileno())
                data = data[: cut + 1]
            found = last_valid(data)
            size = os.fstat(f.fileno()).st_size
        self._ckpt, self._ckpt_key = found, (st.st_ino, size)
        if found is not None:
            self._ckpt_epoch = parse_time(found.time).timestamp()

    def _first_record_epoch(self) -> float:
        try:
            first = os.pread(self._log_fd, 65536, 0).split(b"\n", 1)[0]
            return parse_time(json.loads(first)["time"]).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return time.time()

    def _current_signer(self) -> keys.Signer:
        if self._signer is None or not keys.signer_is_current(self.key_dir, self._signer):
            self._signer = keys.ensure_signer(self.key_dir)
        return self._signer

    def _maybe_checkpoint(self, tail: _Tail) -> None:
        covered = self._ckpt.tree_size if self._ckpt is not None else 0
        pending = tail.frontier.size - covered
        if pending >= self.checkpoint_every or (
            pending > 0 and time.time() - self._ckpt_epoch >= self.checkpoint_interval
        ):
            self._write_checkpoint(tail)

    def _write_checkpoint(self, tail: _Tail, signer: keys.Signer | None = None) -> Checkpoint:
        cp = Checkpoint.create(tail.frontier.size, tail.frontier.root(), signer or self._current_signer())
        created = not self.checkpoints_path.exists()
        fd = os.open(self.checkpoints_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            storage.write_all(fd, cp.to_line())
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if created:
            storage.fsync_dir(self.directory)
        self._ckpt, self._ckpt_key = cp, (st.st_ino, st.st_size)
        self._ckpt_epoch = parse_time(cp.time).timestamp()
        self._save_state(tail)
        return cp

    def _save_state(self, tail: _Tail) -> None:
        """Persist the frontier so that opening a large log does not re-hash it (best effort: a cache)."""
        state = {
            "schema_version": 1,
            "inode": tail.inode,
            "offset": tail.offset,
            "tree_size": tail.frontier.size,
            "frontier": [h.hex() for h in tail.frontier.hashes],
            "last_leaf": tail.last_leaf,
        }
        with contextlib.suppress(OSError):
            storage.atomic_write(self.directory / storage.STATE, canonical(state) + b"\n", 0o600)

    def _seal_on_close(self, tail: _Tail) -> None:
        covered = self._ckpt.tree_size if self._ckpt is not None else 0
        if tail.frontier.size > covered:
            self._write_checkpoint(tail)
        else:
            self._save_state(tail)
