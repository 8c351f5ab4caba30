"""Charge latency on each ledger store: milliseconds per charge (the charge transaction, then marking it audited, as
one request does), p50 and p99, from one process and from several at once.

    .venv/bin/python -m benchmarks.store_bench [--charges 2000] [--processes 4] [--store postgresql://...]

Without `--store` it measures the SQLite ledger in a temporary directory (`--dir`, e.g. /dev/shm to leave out the
disk). With `--store` it measures that PostgreSQL database, which must be migrated (`bastion store migrate`); each
run charges a dataset of its own name, so runs do not meet. Every charge is on one dataset, so concurrent
processes contend for its lock, as replicas do.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from gateway.stores.base import LedgerStore
from gateway.stores.ledger import Ledger
from policies.accountant import PrivacyLoss
from policies.schema import Budget

BUDGET = Budget(epsilon=1e6, delta=1e-3)


def open_ledger(address: str) -> LedgerStore:
    if address.startswith("postgresql://"):
        from gateway.stores.pg import PgLedger

        return PgLedger(address)
    return Ledger(address)


def _charges(address: str, dataset: str, principal: str, n: int, go: Any, out: Any) -> None:
    ledger = open_ledger(address)
    ledger.owner()
    if go is not None:
        go.wait(120)
    times = []
    for i in range(n):
        start = time.perf_counter()
        charge = ledger.charge(
            principal=principal,
            dataset=dataset,
            cost=PrivacyLoss(0.001),
            per_principal=BUDGET,
            total=BUDGET,
            request_id=f"{principal}-{i}",
        )
        ledger.mark_audited([charge.id])
        times.append(time.perf_counter() - start)
    ledger.close()
    out.put(times)


def _figures(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms ({len(ms)} charges)"


def measure(address: str, charges: int, processes: int) -> dict[str, str]:
    dataset = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    _charges(address, dataset, "solo", charges, None, out)
    results = {"1 process": _figures(out.get())}
    go = ctx.Barrier(processes)
    per = max(charges // processes, 1)
    procs = [ctx.Process(target=_charges, args=(address, dataset, f"p{i}", per, go, out)) for i in range(processes)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    merged = [t for _ in procs for t in out.get(timeout=600)]
    for p in procs:
        p.join(60)
    wall = time.perf_counter() - started
    results[f"{processes} processes at once"] = _figures(merged) + f", {len(merged) / wall:.0f} charges/s with start-up"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--charges", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--store", help="a migrated PostgreSQL database (default: a SQLite ledger in --dir)")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        address = args.store or str(Path(tmp) / "ledger.sqlite")
        store = "PostgreSQL" if args.store else "SQLite"
        for label, figures in measure(address, args.charges, args.processes).items():
            print(f"{store}, {label}: {figures}")


if __name__ == "__main__":
    main()
