"""AuditLog: record format, durability contract, checkpoint scheduling, group commit and O(1) appends."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import threading
import time
from pathlib import Path

import pytest

from audit import storage
from audit.checkpoint import Checkpoint
from audit.errors import AuditRecordError
from audit.keys import Keyring
from audit.log import AuditLog, AuditWriteError
from audit.merkle import leaf_hash
from audit.record import GENESIS, SCHEMA_VERSION
from audit.verify import verify_log


def canonical_line(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_append_returns_the_stored_canonical_record(new_log, make_event) -> None:
    log = new_log()
    assert not log.directory.exists()  # files are created lazily
    first = log.append(make_event(0))
    second = log.append(make_event(1, principal="bob"))
    assert first["seq"] == 0 and second["seq"] == 1
    assert first["schema_version"] == SCHEMA_VERSION
    assert dt.datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo == dt.UTC
    assert {k: first[k] for k in make_event(0)} == make_event(0)
    assert log.records() == [first, second]
    lines = log.path.read_bytes().split(b"\n")
    assert lines[2] == b"" and len(lines) == 3
    assert lines[0] == canonical_line(first) and lines[1] == canonical_line(second)
    # the hash chain: prev_hash is the RFC 6962 leaf hash of the previous record's bytes
    assert first["prev_hash"] == GENESIS
    assert second["prev_hash"] == leaf_hash(lines[0]).hex()


def test_events_are_normalised_to_plain_json(new_log) -> None:
    log = new_log()
    event = {
        "event": "query",
        "cost": {"epsilon": float("inf"), "delta": float("nan")},
        "when": dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "amount": decimal.Decimal("0.10"),
        "columns": ("age", "sex"),
        "tags": {"b", "a"},
        "raw": b"\x01\x02",
        "sql": "SELECT '\ud800'",  # a lone surrogate, which UTF-8 cannot encode
        7: "int key",
    }
    record = log.append(event)
    assert record["cost"] == {"epsilon": "Infinity", "delta": "NaN"}
    assert record["when"] == "2025-01-02T03:04:05+00:00"
    assert record["amount"] == "0.10"
    assert record["columns"] == ["age", "sex"] and record["tags"] == ["a", "b"]
    assert record["raw"] == "0102" and record["7"] == "int key"
    assert record["sql"] == "SELECT '\\ud800'"
    assert log.records() == [record]
    assert verify_log(log.directory, log.key_dir, strict=True).ok


@pytest.mark.parametrize(
    "event", [{"event": "query", "seq": 5}, {"event": "query", "prev_hash": "x"}, {"actor": "a"}, {"event": ""}, []]
)
def test_invalid_events_are_refused_before_anything_is_written(new_log, make_event, event) -> None:
    log = new_log()
    log.append(make_event(0))
    before = log.path.read_bytes()
    with pytest.raises(AuditRecordError) as info:
        log.append_many([make_event(1), event])
    assert isinstance(info.value, AuditWriteError) and isinstance(info.value, ValueError)
    assert log.path.read_bytes() == before


def test_append_many_is_one_atomic_batch(new_log, make_event) -> None:
    log = new_log()
    records = log.append_many([make_event(i) for i in range(5)])
    assert [r["seq"] for r in records] == list(range(5))
    assert log.append_many([]) == []
    assert log.records() == records


def test_checkpoint_every_n_records_and_on_close(new_log, make_event) -> None:
    log = new_log(checkpoint_every=5, checkpoint_interval=3600)
    for i in range(12):
        log.append(make_event(i))
    sizes = [json.loads(x)["tree_size"] for x in log.checkpoints_path.read_bytes().splitlines()]
    assert sizes == [5, 10]
    log.close()
    sizes = [json.loads(x)["tree_size"] for x in log.checkpoints_path.read_bytes().splitlines()]
    assert sizes == [5, 10, 12]
    log.close()  # nothing new: no extra checkpoint
    assert len(log.checkpoints_path.read_bytes().splitlines()) == 3
    report = verify_log(log.directory, log.key_dir)
    assert report.ok and report.checkpoints == 3 and report.covered == 12


def test_checkpoint_after_interval_is_checked_on_append(new_log, make_event) -> None:
    log = new_log(checkpoint_every=1000, checkpoint_interval=0.2)
    log.append(make_event(0))
    assert log.latest_checkpoint() is None
    time.sleep(0.25)
    log.append(make_event(1))
    cp = log.latest_checkpoint()
    assert cp is not None and cp.tree_size == 2


def test_explicit_checkpoint_and_export(new_log, make_event, tmp_path: Path) -> None:
    log = new_log(checkpoint_every=1000)
    for i in range(7):
        log.append(make_event(i))
    cp = log.checkpoint()
    assert isinstance(cp, Checkpoint) and cp.tree_size == 7
    assert log.latest_checkpoint() == cp
    log.append(make_event(7))
    exported = log.export_checkpoint(tmp_path / "offsite")  # an existing directory or a file path
    assert exported.parent == tmp_path / "offsite"
    anchor = json.loads(exported.read_text())
    assert anchor["tree_size"] == 8  # the export covers every record written so far
    report = verify_log(log.directory, log.key_dir, trusted_checkpoint=exported)
    assert report.ok, report.message
    assert log.verify()[0]


def test_key_dir_defaults_next_to_the_log_and_must_be_outside_it(tmp_path: Path, make_event) -> None:
    log = AuditLog(tmp_path / "audit")
    log.append(make_event(0))
    log.close()
    assert (tmp_path / "keys" / "signing.key").exists()
    assert not any(p.suffix == ".key" for p in (tmp_path / "audit").iterdir())
    assert len(Keyring.load(tmp_path / "keys")) == 1
    assert verify_log(tmp_path / "audit").ok  # default keyring location
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "audit", key_dir=tmp_path / "audit" / "keys")


def test_concurrent_threads_share_fsyncs_and_lose_nothing(new_log, make_event, monkeypatch) -> None:
    log = new_log(checkpoint_every=100)
    fsyncs = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        time.sleep(0.0005)  # a slower disk makes batching visible on any machine
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    seqs: list[int] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(50):
                seqs.append(log.append(make_event(i, principal=f"p{t}"))["seq"])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(seqs) == list(range(400))
    assert len(fsyncs) < 400  # group commit: fewer fsyncs than appends
    monkeypatch.undo()
    log.close()
    assert verify_log(log.directory, log.key_dir).ok


def _count_reads(monkeypatch) -> list[int]:
    read: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    return read


def test_appends_do_not_reread_the_log(new_log, make_event, monkeypatch) -> None:
    log = new_log(checkpoint_every=50)
    for i in range(120):
        log.append(make_event(i))
    read = _count_reads(monkeypatch)
    for i in range(30):
        log.append(make_event(i))
    assert sum(read) == 0
    # another writer appends: this one reads only what is new
    other = new_log(checkpoint_every=50)
    other.append(make_event(999))
    read.clear()
    size_before = log.path.stat().st_size
    log.append(make_event(1000))
    assert 0 < sum(read) < 2000 < size_before


def test_reopening_uses_the_saved_frontier_and_survives_a_bad_one(new_log, make_event, monkeypatch) -> None:
    log = new_log(checkpoint_every=50)
    for i in range(205):
        log.append(make_event(i))
    log.close()  # saves the frontier at 205
    read = _count_reads(monkeypatch)
    again = new_log(checkpoint_every=50)
    assert again.append(make_event(205))["seq"] == 205
    assert sum(read) < 10_000 < log.path.stat().st_size // 10
    again.close()
    monkeypatch.undo()
    (log.directory / storage.STATE).write_text('{"inode": 1, "offset": 5, "tree_size": 1}')
    third = new_log(checkpoint_every=50)
    assert third.append(make_event(206))["seq"] == 206  # a bad saved frontier: falls back to a full scan
    third.close()
    assert verify_log(log.directory, log.key_dir).ok


def test_stale_state_from_a_replaced_file_is_not_trusted(new_log, make_event) -> None:
    log = new_log()
    for i in range(10):
        log.append(make_event(i))
    log.close()
    state = json.loads((log.directory / storage.STATE).read_text())
    state["last_leaf"] = "ab" * 32  # does not match the record at `offset`
    (log.directory / storage.STATE).write_text(json.dumps(state))
    again = new_log()
    assert again.append(make_event(10))["prev_hash"] == leaf_hash(log.path.read_bytes().split(b"\n")[9]).hex()
    again.close()
    assert verify_log(log.directory, log.key_dir).ok


def test_context_manager_checkpoints_on_exit(new_log, make_event) -> None:
    with new_log(checkpoint_every=1000) as log:
        for i in range(3):
            log.append(make_event(i))
    cp = log.latest_checkpoint()
    assert cp is not None and cp.tree_size == 3
    log.append(make_event(3))  # usable again after close
    assert log.records()[-1]["seq"] == 3


def test_checkpoint_interval_counts_from_the_first_record_across_instances(new_log, make_event) -> None:
    new_log(checkpoint_interval=0.2).append(make_event(0))
    time.sleep(0.25)
    log = new_log(checkpoint_interval=0.2)  # e.g. a new process: the interval did not restart
    log.append(make_event(1))
    cp = log.latest_checkpoint()
    assert cp is not None and cp.tree_size == 2
