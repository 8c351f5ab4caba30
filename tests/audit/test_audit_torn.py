"""A crash in the middle of an append leaves a torn final record: reported as such, and repaired safely."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os

import pytest

from audit import storage
from audit.log import AuditWriteError
from audit.verify import verify_log


def _fill(log, make_event, n: int) -> None:
    for i in range(n):
        log.append(make_event(i))


def test_torn_final_record_is_reported_precisely(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000)
    _fill(log, make_event, 10)
    with open(log.path, "ab") as f:
        f.write(b'{"actor":{"principal":"alice","ro')  # an append cut short: no newline
    report = verify_log(log.directory, log.key_dir)
    assert report.status == "torn_tail" and not report.ok
    assert report.torn_line == 11 and report.first_bad == 10 and report.first_bad_line == 11
    assert report.message.startswith("torn final record at line 11")
    assert report.problems == [] and report.records == 10


def test_next_append_repairs_a_torn_tail_and_records_the_repair(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000)
    _fill(log, make_event, 10)
    torn = b'{"actor":{"principal":"alice","ro'
    with open(log.path, "ab") as f:
        f.write(torn)
    writer = new_log(checkpoint_every=1000)  # e.g. the restarted gateway
    record = writer.append(make_event(10))
    assert record["seq"] == 11
    repair = writer.records()[10]
    assert repair["event"] == "log_repaired" and repair["reason"] == "torn_final_record"
    assert repair["torn_line"] == 11 and repair["torn_bytes"] == len(torn)
    assert repair["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    saved = json.loads((log.directory / storage.TORN).read_text())
    assert base64.b64decode(saved["data"]) == torn and saved["line"] == 11
    writer.close()
    report = verify_log(log.directory, log.key_dir)
    assert report.ok, report.message
    assert report.records == 12


def test_a_complete_but_garbled_final_line_is_a_torn_record(new_log, make_event) -> None:
    """After a power loss the file can end with a full line of zeros: torn, not tampering."""
    log = new_log(checkpoint_every=1000)
    _fill(log, make_event, 6)
    with open(log.path, "ab") as f:
        f.write(b"\x00" * 300 + b"\n")
    report = verify_log(log.directory, log.key_dir)
    assert report.status == "torn_tail" and report.torn_line == 7 and report.records == 6
    assert new_log(checkpoint_every=1000).append(make_event(6))["seq"] == 7
    assert verify_log(log.directory, log.key_dir).ok


def test_a_garbled_line_in_the_middle_is_tampering(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000)
    _fill(log, make_event, 6)
    lines = log.path.read_bytes().split(b"\n")[:-1]
    lines[2] = b"\x00" * 50
    log.path.write_bytes(b"".join(x + b"\n" for x in lines))
    report = verify_log(log.directory, log.key_dir)
    assert report.status == "tampered" and report.first_bad == 2


def test_writer_refuses_to_append_to_a_log_cut_behind_its_checkpoint(new_log, make_event) -> None:
    log = new_log(checkpoint_every=5)
    _fill(log, make_event, 10)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-30])  # record 9 was checkpointed, so this is not a crash
    with pytest.raises(AuditWriteError, match="corrupt|truncated"):
        new_log(checkpoint_every=5).append(make_event(10))
    assert log.path.read_bytes() == data[:-30]


def test_torn_checkpoint_line_is_ignored_and_cut_by_the_writer(new_log, make_event) -> None:
    log = new_log(checkpoint_every=5)
    _fill(log, make_event, 5)
    with open(log.checkpoints_path, "ab") as f:
        f.write(b'{"key_id":"abc","root_')
    report = verify_log(log.directory, log.key_dir)
    assert report.ok and "torn final checkpoint line 2" in report.message
    writer = new_log(checkpoint_every=5)
    _fill(writer, make_event, 5)
    assert all(line.endswith(b"}") for line in log.checkpoints_path.read_bytes().splitlines())
    report = verify_log(log.directory, log.key_dir)
    assert report.ok and report.checkpoints == 2


def _crash_mid_append(directory, key_dir, events) -> None:
    """Child process: append normally, then die halfway through writing a record."""
    from audit.log import AuditLog

    log = AuditLog(directory, key_dir=key_dir, checkpoint_every=1000)
    for event in events[:-1]:
        log.append(event)

    def half_then_die(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        os._exit(17)

    storage.write_all = half_then_die
    log.append(events[-1])


def test_process_killed_mid_append(new_log, make_event, tmp_path) -> None:
    log = new_log(checkpoint_every=1000)
    events = [make_event(i) for i in range(6)]
    proc = multiprocessing.get_context("fork").Process(
        target=_crash_mid_append, args=(log.directory, log.key_dir, events)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == 17
    report = verify_log(log.directory, log.key_dir)
    assert report.status == "torn_tail" and report.torn_line == 6
    assert log.append(make_event(6))["seq"] == 6  # after the repair record at 5
    log.close()
    assert verify_log(log.directory, log.key_dir).ok
