"""The store benchmark runs on both stores and reports what it measured."""

from __future__ import annotations

from pathlib import Path

from benchmarks import replicas
from benchmarks.store_bench import measure
from gateway.stores.pg import PgLedger
from tests.stores.conftest import open_ledger_at


def test_the_charge_latency_benchmark_charges_what_it_reports(store_address: str) -> None:
    open_ledger_at(store_address).close()  # the SQLite schema made before the processes race to make it
    figures = measure(store_address, 20, 2)
    assert set(figures) == {"1 process", "2 processes at once"}
    assert "(20 charges)" in figures["1 process"] and "(20 charges)" in figures["2 processes at once"]
    ledger = open_ledger_at(store_address)
    try:
        assert len(ledger.history()) == 40 and all(h["audited"] for h in ledger.history())
        assert ledger.totals() and isinstance(ledger, PgLedger) == store_address.startswith("postgresql://")
    finally:
        ledger.close()


def test_the_replica_benchmark_measures_every_configuration_and_store(tmp_path: Path, pg_store: str) -> None:
    """benchmarks.replicas at tiny sizes: throughput of one gateway on SQLite, one on PostgreSQL and three replicas
    on PostgreSQL, and the charge latency of both stores, with no failed request."""
    opts = replicas.ReplicaOptions(
        rows=2_000, clients=3, seconds=0.5, charges=10, processes=2, store=pg_store, work=tmp_path, log=lambda _: None
    )
    results = replicas.run(opts)
    assert list(results["throughput"]) == ["1 gateway, SQLite", "1 gateway, PostgreSQL", "3 replicas, PostgreSQL"]
    for label, cells in results["throughput"].items():
        for mode in replicas.MODES:
            assert cells[mode]["requests"] > 0 and cells[mode]["errors"] == 0, (label, mode, cells[mode])
    assert set(results["charge_latency"]) == {"SQLite", "PostgreSQL"}
    for figures in results["charge_latency"].values():
        assert "(10 charges)" in figures["1 process"] and "(10 charges)" in figures["2 processes at once"]
    ledger = open_ledger_at(pg_store)
    try:
        charged = [h for h in ledger.history() if h["principal"] == "bench"]
    finally:
        ledger.close()
    # On PostgreSQL: the cached query computed once, then every uncached request of both configurations.
    throughput = results["throughput"]
    uncached = [cells["uncached"]["requests"] for label, cells in throughput.items() if "PostgreSQL" in label]
    assert len(charged) == 1 + sum(uncached)
    table = replicas.table(results)
    assert "| 3 replicas, PostgreSQL |" in table and "| PostgreSQL | 2 processes at once |" in table
