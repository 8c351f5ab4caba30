"""The store benchmark runs on both stores and reports what it measured."""

from __future__ import annotations

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
