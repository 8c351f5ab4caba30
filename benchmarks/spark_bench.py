"""Bastion on Spark against raw Spark SQL (the floor), Tumult Analytics (the peer on Spark) and Bastion on DuckDB.

    .venv/bin/python -m benchmarks.spark_bench --rows 10000000 50000000 --tumult-python PEER/bin/python
    .venv/bin/python -m benchmarks.spark_bench --rows 200000 --reps 3 --tumult-reps 1   # a smoke run

The peer's environment (Tumult Analytics pins versions the project does not use; on Python 3.12 it takes PySpark
4): `python3.12 -m venv PEER && PEER/bin/pip install tmlt.analytics==0.21.0 pyspark==4.0.1`.

For each table size: generate the table in chunks (numpy, fixed seed, one Parquet file; never all rows in memory),
register it with Bastion on Spark (and, up to --duckdb-max-rows, with Bastion on DuckDB), then time every
workload with, interleaved repetition by repetition so that all share the machine's conditions:

- bastion_spark:  `Bastion.query` in process on the Spark engine (plan, ledger charge, audit, noise, release),
- raw_spark:      the statements Bastion compiles for the query (`gateway.sql.compile`, generated in the Spark
                  dialect) run with `spark.sql(...).collect()` on the same bounded table, in the same session: the
                  floor (no privacy, nothing but the engine's own work),
- plain_spark:    the analyst's SQL itself over the same bounded table (what Spark costs for the natural query),
- bastion_duckdb: `Bastion.query` in process on the DuckDB engine, and raw_duckdb its compiled statements.

Every Bastion query is new, so it is charged and computed, never served from the cache: by default a distinct SQL
text whose compiled statements are new too (an always-true condition with a new literal: planned, bound, analysed
and run from scratch, and the raw engines run the same kind of new statements), with --fresh epsilon the same text
at a new ε (the same compiled statements: Bastion's Spark engine reuses the analysed statement and with it the
shuffle stages Spark already materialised, so this measures a repeated statement). Then
Tumult Analytics runs in its own environment (a subprocess, after the rest, so that the two Spark drivers never
compete), on the same master and Spark settings, over the unbounded source with the same privacy unit
(AddRowsWithID), the same k (MaxRowsPerID), bounds and public key domains; its session is built
once and each query's evaluation is timed up to collecting its answer.

Writes `<work>/spark_results.json` and the measured part of `benchmarks/SPARK.md` (between its markers; the
rest of that file is left as it is), unless --no-markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import data
from benchmarks.run import machine, stats
from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.sql import compile as comp
from gateway.sql.plan import plan_query
from gateway.stores.tokens import Principal
from policies.schema import Policy, bounded_table, load_policy

HERE = Path(__file__).resolve().parent
DEFAULT_WORK = Path(tempfile.gettempdir()) / "bastion-spark-bench"
ENGINES = ("bastion_spark", "raw_spark", "plain_spark", "bastion_duckdb", "raw_duckdb")
RATIO_TARGET = 1.2  # Bastion on Spark p50 ≤ 1.2 × raw Spark SQL p50
BEGIN, END = "<!-- measured: begin -->", "<!-- measured: end -->"
REGION_WEIGHTS = [0.2, 0.18, 0.15, 0.12, 0.12, 0.08, 0.08, 0.07]  # as benchmarks/data.py
SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("region", pa.string()),
        ("channel", pa.string()),
        ("product", pa.string()),
        ("age", pa.int64()),
        ("amount", pa.float64()),
    ]
)
AMOUNT = {"column": "amount", "low": data.AMOUNT_BOUNDS[0], "high": data.AMOUNT_BOUNDS[1]}
BY_REGION = {"region": data.REGIONS}


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    # {t}: the table; {v}: a suffix of the first output name; {c}: a condition true on every row whose literal
    # differs per variant, so that each variant is a new SQL text and also a new compiled statement
    bastion: str
    tumult: list[dict[str, Any]]  # the peer's queries for the same answer (see tumult_peer.py)

    def sql(self, variant: int | None = None) -> str:
        return self.bastion.format(t=data.DATASET, v="" if variant is None else f"_{variant}", c=_always(variant))

    def plain_sql(self) -> str:
        return self.bastion.format(t=f"`{bounded_table(data.DATASET)}`", v="", c=_always(None))


def _always(variant: int | None) -> str:
    """A condition every row meets (ages are at least 0), spelled differently per variant."""
    return f"age > {-1 - (variant or 0)}"


WORKLOADS: list[Workload] = [
    Workload("count", "COUNT(*)", "SELECT COUNT(*) AS n{v} FROM {t} WHERE {c}", [{"agg": "count"}]),
    Workload(
        "filtered_count",
        "COUNT(*) with WHERE",
        "SELECT COUNT(*) AS n{v} FROM {t} WHERE age >= 40 AND {c}",
        [{"agg": "count", "filter": "age >= 40"}],
    ),
    Workload(
        "grouped_count",
        "COUNT(*) by region (declared domain)",
        "SELECT region, COUNT(*) AS n{v} FROM {t} WHERE {c} GROUP BY region",
        [{"agg": "count", "keys": BY_REGION}],
    ),
    Workload(
        "grouped_sum_avg",
        "SUM, AVG of amount by region",
        "SELECT region, SUM(amount) AS total{v}, AVG(amount) AS avg_amount FROM {t} WHERE {c} GROUP BY region",
        [{"agg": "sum", "keys": BY_REGION, **AMOUNT}, {"agg": "average", "keys": BY_REGION, **AMOUNT}],
    ),
    Workload(
        "grouped_median",
        "MEDIAN of amount by region",
        "SELECT region, MEDIAN(amount) AS median_amount{v} FROM {t} WHERE {c} GROUP BY region",
        [{"agg": "median", "keys": BY_REGION, **AMOUNT}],
    ),
]


@dataclass
class Options:
    rows: list[int]
    reps: int = 10
    warmup: int = 2
    master: str = "local[2]"
    driver_memory: str = "8g"
    spark_conf: dict[str, str] = field(default_factory=dict)
    fresh: str = "sql"
    duckdb_max_rows: int = 10_000_000
    plain: bool = True
    tumult_python: Path | None = None
    tumult_reps: int = 3
    tumult_warmup: int = 0
    tumult_time_budget_s: float = 300.0
    tumult_max_run_s: float = 900.0
    work: Path = DEFAULT_WORK
    data_dir: Path | None = None
    markdown: Path | None = HERE / "SPARK.md"
    command: str = ""
    log: Callable[[str], None] = print


# --- data -----------------------------------------------------------------------------------------------


def write_events(directory: Path, n_rows: int, seed: int = 20240611, chunk_rows: int = 2_000_000) -> Path:
    """`events_<n>.parquet` in `directory` (reused if there): the columns, distributions and policy of
    benchmarks/data.py, written in chunks of `chunk_rows` so that no more than one chunk is in memory."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"events_{n_rows}.parquet"
    (directory / "events.yaml").write_text(data.policy_yaml())
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    n_users = max(n_rows // 4, 1)
    user_region = rng.choice(len(data.REGIONS), n_users, p=REGION_WEIGHTS).astype(np.int32)
    user_age = np.clip(np.round(rng.normal(45, 15, n_users)), 10, 99).astype(np.int64)
    weights = 1.0 / np.arange(1, data.N_PRODUCTS + 1) ** 1.1
    weights /= weights.sum()
    regions, channels = pa.array(data.REGIONS), pa.array(data.CHANNELS)
    products = pa.array([f"p{i:04d}" for i in range(data.N_PRODUCTS)])

    def decode(codes: np.ndarray, values: pa.Array) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), values).dictionary_decode()

    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for start in range(0, n_rows, chunk_rows):
            m = min(chunk_rows, n_rows - start)
            user = rng.integers(0, n_users, m)
            chunk = pa.table(
                {
                    "user_id": pa.array(user, pa.int64()),
                    "region": decode(user_region[user], regions),
                    "channel": decode(rng.choice(len(data.CHANNELS), m, p=[0.45, 0.3, 0.2, 0.05]), channels),
                    "product": decode(rng.choice(data.N_PRODUCTS, m, p=weights), products),
                    "age": pa.array(user_age[user], pa.int64()),
                    "amount": pa.array(np.round(rng.lognormal(3.5, 1.0, m), 2), pa.float64()),
                },
                schema=SCHEMA,
            )
            writer.write_table(chunk, row_group_size=1 << 20)
    tmp.replace(path)
    return path


