"""Benchmark of the audit log: durable appends per second, and the time to verify a large log.

Run from the repository root:

    .venv/bin/python benchmarks/audit_bench.py                 # 1,000,000-record verification
    .venv/bin/python benchmarks/audit_bench.py --records 100000 --appends 2000
    .venv/bin/python benchmarks/audit_bench.py --store postgresql://... --records 100000   # the PostgreSQL log

Every append measured is durable (fsync'd, or committed, before it returns). The large log for the verification
benchmark is built with `append_many` in batches of 1,000 records (one fsync or commit per batch), through the same
code path as production appends, and checkpointed every 1,000 records as by default. With `--store` (a migrated
database whose log is empty: every phase appends to its one log) the logs are in PostgreSQL and the verification
exports the log in the file format, then verifies the copy, as `bastion audit verify --store` does; it also times
the readers' copy (what the auditor's events, spend and proofs read) brought up to date after 1,000 more records,
against exporting it whole again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit import keys  # noqa: E402
from audit.log import AuditLog  # noqa: E402
from audit.verify import verify_log  # noqa: E402

STORE: str | None = None  # a PostgreSQL address: the logs are its one log (set by --store)


def open_log(directory: Path) -> Any:
    """The log of a benchmark phase: a directory, or the PostgreSQL store's log (keys beside the temp root)."""
    if STORE is None:
        return AuditLog(directory)
    from gateway.stores.pg_audit import PgAuditLog

    return PgAuditLog(STORE, key_dir=directory.parents[1] / "keys")


def event(i: int) -> dict:
    return {
        "event": "query",
        "actor": {"principal": f"analyst{i % 17}", "role": "analyst", "token_id": f"t_{i % 97:04x}"},
        "source": "127.0.0.1",
        "request_id": f"{i:08x}-5b6d-4e2f-9a7b-1c2d3e4f5a6b",
        "dataset": "visits",
        "request": {"sql": "SELECT sex, COUNT(*) FROM visits GROUP BY sex"},
        "decision": "allowed",
        "reason": "ok",
        "cost": {"epsilon": 0.1, "delta": 0.0},
        "budget_before": {"epsilon": 3.0, "delta": 1e-6},
        "budget_after": {"epsilon": 2.9, "delta": 1e-6},
        "release_digest": "a3f1" * 16,
        "phase": "released",
    }


def bench_sequential(root: Path, n: int) -> float:
    log = open_log(root / "seq" / "audit")
    log.append(event(0))  # open files and create the key outside the timing
    start = time.perf_counter()
    for i in range(n):
        log.append(event(i))
    rate = n / (time.perf_counter() - start)
    log.close()
    return rate


def bench_threads(root: Path, n: int, threads: int) -> float:
    log = open_log(root / "threads" / "audit")
    log.append(event(0))
    per = n // threads

    def run() -> None:
        for i in range(per):
            log.append(event(i))

    workers = [threading.Thread(target=run) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    rate = per * threads / (time.perf_counter() - start)
    log.close()
    return rate


def _process_worker(directory: Path, per: int, ready, go) -> None:
    log = open_log(directory)
    log.append(event(0))
    ready.set()
    go.wait()
    for i in range(per):
        log.append(event(i))
    log.close()


def bench_processes(root: Path, n: int, processes: int) -> float:
    directory = root / "procs" / "audit"
    first = open_log(directory)
    first.append(event(0))
    first.close()
    ctx = multiprocessing.get_context("fork")
    per = n // processes
    go = ctx.Event()
    readies = [ctx.Event() for _ in range(processes)]
    procs = [ctx.Process(target=_process_worker, args=(directory, per, r, go)) for r in readies]
    for p in procs:
        p.start()
    for r in readies:
        r.wait()
    start = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
    return per * processes / (time.perf_counter() - start)


def build_large(directory: Path, n: int) -> float:
    log = open_log(directory)
    start = time.perf_counter()
    batch = 1_000
    for lo in range(0, n, batch):
        log.append_many([event(i) for i in range(lo, min(n, lo + batch))])
    log.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--appends", type=int, default=5000, help="durable appends per append benchmark")
    parser.add_argument("--records", type=int, default=1_000_000, help="records in the verification benchmark")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the logs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--store", default=None, help="a migrated PostgreSQL store whose log to measure instead")
    args = parser.parse_args()
    global STORE
    STORE = args.store

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        results: dict[str, float] = {}
        results["appends_per_s_1_thread"] = bench_sequential(root, args.appends)
        print(f"durable appends/s, 1 process 1 thread : {results['appends_per_s_1_thread']:10,.0f}", flush=True)
        results["appends_per_s_4_threads"] = bench_threads(root, args.appends, 4)
        print(f"durable appends/s, 1 process 4 threads: {results['appends_per_s_4_threads']:10,.0f}", flush=True)
        results["appends_per_s_2_processes"] = bench_processes(root, args.appends, 2)
        print(f"durable appends/s, 2 processes        : {results['appends_per_s_2_processes']:10,.0f}", flush=True)
        results["appends_per_s_4_processes"] = bench_processes(root, args.appends, 4)
        print(f"durable appends/s, 4 processes        : {results['appends_per_s_4_processes']:10,.0f}", flush=True)

        large = root / "large" / "audit"
        build = build_large(large, args.records)
        ring = None
        if STORE is not None:
            log = open_log(large)
            start = time.perf_counter()
            log.export(large)
            results["export_s"] = time.perf_counter() - start
            # What the auditor's reads cost: the readers' copy made whole once, then brought up to date after
            # another 1,000 records (appended in one batch), against a fresh whole copy after them.
            log.snapshot()
            log.append_many([event(args.records + i) for i in range(1000)])
            start = time.perf_counter()
            log.snapshot()
            results["reader_copy_update_s"] = time.perf_counter() - start
            start = time.perf_counter()
            log.snapshot(fresh=True)
            results["reader_copy_whole_s"] = time.perf_counter() - start
            log.close()
            print(
                f"readers' copy after 1,000 more records : {results['reader_copy_update_s']:10.3f} s "
                f"(whole again: {results['reader_copy_whole_s']:.2f} s)",
                flush=True,
            )
            ring = keys.Keyring.load(root / "keys")
            print(f"export from PostgreSQL                 : {results['export_s']:10.2f} s", flush=True)
        size = (large / "audit.jsonl").stat().st_size
        print(f"built {args.records:,} records ({size / 1e6:,.0f} MB) in {build:.1f} s", flush=True)
        start = time.perf_counter()
        report = verify_log(large, ring)
        results["verify_s"] = time.perf_counter() - start
        assert report.ok and report.records >= args.records, report.message
        print(
            f"verify_log, {report.records:,} records       : {results['verify_s']:10.2f} s "
            f"({report.checkpoints} checkpoints)",
            flush=True,
        )
        start = time.perf_counter()
        report = verify_log(large, ring, strict=True)
        results["verify_strict_s"] = time.perf_counter() - start
        assert report.ok, report.message
        print(f"verify_log strict, {report.records:,} records: {results['verify_strict_s']:10.2f} s", flush=True)
        results.update(records=args.records, appends=args.appends, cpus=os.cpu_count() or 0)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
