"""The files of a log directory and the low-level I/O every writer and reader of them shares."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOG = "audit.jsonl"  # the records, one canonical JSON object per line
CHECKPOINTS = "checkpoints.jsonl"  # signed checkpoints, one per line
LOCK = "audit.lock"  # flock'ed by every writer (exclusive) and by readers taking a snapshot (shared)
STATE = "audit.state"  # the writer's cached Merkle frontier; a cache only, never trusted by verification
TORN = "audit.torn"  # bytes of torn final records removed by a repair, kept for forensics


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` durably: write a temporary file, fsync it, rename it, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Snapshot:
    """Sizes of the log and checkpoints files at a moment when no append was in progress."""

    log_size: int
    checkpoints_size: int


def snapshot(directory: Path) -> Snapshot:
    """Take the shared lock briefly so that the sizes fall on record boundaries, then release it.

    Readers then read only up to these sizes, so a concurrent append is never seen half-written. Without write
    access to a directory that has no lock file yet, the sizes are read unlocked.
    """
    fd = -1
    with contextlib.suppress(OSError):
        fd = os.open(directory / LOCK, os.O_RDONLY)
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_SH)
        return Snapshot(_size(directory / LOG), _size(directory / CHECKPOINTS))
    finally:
        if fd >= 0:
            os.close(fd)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def read_prefix(path: Path, size: int) -> bytes:
    if size == 0:
        return b""
    with open(path, "rb") as f:
        return f.read(size)