# --- Spark ----------------------------------------------------------------------------------------------


def base_conf(opts: Options) -> dict[str, str]:
    """The Spark settings every Spark driver of the run gets (Bastion's, the floor's and the peer's)."""
    return {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": opts.driver_memory,
        "spark.local.dir": str(opts.work / "spark-local"),
        **opts.spark_conf,
    }


def spark_session(opts: Options) -> Any:
    """The process's one Spark session: Bastion's own (its engine's settings and the run's), or, where this
    checkout has no Spark engine, one made with the run's settings alone."""
    try:
        from gateway.engines.spark import spark_session as bastion_session
    except ImportError:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.master(opts.master).appName("bastion-spark-bench")
        for k, v in base_conf(opts).items():
            builder = builder.config(k, v)
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
        return session
    return bastion_session(opts.master, base_conf(opts))


SHARED_SQL_CONF = (
    "spark.sql.shuffle.partitions",
    "spark.sql.adaptive.enabled",
    "spark.sql.adaptive.coalescePartitions.enabled",
    "spark.sql.files.maxPartitionBytes",
    "spark.sql.ansi.enabled",
    "spark.sql.session.timeZone",
    "spark.sql.execution.arrow.pyspark.enabled",
)


def effective_conf(session: Any) -> dict[str, str]:
    """The SQL settings in force in the session Bastion and the floor use, passed on to the peer."""
    out = {}
    for key in SHARED_SQL_CONF:
        with contextlib.suppress(Exception):
            value = session.conf.get(key, None)
            if value is not None:
                out[key] = str(value)
    return out


