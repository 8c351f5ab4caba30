"""When the log cannot be written durably, append raises AuditWriteError and leaves nothing that breaks it."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from audit.log import AuditLog, AuditWriteError
from audit.verify import verify_log


def test_directory_path_is_a_file(tmp_path: Path, make_event) -> None:
    (tmp_path / "audit").write_text("not a directory")
    log = AuditLog(tmp_path / "audit")
    with pytest.raises(AuditWriteError):
        log.append(make_event(0))


def test_log_file_path_is_a_directory(tmp_path: Path, make_event) -> None:
    (tmp_path / "audit" / "audit.jsonl").mkdir(parents=True)
    log = AuditLog(tmp_path / "audit")
    with pytest.raises(AuditWriteError):
        log.append(make_event(0))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path: Path, make_event) -> None:
    (tmp_path / "audit").mkdir()
    os.chmod(tmp_path / "audit", 0o500)
    try:
        with pytest.raises(AuditWriteError):
            AuditLog(tmp_path / "audit").append(make_event(0))
    finally:
        os.chmod(tmp_path / "audit", 0o700)


def test_fsync_failure_leaves_no_partial_record(new_log, make_event, monkeypatch) -> None:
    log = new_log(checkpoint_every=1000)
    for i in range(3):
        log.append(make_event(i))
    before = log.path.read_bytes()
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(AuditWriteError, match="I/O error"):
        log.append(make_event(3))
    assert log.path.read_bytes() == before  # the unsynced record was cut off again
    monkeypatch.undo()
    assert log.append(make_event(3))["seq"] == 3  # no gap: seq 3 was never acknowledged
    log.close()
    assert verify_log(log.directory, log.key_dir).ok


def test_short_write_then_disk_full_leaves_no_partial_record(new_log, make_event, monkeypatch) -> None:
    log = new_log(checkpoint_every=1000)
    log.append(make_event(0))
    before = log.path.read_bytes()
    real_write = os.write

    def disk_full(fd: int, data) -> int:
        if len(data) > 10:
            return real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(AuditWriteError, match="No space"):
        log.append(make_event(1))
    monkeypatch.undo()
    assert log.path.read_bytes() == before
    assert verify_log(log.directory, log.key_dir).ok
    assert log.append(make_event(1))["seq"] == 1


def test_every_caller_in_a_failed_group_commit_gets_the_error(new_log, make_event, monkeypatch) -> None:
    log = new_log(checkpoint_every=1000)
    log.append(make_event(0))
    gate = threading.Event()

    def failing_fsync(fd: int) -> None:
        gate.wait(5)  # hold the first batch until the others queue up behind it
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    results: list[object] = []

    def worker(i: int) -> None:
        try:
            results.append(log.append(make_event(i)))
        except AuditWriteError as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and all(isinstance(r, AuditWriteError) for r in results)
    monkeypatch.undo()
    assert [r["seq"] for r in log.records()] == [0]


def test_unusable_signing_key_fails_closed_when_a_checkpoint_is_due(tmp_path: Path, make_event) -> None:
    (tmp_path / "keyfile").write_text("not a directory")
    log = AuditLog(tmp_path / "audit", key_dir=tmp_path / "keyfile", checkpoint_every=2)
    log.append(make_event(0))
    with pytest.raises(AuditWriteError, match="checkpoint"):
        log.append(make_event(1))
    # the record itself is durable and chained; the log still verifies (it just has no checkpoint)
    report = verify_log(log.directory, tmp_path / "nokeys")
    assert report.ok and report.records == 2 and report.checkpoints == 0


def test_key_readable_by_others_is_refused(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1)
    log.append(make_event(0))
    os.chmod(log.key_dir / "signing.key", 0o644)
    with pytest.raises(AuditWriteError, match="group or others"):
        new_log(checkpoint_every=1).append(make_event(1))
