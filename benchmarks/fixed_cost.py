"""Where the fixed cost of one uncached query goes: milliseconds per phase of `Bastion.query`, next to raw DuckDB
and the durable writes alone.

    .venv/bin/python -m benchmarks.fixed_cost [--rows 1000000] [--runs 300] [--workloads count ...] [--dir /dev/shm]

Builds the benchmark table (benchmarks/data.py) in a fresh workspace under `--dir` (a temporary directory by
default; a tmpfs such as /dev/shm leaves out the disk, so what remains is the CPU's share), then runs the workload
`--runs` times, each a new SQL text (so planned, charged, audited and computed, never cached), interleaved with raw
DuckDB, with Bastion's measurement statement alone (as its DuckDB engine runs it) and with `DurableSteps` (the writes
one charged query makes durable, alone). Each phase is timed by wrapping
the gateway's own methods for this process only; nested phases are indented and counted in their parent too.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gateway.service as service
import gateway.sql.release as release
from benchmarks import run as bench
from benchmarks.workloads import WORKLOADS, Workload
from gateway.service import Bastion, Context
from gateway.sql import compile as comp
from gateway.sql.plan import plan_query


def _timed(times: dict[str, list[float]], label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[label].append(time.perf_counter() - start)

    return wrapper


def _instrument(bastion: Bastion, times: dict[str, list[float]]) -> tuple[list[str], Callable[[], None]]:
    """Wrap the phases of the query path (instance attributes and module functions of this process only); return
    their labels in the order of the path and a function that puts the originals back."""
    phases: list[tuple[Any, str, str]] = [
        (bastion, "_plan", "plan (parse, plan, bind check)"),
        (service, "bind_check", "  bind check"),
        (bastion.engine, "check", "    engine bind (DESCRIBE)"),
        (service, "price", "price"),
        (bastion.cache, "get", "cache lookup"),
        (bastion.ledger, "charge", "ledger charge (durable)"),
        (bastion.audit_log, "append", "audit append x2 (durable)"),
        (bastion.ledger, "mark_audited", "ledger mark audited"),
        (service, "execute", "execute (statement, noise, post-processing)"),
        (bastion.engine, "rows", "  engine statement"),
        (release.mech, "release_integers", "  OpenDP noise"),
        (release, "_post_process", "  post-processing"),
        (service, "digest", "answer digest"),
        (bastion.cache, "put", "cache write"),
        (bastion.ledger, "spent", "budget read"),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in phases]
    for obj, name, label in phases:
        setattr(obj, name, _timed(times, label, getattr(obj, name)))

    def restore() -> None:
        for obj, name, original in reversed(originals):
            setattr(obj, name, original)

    return [label for _, _, label in phases], restore


def measure(bastion: Bastion, ctx: Context, workload: Workload, runs: int, durable: bench.DurableSteps) -> None:
    """Time `runs` uncached queries of `workload` by phase, interleaved with the references, and print the figures."""
    con = bench.duckdb_engine(bastion).connect()
    engine = bench.duckdb_engine(bastion)
    statement = comp.measurement_query(plan_query(workload.sql(), lambda name: engine.policy(name)[0]))
    fresh = bench.Fresh("sql")
    for _ in range(3):  # warm up
        sql, kwargs = fresh(workload)
        bastion.query(ctx, sql, **kwargs)
    rows = engine.rows  # bound before the phases are wrapped: the reference is not counted as a phase
    references: dict[str, Callable[[], object]] = {
        "raw DuckDB": lambda: con.execute(workload.raw_sql()).fetchall(),
        "Bastion's statement alone": lambda: rows(statement),
        "durable writes alone": lambda: durable(workload),
    }
    times: dict[str, list[float]] = defaultdict(list)
    labels, restore = _instrument(bastion, times)
    whole: dict[str, list[float]] = {name: [] for name in [*references, "Bastion.query"]}
    try:
        for _ in range(runs):
            for name, run in references.items():
                start = time.perf_counter()
                run()
                whole[name].append(time.perf_counter() - start)
            sql, kwargs = fresh(workload)
            start = time.perf_counter()
            if bastion.query(ctx, sql, **kwargs)["cached"]:
                raise RuntimeError("a timed query was answered from the cache")
            whole["Bastion.query"].append(time.perf_counter() - start)
    finally:
        restore()
    raw = statistics.median(whole["raw DuckDB"])
    print(f"{workload.title}, {runs} runs")
    for label, xs in whole.items():
        print(f"  {label:<46} p50 {statistics.median(xs) * 1e3:8.3f} ms  ({statistics.median(xs) / raw:.2f}x raw)")
    print(f"  {'phase':<46} {'ms per query':>12} {'p50 per call':>13}")
    for label in labels:
        xs = times[label]
        print(f"  {label:<46} {sum(xs) / runs * 1e3:12.3f} {statistics.median(xs) * 1e3:13.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--workloads", nargs="+", default=["count"], choices=[w.name for w in WORKLOADS])
    parser.add_argument("--dir", type=Path, default=None, help="where to build the workspace (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        opts = bench.Options(rows=[args.rows], work=Path(tmp), out=Path(tmp), copy_markdown=None, log=lambda _: None)
        settings, _, principal, _ = bench.prepare(opts, args.rows)
        print(f"{args.rows:,} rows, workspace in {Path(tmp).parent}")
        bastion = Bastion(settings)
        durable = bench.DurableSteps(settings.workspace / "floor")
        try:
            ctx = Context(principal, source="benchmark")
            for name in args.workloads:
                measure(bastion, ctx, next(w for w in WORKLOADS if w.name == name), args.runs, durable)
        finally:
            durable.close()
            bastion.close()


if __name__ == "__main__":
    main()