def java_version() -> str | None:
    with contextlib.suppress(Exception):
        err = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr
        return err.strip().splitlines()[0]
    return None


# --- the engines ----------------------------------------------------------------------------------------


@dataclass
class Gateway:
    """One registered workspace: the core open read-only and an analyst's context."""

    engine: str
    settings: Settings
    policy: Policy
    registration_s: float
    principal: Principal
    bastion: Bastion | None = None

    def open(self) -> Bastion:
        if self.bastion is None:
            self.bastion = Bastion(self.settings)
        return self.bastion

    def close(self) -> None:
        if self.bastion is not None:
            self.bastion.close()
            self.bastion = None


def register(opts: Options, engine: str, source: Path, policy_path: Path, n_rows: int) -> Gateway:
    ws = opts.work / f"ws_{engine}_{n_rows}"
    if ws.exists():
        shutil.rmtree(ws)
    extra: dict[str, Any] = {}
    if engine == "spark":
        extra = {"engine": "spark", "spark_master": opts.master, "spark_conf": base_conf(opts)}
    settings = Settings(workspace=ws, **extra)
    settings.save()
    policy = load_policy(policy_path)
    admin = Bastion(settings, read_only=False)
    try:
        t0 = time.perf_counter()
        admin.engine.register(policy, source)
        registration_s = time.perf_counter() - t0
        _, principal = admin.tokens.create("bench", "analyst")
    finally:
        admin.close()
    return Gateway(engine, settings, policy, registration_s, principal)


