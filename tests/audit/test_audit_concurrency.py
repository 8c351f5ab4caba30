"""Several processes (each with several threads) appending to one log: nothing lost, everything verifies."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from pathlib import Path

from audit.log import AuditLog
from audit.verify import verify_log

PROCESSES, THREADS, PER_THREAD = 4, 2, 60


def _writer(directory: Path, key_dir: Path, worker: int, events: list[dict], queue) -> None:
    log = AuditLog(directory, key_dir=key_dir, checkpoint_every=25)
    seqs: list[int] = []

    def run(thread: int) -> None:
        for i, event in enumerate(events):
            record = log.append({**event, "request_id": f"w{worker}-t{thread}-{i}"})
            seqs.append(record["seq"])

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    queue.put(seqs)


def test_processes_appending_concurrently_lose_no_record(new_log, make_event) -> None:
    log = new_log(checkpoint_every=25)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    events = [make_event(i) for i in range(PER_THREAD)]
    procs = [ctx.Process(target=_writer, args=(log.directory, log.key_dir, w, events, queue)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    acknowledged = [seq for _ in procs for seq in queue.get(timeout=60)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    total = PROCESSES * THREADS * PER_THREAD
    assert sorted(acknowledged) == list(range(total))  # every acknowledged seq is distinct
    records = log.records()
    assert [r["seq"] for r in records] == list(range(total))
    ids = Counter(r["request_id"] for r in records)
    assert len(ids) == total and set(ids.values()) == {1}
    report = verify_log(log.directory, log.key_dir, strict=True)
    assert report.ok, report.message
    assert report.records == total and report.covered == total and report.checkpoints >= total // 25


def _append_with_inherited(log: AuditLog, events: list[dict]) -> None:
    for event in events:
        log.append(event)


def test_a_log_object_inherited_across_fork_still_locks(new_log, make_event) -> None:
    log = new_log(checkpoint_every=10)
    log.append(make_event(0))  # opens descriptors and takes locks in the parent before forking
    ctx = multiprocessing.get_context("fork")
    events = [make_event(i) for i in range(1, 80)]
    procs = [ctx.Process(target=_append_with_inherited, args=(log, events)) for _ in range(3)]
    for p in procs:
        p.start()
    _append_with_inherited(log, events)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log.close()
    assert [r["seq"] for r in log.records()] == list(range(1 + 4 * 79))
    assert verify_log(log.directory, log.key_dir).ok
