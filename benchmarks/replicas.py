"""Query throughput of one gateway on SQLite, one on PostgreSQL and three replicas on PostgreSQL, and the charge
latency of each store.

    .venv/bin/python -m benchmarks.replicas --store postgresql://... [--rows 100000] [--clients 8] [--seconds 10]

For each configuration: real `bastion serve` processes on 127.0.0.1 (benchmarks.run's `server`) over one workspace
with the benchmark table registered (benchmarks.run's `prepare`), and `clients` concurrent HTTP clients (threads
with the Python client, spread over the replicas in turn) sending the COUNT(*) workload for `seconds`: cached (the
same query again, answered from the release cache) and uncached (a new query text each time, planned, charged,
computed and audited). Then the charge latency on each store, from one process and from `processes` at once
(benchmarks.store_bench's `measure`). `--store` is a PostgreSQL database this benchmark may write to (it is
migrated first; runs charge a principal and datasets of their own); without it only SQLite is measured.
The replicas share the workspace, so their audit log is the workspace's file log, as for replicas on one host.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import store_bench
from benchmarks.run import Fresh, Options, prepare, server, throughput

MODES = ("uncached", "cached")


@dataclass
class ReplicaOptions:
    rows: int = 100_000
    clients: int = 8
    seconds: float = 10.0
    max_requests: int = 50_000
    charges: int = 2000
    processes: int = 4
    store: str | None = None
    work: Path | None = None  # default: a temporary directory, removed afterwards
    log: Callable[[str], None] = print


def _configurations(store: str | None) -> list[tuple[str, str | None, int]]:
    """(label, store or None for SQLite, replicas)"""
    configs: list[tuple[str, str | None, int]] = [("1 gateway, SQLite", None, 1)]
    if store:
        configs += [("1 gateway, PostgreSQL", store, 1), ("3 replicas, PostgreSQL", store, 3)]
    return configs


def _workspace(opts: ReplicaOptions, work: Path, store: str | None) -> tuple[Path, str]:
    """A workspace with the benchmark table registered, and an analyst token on the store it is served from."""
    run_opts = Options(rows=[opts.rows], work=work, log=lambda _: None)
    settings, token, _, _ = prepare(run_opts, opts.rows)
    if store:
        from gateway.stores.pg import migrate
        from gateway.stores.pg_tokens import PgTokenStore

        migrate(store)
        tokens = PgTokenStore(store)
        try:
            token, _ = tokens.create("bench", "analyst")
        finally:
            tokens.close()
    return settings.workspace, token


def run(opts: ReplicaOptions) -> dict[str, Any]:
    """Throughput per configuration and charge latency per store; returns them (and logs each as it comes)."""
    results: dict[str, Any] = {"rows": opts.rows, "clients": opts.clients, "throughput": {}, "charge_latency": {}}
    with contextlib.ExitStack() as stack:
        work = opts.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bastion-replicas-")))
        workspaces: dict[str | None, tuple[Path, str]] = {}
        fresh = Fresh()  # one for the whole run: a query text new on one store is new on the others too
        for label, store, replicas in _configurations(opts.store):
            if store not in workspaces:
                workspaces[store] = _workspace(opts, work / ("postgresql" if store else "sqlite"), store)
            workspace, token = workspaces[store]
            with contextlib.ExitStack() as gateways:
                urls = [
                    gateways.enter_context(server(workspace, work / f"server-{i}.log", store=store))[0]
                    for i in range(replicas)
                ]
                run_opts = Options(
                    rows=[opts.rows],
                    clients=opts.clients,
                    throughput_seconds=opts.seconds,
                    throughput_max_requests=opts.max_requests,
                    log=lambda _: None,
                )
                measured = throughput(run_opts, urls, token, fresh)
            results["throughput"][label] = {mode: measured[mode] for mode in MODES}
            opts.log(f"{label}: " + ", ".join(f"{m} {_qps(results['throughput'][label][m])}" for m in MODES))
        stores = [("SQLite", str(work / "charges.sqlite"))] + ([("PostgreSQL", opts.store)] if opts.store else [])
        for name, address in stores:
            if name == "SQLite":
                store_bench.open_ledger(address).close()  # the schema made before the processes race to make it
            results["charge_latency"][name] = store_bench.measure(address, opts.charges, opts.processes)
            for label, figures in results["charge_latency"][name].items():
                opts.log(f"{name} charge latency, {label}: {figures}")
    return results


def _qps(cell: dict[str, Any]) -> str:
    p50 = cell["p50_ms"]
    return f"{cell['qps']:.0f} q/s (p50 {p50:.1f} ms)" if p50 is not None else f"{cell['qps']:.0f} q/s"


def table(results: dict[str, Any]) -> str:
    """The figures as Markdown tables."""
    lines = [
        f"Throughput, COUNT(*) on {results['rows']:,} rows, {results['clients']} concurrent clients:",
        "",
        "| configuration | uncached | cached | errors |",
        "|---|---:|---:|---:|",
    ]
    for label, cells in results["throughput"].items():
        errors = sum(cells[m]["errors"] for m in MODES)
        lines.append(f"| {label} | {_qps(cells['uncached'])} | {_qps(cells['cached'])} | {errors} |")
    lines += ["", "Charge latency (charge, then mark audited):", "", "| store | processes | figures |", "|---|---|---|"]
    for store, figures in results["charge_latency"].items():
        for label, text in figures.items():
            lines.append(f"| {store} | {label} | {text} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> ReplicaOptions:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="a PostgreSQL database to write to (default: SQLite only)")
    p.add_argument("--rows", type=int, default=100_000, help="rows of the benchmark table")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per throughput measurement")
    p.add_argument("--charges", type=int, default=2000, help="charges timed per store")
    p.add_argument("--processes", type=int, default=4, help="processes charging at once")
    p.add_argument("--work", type=Path, help="data and workspaces (default: a temporary directory)")
    a = p.parse_args(argv)
    return ReplicaOptions(
        rows=a.rows,
        clients=a.clients,
        seconds=a.seconds,
        charges=a.charges,
        processes=a.processes,
        store=a.store,
        work=a.work,
    )


def main(argv: list[str] | None = None) -> None:
    results = run(parse_args(argv))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