def sees_bounded_table(session: Any, gw: Gateway) -> bool:
    """Whether `session` reads Bastion's bounded table under its own name: the engine binds a statement (which
    points its view at the current version, in the process's session) and the session then reads that view."""
    try:
        bastion = gw.open()
        bastion.engine.check(comp.statements(plan_query(WORKLOADS[0].sql(), lambda _: gw.policy))[0])
        session.table(f"`{bounded_table(data.DATASET)}`").limit(1).collect()
    except Exception:
        return False
    return True


def export_floor(opts: Options, session: Any, duck_gw: Gateway, n: int) -> str:
    """The DuckDB engine's bounded table, exported to Parquet and made readable in `session` under its own name:
    the same recipe as Bastion's Spark table, though not the same file (for when the session cannot see that)."""
    name = bounded_table(data.DATASET)
    export = opts.work / f"bounded_{n}.parquet"
    con = duck_gw.open().engine.connect()  # type: ignore[attr-defined]
    con.execute(f"COPY \"{name}\" TO '{export}' (FORMAT parquet, ROW_GROUP_SIZE 1048576)")
    session.read.parquet(str(export)).createOrReplaceTempView(name)
    return "the DuckDB engine's bounded table exported to Parquet"


def time_workloads(
    opts: Options, session: Any, gateways: dict[str, Gateway], policy: Policy
) -> dict[str, dict[str, Any]]:
    counter = iter(range(1, 1 << 62))

    def resolve(name: str) -> Policy:
        return policy

    def bastion_runner(gw: Gateway) -> Callable[[Workload], None]:
        bastion = gw.open()
        ctx = Context(gw.principal, source="benchmark")

        def run(w: Workload) -> None:
            i = next(counter)
            sql, epsilon = (w.sql(i), 1.0) if opts.fresh == "sql" else (w.sql(), 1.0 + i * 1e-7)
            if bastion.query(ctx, sql, epsilon=epsilon)["cached"]:
                raise RuntimeError(f"a timed query was answered from the cache: {sql}")

        return run

    def compiled(w: Workload, dialect: str) -> Callable[[], list[str]]:
        """The statements Bastion compiles for the workload: with --fresh sql, those of a new variant each call
        (compiled before the timed runs start), else the same ones."""
        if opts.fresh != "sql":
            texts = [s.sql(dialect=dialect) for s in comp.statements(plan_query(w.sql(), resolve))]
            return lambda: texts
        queue = [
            [s.sql(dialect=dialect) for s in comp.statements(plan_query(w.sql(next(counter)), resolve))]
            for _ in range(opts.warmup + opts.reps)
        ]
        return lambda: queue.pop()

    out: dict[str, dict[str, Any]] = {}
    for w in WORKLOADS:
        statements = comp.statements(plan_query(w.sql(), resolve))
        engines: dict[str, Callable[[], None]] = {}
        if "spark" in gateways:
            run_spark = bastion_runner(gateways["spark"])
            engines["bastion_spark"] = functools.partial(run_spark, w)
        spark_sql = [s.sql(dialect="spark") for s in statements]

        def raw_spark(texts: Callable[[], list[str]]) -> None:
            for text in texts():
                session.sql(text).collect()

        engines["raw_spark"] = functools.partial(raw_spark, compiled(w, "spark"))
        if opts.plain:
            plain: list[str] = [w.plain_sql()]
            engines["plain_spark"] = functools.partial(raw_spark, functools.partial(list, plain))
        if "duckdb" in gateways:
            run_duck = bastion_runner(gateways["duckdb"])
            con = gateways["duckdb"].open().engine.connect()  # type: ignore[attr-defined]
            engines["bastion_duckdb"] = functools.partial(run_duck, w)

            def raw_duckdb(texts: Callable[[], list[str]], con: Any = con) -> None:
                for text in texts():
                    con.execute(text).fetchall()

            engines["raw_duckdb"] = functools.partial(raw_duckdb, compiled(w, "duckdb"))
        names = list(engines)
        times: dict[str, list[float]] = {e: [] for e in names}
        errors: dict[str, str] = {}
        for _ in range(opts.warmup):
            for e in names:
                engines[e]()
        for i in range(opts.reps):
            for e in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order
                t = time.perf_counter()
                try:
                    engines[e]()
                except Exception as exc:  # recorded, not raised: the other engines' figures still stand
                    errors.setdefault(e, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
                    continue
                times[e].append(time.perf_counter() - t)
        out[w.name] = {e: {**stats(times[e]), **({"error": errors[e]} if e in errors else {})} for e in names}
        out[w.name]["raw_spark"]["sql"] = spark_sql
        line = "  ".join(f"{e} {out[w.name][e]['p50_ms']:.0f}" for e in names if out[w.name][e]["p50_ms"])
        opts.log(f"    {w.name:<16} p50 ms: {line}")
    return out


# --- the peer -------------------------------------------------------------------------------------------


def run_tumult(opts: Options, source: Path, sql_conf: dict[str, str]) -> dict[str, Any]:
    if opts.tumult_python is None:
        return {"error": "not run: no --tumult-python given"}
    spec = {
        "parquet": str(source),
        "unit": "user_id",
        "max_rows_per_unit": data.MAX_ROWS_PER_UNIT,
        "master": opts.master,
        "conf": {**base_conf(opts), **sql_conf, "spark.sql.warehouse.dir": str(opts.work / "tumult-warehouse")},
        "epsilon": 1.0,
        "reps": opts.tumult_reps,
        "warmup": opts.tumult_warmup,
        "time_budget_s": opts.tumult_time_budget_s,
        "max_run_s": opts.tumult_max_run_s,
        "workloads": [{"name": w.name, "queries": w.tumult} for w in WORKLOADS],
    }
    spec_path = opts.work / "tumult_spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = opts.work / "tumult.log"
    with open(log_path, "w") as err:
        proc = subprocess.run(
            [str(opts.tumult_python), str(HERE / "tumult_peer.py"), str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=6 * 3600,
            cwd=str(opts.work),
        )
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": f"the peer exited {proc.returncode}; see {log_path}"}


def tumult_entry(peer: dict[str, Any], name: str) -> dict[str, Any]:
    if peer.get("error"):
        return {"error": peer["error"], **stats([])}
    entry = peer.get("workloads", {}).get(name, {})
    out = {**stats(entry.get("times_s", [])), **({"error": entry["error"]} if entry.get("error") else {})}
    if entry.get("over_s") is not None:
        out["over_ms"] = entry["over_s"] * 1e3  # a run cancelled after --tumult-max-run: a lower bound
    return out


# --- the whole run --------------------------------------------------------------------------------------


def run_size(opts: Options, n: int, results: dict[str, Any]) -> dict[str, Any]:
    data_dir = opts.data_dir or opts.work / "data"
    t0 = time.perf_counter()
    source = write_events(data_dir, n)
    policy_path = data_dir / "events.yaml"
    entry: dict[str, Any] = {"rows": n, "generate_s": time.perf_counter() - t0, "source": str(source)}
    entry["source_mib"] = round(source.stat().st_size / 2**20, 1)
    opts.log(f"== {n:,} rows ({entry['source_mib']} MiB Parquet)")
    session = spark_session(opts)  # before Bastion's engine, so that it finds this session and its settings
    gateways: dict[str, Gateway] = {}
    try:
        gateways["spark"] = register(opts, "spark", source, policy_path, n)
        opts.log(f"  Bastion on Spark registered in {gateways['spark'].registration_s:.1f} s")
    except Exception as exc:
        entry["bastion_spark_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        opts.log(f"  Bastion on Spark unavailable: {entry['bastion_spark_error']}")
    if "spark" in gateways:  # the engine's own session: its bounded table's view is there
        session = gateways["spark"].open().engine.session()  # type: ignore[attr-defined]
    spark_table = "spark" in gateways and sees_bounded_table(session, gateways["spark"])
    if n <= opts.duckdb_max_rows or not spark_table:  # DuckDB's table is the floor's if Spark's is not visible
        gateways["duckdb"] = register(opts, "duckdb", source, policy_path, n)
        opts.log(f"  Bastion on DuckDB registered in {gateways['duckdb'].registration_s:.1f} s")
    try:
        if spark_table:
            entry["floor_table"] = "Bastion's Spark table, read in the same session"
        else:
            entry["floor_table"] = export_floor(opts, session, gateways["duckdb"], n)
        if n > opts.duckdb_max_rows and "duckdb" in gateways:
            gateways.pop("duckdb").close()  # registered only for the floor's table
        entry["registration_s"] = {k: g.registration_s for k, g in gateways.items()}
        policy = next(iter(gateways.values())).policy
        bounded = session.sql(f"SELECT COUNT(*) FROM `{bounded_table(data.DATASET)}`").collect()[0][0]
        entry["bounded_rows"] = int(bounded)
        entry["spark_sql_conf"] = effective_conf(session)
        entry["workloads"] = time_workloads(opts, session, gateways, policy)
    finally:
        for g in gateways.values():
            g.close()
    opts.log("  Tumult Analytics ...")
    peer = run_tumult(opts, source, entry.get("spark_sql_conf", {}))
    results["tumult"] = {k: peer[k] for k in ("version", "core_version", "pyspark_version", "python") if k in peer}
    entry["tumult_session_s"] = peer.get("session_s")
    if peer.get("error"):
        entry["tumult_error"] = peer["error"]
        opts.log(f"  Tumult: {peer['error']}")
    for w in WORKLOADS:
        entry["workloads"][w.name]["tumult"] = t = tumult_entry(peer, w.name)
        if t["p50_ms"] is not None:
            opts.log(f"    {w.name:<16} Tumult p50 {t['p50_ms']:.0f} ms ({t['n']} runs)")
    return entry


def run(opts: Options) -> dict[str, Any]:
    opts.work.mkdir(parents=True, exist_ok=True)
    info = machine()
    for pkg in ("pyspark", "pyarrow"):
        with contextlib.suppress(Exception):
            info["versions"][pkg] = version(pkg)
    info["java"] = java_version()
    results: dict[str, Any] = {
        "machine": info,
        "command": opts.command,
        "config": {
            "rows": opts.rows,
            "reps": opts.reps,
            "warmup": opts.warmup,
            "fresh": opts.fresh,
            "master": opts.master,
            "spark_conf": base_conf(opts),
            "tumult_reps": opts.tumult_reps,
            "tumult_max_run_s": opts.tumult_max_run_s,
            "max_rows_per_unit": data.MAX_ROWS_PER_UNIT,
            "epsilon": 1.0,
        },
        "workloads": [
            {"name": w.name, "title": w.title, "sql": w.sql(), "plain_sql": w.plain_sql(), "tumult": w.tumult}
            for w in WORKLOADS
        ],
        "runs": [],
        "tumult": {},
    }
    started = time.time()
    out_json = opts.work / "spark_results.json"
    for n in sorted(opts.rows):
        results["runs"].append(run_size(opts, n, results))
        out_json.write_text(json.dumps(results, indent=2, default=str))  # partial results survive a failure
    results["elapsed_s"] = time.time() - started
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["targets"] = targets(results)
    out_json.write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    opts.log(text)
    if opts.markdown is not None:
        write_markdown(opts.markdown, text)
    return results


# --- report ---------------------------------------------------------------------------------------------


def _p50(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else entry.get("p50_ms")


def _ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _peer(entry: dict[str, Any] | None) -> tuple[float | None, bool]:
    """Tumult's p50, or the time after which its one run was cancelled (then True: a lower bound)."""
    if entry is None:
        return None, False
    if entry.get("p50_ms") is None and entry.get("over_ms") is not None:
        return float(entry["over_ms"]), True
    return entry.get("p50_ms"), False


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in results["runs"]:
        for name, w in r["workloads"].items():
            bas, raw = _p50(w.get("bastion_spark")), _p50(w.get("raw_spark"))
            peer, lower = _peer(w.get("tumult"))
            ratio = bas / raw if bas and raw else None
            speedup = peer / bas if peer and bas else None
            out.append(
                {
                    "rows": r["rows"],
                    "workload": name,
                    "ratio_to_raw": ratio,
                    "ratio_met": None if ratio is None else ratio <= RATIO_TARGET,
                    "speedup_vs_tumult": speedup,
                    "speedup_is_lower_bound": lower,
                    "tumult_met": None if speedup is None else speedup > 1.0,
                }
            )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    peer = results.get("tumult") or {}
    titles = {w["name"]: w["title"] for w in results["workloads"]}
    fresh = "a distinct SQL text" if results["config"].get("fresh", "sql") == "sql" else "a new ε"
    lines = [
        f"Measured {results.get('finished_at', '')} with `{results['command']}`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, shared with other work; Python "
        f"{m['python']}, {m.get('java') or 'Java ?'}; PySpark {v.get('pyspark')}, DuckDB {v.get('duckdb')}, "
        f"OpenDP {v.get('opendp')}; Tumult Analytics {peer.get('version', '–')} (Core {peer.get('core_version', '–')},"
        f" PySpark {peer.get('pyspark_version', '–')}, Python {peer.get('python', '–')}). Spark master "
        f"`{results['config']['master']}`, settings {json.dumps(results['config']['spark_conf'])}. ε = 1 per "
        f"query (new queries by {fresh}), "
        f"k = {results['config']['max_rows_per_unit']} rows per user; {results['config']['reps']} timed runs per "
        f"engine (after {results['config']['warmup']} warm-up), up to {results['config']['tumult_reps']} for Tumult.",
        "",
        "p50 in ms (×raw: Bastion on Spark over raw Spark SQL; ×Tumult: Tumult over Bastion on Spark; > t: Tumult's "
        "run was cancelled after t, a lower bound):",
        "",
        "| rows | workload | Bastion-Spark p50 | p95 | raw Spark p50 | ×raw | plain Spark SQL | Tumult p50 | ×Tumult "
        "| Bastion-DuckDB p50 | raw DuckDB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        for name, w in r["workloads"].items():
            bas, raw = _p50(w.get("bastion_spark")), _p50(w.get("raw_spark"))
            peer_ms, lower = _peer(w.get("tumult"))
            over = "> " if lower else ""
            speedup = f"{over}{_x(peer_ms / bas)}" if peer_ms and bas else "–"
            lines.append(
                f"| {r['rows'] / 1e6:g}M | {titles.get(name, name)} | {_ms(bas)} | "
                f"{_ms((w.get('bastion_spark') or {}).get('p95_ms'))} | {_ms(raw)} | "
                f"{_x(bas / raw if bas and raw else None)} | {_ms(_p50(w.get('plain_spark')))} | "
                f"{over}{_ms(peer_ms)} | {speedup} | {_ms(_p50(w.get('bastion_duckdb')))} | "
                f"{_ms(_p50(w.get('raw_duckdb')))} |"
            )
    lines += ["", "Per size:", ""]
    for r in results["runs"]:
        reg = ", ".join(f"{k} {s:.1f} s" for k, s in r.get("registration_s", {}).items())
        notes = [f"bounded rows {r.get('bounded_rows', 0):,}", f"registration {reg or '–'}"]
        if r.get("tumult_session_s") is not None:
            notes.append(f"Tumult session {r['tumult_session_s']:.1f} s")
        notes.append(f"floor table: {r.get('floor_table', '–')}")
        for key in ("bastion_spark_error", "tumult_error"):
            if r.get(key):
                notes.append(f"{key.replace('_', ' ')}: {r[key]}")
        errors = [
            f"{e} on {name}: {x['error']}"
            for name, w in r["workloads"].items()
            for e, x in w.items()
            if x.get("error") and not (e == "tumult" and r.get("tumult_error"))
        ]
        lines.append(f"- {r['rows']:,} rows: " + "; ".join(notes + errors) + ".")
    ratio = [t for t in results.get("targets", []) if t["ratio_met"] is not None]
    speed = [t for t in results.get("targets", []) if t["tumult_met"] is not None]
    lines += ["", "Targets:", ""]
    if ratio:
        failed = [f"{t['workload']} at {t['rows']:,} ({t['ratio_to_raw']:.2f}×)" for t in ratio if not t["ratio_met"]]
        lines.append(
            f"- p50 ≤ {RATIO_TARGET}× raw Spark SQL: {len(ratio) - len(failed)} of {len(ratio)} hold"
            + (f"; fails on {', '.join(failed)}." if failed else ".")
        )
    else:
        lines.append(f"- p50 ≤ {RATIO_TARGET}× raw Spark SQL: not measured (Bastion on Spark did not run).")
    if speed:
        failed = [f"{t['workload']} at {t['rows']:,}" for t in speed if not t["tumult_met"]]
        low = min(speed, key=lambda t: t["speedup_vs_tumult"])
        bound = "> " if low["speedup_is_lower_bound"] else ""
        lines.append(
            f"- faster than Tumult Analytics: {len(speed) - len(failed)} of {len(speed)} hold (smallest margin "
            f"{bound}{low['speedup_vs_tumult']:.1f}× on {low['workload']} at {low['rows']:,})"
            + (f"; fails on {', '.join(failed)}." if failed else ".")
        )
    else:
        lines.append("- faster than Tumult Analytics: not measured.")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, text: str) -> None:
    """Replace the text between the markers of `path` (or create it with just the markers and the text)."""
    block = f"{BEGIN}\n{text}{END}"
    old = path.read_text() if path.exists() else f"# Bastion on Spark\n\n{BEGIN}\n{END}\n"
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks.spark_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 50_000_000], help="table sizes")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per workload and engine")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="8g")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="more Spark settings")
    p.add_argument(
        "--fresh",
        choices=["sql", "epsilon"],
        default="sql",
        help="make every Bastion query new by a distinct SQL text (default: planned and bound again) or by a new ε",
    )
    p.add_argument("--duckdb-max-rows", type=int, default=10_000_000, help="largest table Bastion on DuckDB runs")
    p.add_argument("--no-plain", action="store_true", help="skip the analyst's own SQL on Spark")
    p.add_argument("--tumult-python", type=Path, help="the Python of the peer's environment (none: skip Tumult)")
    p.add_argument("--tumult-reps", type=int, default=3)
    p.add_argument("--tumult-warmup", type=int, default=0, help="untimed runs per workload (after one warm-up count)")
    p.add_argument("--tumult-time-budget", type=float, default=300.0, help="seconds per workload (≥ 1 run)")
    p.add_argument(
        "--tumult-max-run", type=float, default=900.0, help="seconds after which a run is cancelled (a lower bound)"
    )
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="workspaces, Spark scratch, results JSON")
    p.add_argument("--data-dir", type=Path, help="generated tables (default <work>/data)")
    p.add_argument("--markdown", type=Path, default=HERE / "SPARK.md", help="where the measured part goes")
    p.add_argument("--no-markdown", action="store_true")
    a = p.parse_args(argv)
    conf = dict(c.split("=", 1) for c in a.conf)
    return Options(
        rows=a.rows,
        reps=a.reps,
        warmup=a.warmup,
        master=a.master,
        driver_memory=a.driver_memory,
        spark_conf=conf,
        fresh=a.fresh,
        duckdb_max_rows=a.duckdb_max_rows,
        plain=not a.no_plain,
        tumult_python=a.tumult_python,
        tumult_reps=a.tumult_reps,
        tumult_warmup=a.tumult_warmup,
        tumult_time_budget_s=a.tumult_time_budget,
        tumult_max_run_s=a.tumult_max_run,
        work=a.work,
        data_dir=a.data_dir,
        markdown=None if a.no_markdown else a.markdown,
        command=" ".join(["python -m benchmarks.spark_bench", *(argv if argv is not None else sys.argv[1:])]),
    )


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
