"""Where the fixed cost of one uncached query goes: milliseconds per phase of `Bastion.query`, next to raw DuckDB
and the durable writes alone.

    .venv/bin/python -m benchmarks.fixed_cost [--rows 1000000] [--runs 300] [--workload count] [--dir /dev/shm/x]

Builds the benchmark table (benchmarks/data.py) in a fresh workspace under `--dir` (a temporary directory by
default; a tmpfs such as /dev/shm leaves out the disk, so what remains is the CPU's share), then runs the workload
`--runs` times, each a new SQL text (so planned, charged, audited and computed, never cached), interleaved with raw
DuckDB and with `DurableSteps` (the writes one charged query makes durable, alone). Each phase is timed by wrapping
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
from benchmarks.workloads import WORKLOADS
from gateway.service import Bastion, Context


def _timed(times: dict[str, list[float]], label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[label].append(time.perf_counter() - start)

    return wrapper


def _instrument(bastion: Bastion, times: dict[str, list[float]]) -> list[str]:
    """Wrap the phases of the query path (instance attributes and module functions of this process only); return
    their labels in the order of the path."""
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
    for obj, name, label in phases:
        setattr(obj, name, _timed(times, label, getattr(obj, name)))
    return [label for _, _, label in phases]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--workload", default="count", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--dir", type=Path, default=None, help="where to build the workspace (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        opts = bench.Options(rows=[args.rows], work=Path(tmp), out=Path(tmp), copy_markdown=None, log=lambda _: None)
        settings, _, principal, _ = bench.prepare(opts, args.rows)
        bastion = Bastion(settings)
        durable = bench.DurableSteps(settings.workspace / "floor")
        try:
            ctx = Context(principal, source="benchmark")
            con = bench.duckdb_engine(bastion).connect()
            workload = next(w for w in WORKLOADS if w.name == args.workload)
            fresh = bench.Fresh("sql")
            for _ in range(5):  # warm up
                sql, kwargs = fresh(workload)
                bastion.query(ctx, sql, **kwargs)
            times: dict[str, list[float]] = defaultdict(list)
            labels = _instrument(bastion, times)
            whole: dict[str, list[float]] = {"raw DuckDB": [], "Bastion.query": [], "durable writes alone": []}
            for _ in range(args.runs):
                start = time.perf_counter()
                con.execute(workload.raw_sql()).fetchall()
                whole["raw DuckDB"].append(time.perf_counter() - start)
                sql, kwargs = fresh(workload)
                start = time.perf_counter()
                if bastion.query(ctx, sql, **kwargs)["cached"]:
                    raise RuntimeError("a timed query was answered from the cache")
                whole["Bastion.query"].append(time.perf_counter() - start)
                start = time.perf_counter()
                durable(workload)
                whole["durable writes alone"].append(time.perf_counter() - start)
        finally:
            durable.close()
            bastion.close()
        raw = statistics.median(whole["raw DuckDB"])
        print(f"{workload.title}, {args.rows:,} rows, {args.runs} runs, workspace on {Path(tmp).parent}")
        for label, xs in whole.items():
            print(f"{label:<48} p50 {statistics.median(xs) * 1e3:7.3f} ms  ({statistics.median(xs) / raw:.2f}x raw)")
        print(f"{'phase':<48} {'ms per query':>12} {'p50 per call':>13}")
        for label in labels:
            xs = times[label]
            print(f"{label:<48} {sum(xs) / args.runs * 1e3:12.3f} {statistics.median(xs) * 1e3:13.3f}")


if __name__ == "__main__":
    main()
