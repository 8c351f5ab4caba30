"""Bastion against its floor (raw DuckDB) and a peer (SmartNoise SQL).

    .venv/bin/python -m benchmarks.run --rows 1000000 10000000
    .venv/bin/python -m benchmarks.run --rows 1000000 --workloads count --no-smartnoise --no-http   # a quick look

For each table size: generate the table (numpy, fixed seed, Parquet), register it with Bastion's own catalog
(timed), start a real gateway (`bastion serve`) as a subprocess on 127.0.0.1, and time every workload with

- raw:        DuckDB running the plain SQL on the same pre-bounded table (the floor; no privacy),
- bastion:    `Bastion.query` in process (planner, cache lookup, ledger charge, audit, OpenDP noise, release),
- http:       the same through the Python client and the HTTP server,
- smartnoise: SmartNoise SQL on the same data and metadata, in its own virtual environment (subprocess).

The first three run interleaved, repetition by repetition, so that they share the machine's conditions; every
Bastion query gets a fresh ε so that it is computed and charged, never served from the cache. Interleaved with
COUNT(*), the suite also times the durable writes alone that a charged query makes before it answers (one SQLite
commit at synchronous=FULL and two appended records with fsync, on the workspace's disk): raw DuckDB plus these is
the floor of a query's fixed cost that keeps every durability guarantee. Then: throughput through HTTP with
concurrent clients (cached and uncached), the gateway's peak RSS and the registration time.

Writes `<out>/results.json` and `<out>/results.md` and, unless --no-copy, a copy of the Markdown to
`benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import data, report
from benchmarks.workloads import WORKLOADS, Workload
from gateway.client import Client
from gateway.engines.duckdb import DuckDBEngine, bounded_table
from gateway.service import Bastion, Context
from gateway.settings import Settings
from gateway.stores.tokens import Principal
from policies.schema import load_policy

HERE = Path(__file__).resolve().parent
ENGINES = ("raw", "bastion", "http", "smartnoise")
SMARTNOISE_REQUIREMENTS = ["smartnoise-sql==1.0.10", "pyarrow"]


@dataclass
class Options:
    rows: list[int]
    reps: int = 20
    warmup: int = 2
    fresh: str = "sql"
    clients: int = 8
    server_workers: int = 1
    throughput_seconds: float = 5.0
    throughput_max_requests: int = 20_000
    http: bool = True
    smartnoise: bool = True
    smartnoise_reps: int = 5
    smartnoise_max_rows: int = 10_000_000
    smartnoise_time_budget_s: float = 60.0
    smartnoise_venv: Path = HERE / ".venv-smartnoise"
    work: Path = HERE / "results" / "work"
    out: Path = HERE / "results"
    copy_markdown: Path | None = HERE / "RESULTS.md"
    keep_data: bool = True
    workloads: list[str] | None = None  # names of the workloads to run (all if None)
    command: str | None = None  # the command line that ran the suite, for the report
    log: Callable[[str], None] = print

    def selected(self) -> list[Workload]:
        if self.workloads is None:
            return list(WORKLOADS)
        unknown = set(self.workloads) - {w.name for w in WORKLOADS}
        if unknown:
            raise ValueError(f"unknown workload(s) {sorted(unknown)}; known: {', '.join(w.name for w in WORKLOADS)}")
        return [w for w in WORKLOADS if w.name in self.workloads]


# --- small helpers --------------------------------------------------------------------------------------


def stats(times_s: list[float]) -> dict[str, Any]:
    if not times_s:
        return {"n": 0, "p50_ms": None, "p95_ms": None}
    ms = np.asarray(times_s) * 1e3
    return {
        "n": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "min_ms": float(ms.min()),
    }


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    mem_gib = None
    with contextlib.suppress(Exception):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    versions = {}
    for pkg in ("duckdb", "opendp", "sqlglot", "fastapi", "uvicorn", "httpx", "numpy"):
        with contextlib.suppress(Exception):
            versions[pkg] = version(pkg)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "os": platform.platform(),
        "versions": versions,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident set size of a process (psutil if installed, else /proc/PID/status VmHWM)."""
    try:
        import psutil  # type: ignore[import-not-found]

        info = psutil.Process(pid).memory_full_info()
        peak = getattr(info, "peak_wset", None)  # Windows only; elsewhere fall through to VmHWM
        if peak:
            return peak / 2**20
    except Exception:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Fresh:
    """A new query for every timed run, so that none is answered from the cache. Mode "sql" (the default): a
    distinct SQL text (the first output name gets a suffix) at ε = 1, like an analyst asking new questions; mode
    "epsilon": the same SQL text at a new ε each time (which also makes OpenDP calibrate again, e.g. the key
    selection threshold). Thread-safe."""

    def __init__(self, mode: str = "sql") -> None:
        if mode not in ("sql", "epsilon"):
            raise ValueError("fresh mode is 'sql' or 'epsilon'")
        self.mode = mode
        self._count = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, w: Workload) -> tuple[str, dict[str, Any]]:
        with self._lock:
            i = next(self._count)
        delta = data.QUERY_DELTA if w.private_keys else None
        if self.mode == "sql":
            return w.sql(i), {"epsilon": 1.0, "delta": delta}
        return w.sql(), {"epsilon": 1.0 + i * 1e-7, "delta": delta}


class DurableSteps:
    """The writes one charged query makes durable before it answers, alone, on the workspace's disk: one SQLite
    transaction in WAL mode at synchronous=FULL (the ledger charge) and two appends of an audit-sized record, each
    followed by fsync (the "admitted" and "released" records). None of Bastion's code runs."""

    RECORD = b"x" * 700 + b"\n"

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(directory / "floor.sqlite", isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=FULL")
        self.con.execute("CREATE TABLE IF NOT EXISTS charges (ts REAL NOT NULL)")
        self.fd = os.open(directory / "floor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __call__(self, _: Workload) -> None:
        self.con.execute("BEGIN IMMEDIATE")
        self.con.execute("INSERT INTO charges (ts) VALUES (?)", (time.time(),))
        self.con.execute("COMMIT")
        for _record in range(2):
            os.write(self.fd, self.RECORD)
            os.fsync(self.fd)

    def close(self) -> None:
        self.con.close()
        os.close(self.fd)


# --- the gateway as a real server -----------------------------------------------------------------------


def bastion_command() -> list[str]:
    script = Path(sys.executable).parent / "bastion"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from gateway.cli.main import main; main()"]


@contextlib.contextmanager
def server(
    workspace: Path, log_path: Path, workers: int = 1, store: str | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`bastion serve` on 127.0.0.1 and a free port (no access log; on the PostgreSQL `store` if given), until the
    block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *bastion_command(),
                "serve",
                "--workspace",
                str(workspace),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--no-access-log",
                *(["--store", store] if store else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(workspace.parent),
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not start in 120 s; see {log_path}")
                time.sleep(0.1)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- one table size -------------------------------------------------------------------------------------


def duckdb_engine(bastion: Bastion) -> DuckDBEngine:
    """The gateway's engine as the DuckDB engine it is here (the workspace's default): the raw baseline and the
    facts read its database directly, which the Engine protocol does not offer."""
    engine = bastion.engine
    if not isinstance(engine, DuckDBEngine):
        raise RuntimeError(f"the benchmark needs a DuckDB workspace, not {engine.kind}")
    return engine


def prepare(opts: Options, n_rows: int) -> tuple[Settings, str, Principal, dict[str, Any]]:
    """Generate and register the table in a fresh workspace; return settings, token, principal and facts."""
    t0 = time.perf_counter()
    source, policy_path = data.write(opts.work / "data", n_rows)
    generated_s = time.perf_counter() - t0
    ws = opts.work / f"ws_{n_rows}"
    if ws.exists():
        shutil.rmtree(ws)
    settings = Settings(workspace=ws)
    settings.save()
    admin = Bastion(settings, read_only=False)
    try:
        t0 = time.perf_counter()
        admin.engine.register(load_policy(policy_path), source)
        registration_s = time.perf_counter() - t0
        token, principal = admin.tokens.create("bench", "analyst")
        con = duckdb_engine(admin).connect()
        bounded = con.execute(f'SELECT COUNT(*) FROM "{bounded_table(data.DATASET)}"').fetchone()
        distinct = con.execute(f"SELECT COUNT(DISTINCT user_id) FROM read_parquet('{source}')").fetchone()
        assert bounded is not None and distinct is not None  # an aggregate without GROUP BY has one row
        bounded_rows, units = bounded[0], distinct[0]
    finally:
        admin.close()
    facts = {
        "rows": n_rows,
        "units": int(units),
        "bounded_rows": int(bounded_rows),
        "source_mib": round(source.stat().st_size / 2**20, 1),
        "generate_s": generated_s,
        "registration_s": registration_s,
        "source": str(source),
    }
    return settings, token, principal, facts


def time_engines(
    opts: Options, settings: Settings, token: str, principal: Principal, url: str | None, fresh: Fresh
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Raw DuckDB, Bastion in process and over HTTP, interleaved per repetition; and, interleaved with COUNT(*),
    the durable writes alone (`DurableSteps`)."""
    bastion = Bastion(settings)
    ctx = Context(principal, source="benchmark")
    client = Client(url, token) if url else None
    durable = DurableSteps(settings.workspace / "floor")
    out: dict[str, dict[str, Any]] = {}
    floor: dict[str, Any] | None = None
    try:
        con = duckdb_engine(bastion).connect()

        def raw(w: Workload) -> None:
            con.execute(w.raw_sql()).fetchall()

        def inproc(w: Workload) -> None:
            sql, args = fresh(w)
            if bastion.query(ctx, sql, **args)["cached"]:
                raise RuntimeError(f"a timed query was answered from the cache: {sql}")

        def http(w: Workload) -> None:
            sql, args = fresh(w)
            if client is None or client.query_raw(sql, **args).cached:
                raise RuntimeError(f"a timed query was answered from the cache: {sql}")

        engines: dict[str, Callable[[Workload], None]] = {"raw": raw, "bastion": inproc}
        if client is not None:
            engines["http"] = http
        run_one: dict[str, Callable[[Workload], None]] = {**engines, "durable": durable}
        for w in opts.selected():
            names = [*engines, "durable"] if w.name == "count" else list(engines)
            times: dict[str, list[float]] = {e: [] for e in names}
            for _ in range(opts.warmup):
                for e in names:
                    run_one[e](w)
            for i in range(opts.reps):
                for e in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order
                    t = time.perf_counter()
                    run_one[e](w)
                    times[e].append(time.perf_counter() - t)
            out[w.name] = {e: stats(times[e]) for e in names if e != "durable"}
            if "durable" in times:
                floor = {"workload": w.name, **stats(times["durable"])}
            line = "  ".join(f"{e} {stats(times[e])['p50_ms']:.2f}" for e in names)
            opts.log(f"    {w.name:<18} p50 ms: {line}")
    finally:
        if client is not None:
            client.close()
        bastion.close()
        durable.close()
    return out, floor


def throughput(opts: Options, url: str | Sequence[str], token: str, fresh: Fresh) -> dict[str, Any]:
    """Queries per second through HTTP with `clients` concurrent clients, bounded in count and time. With several
    URLs (replicas of one gateway) client i sends to replica i mod their number."""
    w = next(w for w in WORKLOADS if w.name == "count")
    urls = [url] if isinstance(url, str) else list(url)
    results: dict[str, Any] = {"workload": w.name, "sql": w.sql(), "clients": opts.clients, "gateways": len(urls)}
    cached_eps = 0.5
    with Client(urls[0], token) as c:
        c.query_raw(w.sql(), epsilon=cached_eps)  # computed once; every later identical request is cached

    for mode in ("cached", "uncached"):
        latencies: list[list[float]] = [[] for _ in range(opts.clients)]
        errors: list[str] = []
        budget = threading.Semaphore(opts.throughput_max_requests)
        halt = threading.Event()
        ready = threading.Barrier(opts.clients + 1, timeout=120)

        def worker(i: int) -> None:
            with Client(urls[i % len(urls)], token) as c:
                c.datasets()  # open the connection before the clock starts
                ready.wait()  # noqa: B023
                while not halt.is_set() and budget.acquire(blocking=False):  # noqa: B023
                    sql, args = (w.sql(), {"epsilon": cached_eps}) if mode == "cached" else fresh(w)  # noqa: B023
                    t = time.perf_counter()
                    try:
                        answer = c.query_raw(sql, **args)
                    except Exception as exc:  # counted, not raised: the run must stop by itself
                        errors.append(repr(exc))  # noqa: B023
                        continue
                    latencies[i].append(time.perf_counter() - t)  # noqa: B023
                    if answer.cached != (mode == "cached"):  # noqa: B023
                        errors.append(f"cached={answer.cached} in {mode} mode")  # noqa: B023

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(opts.clients)]
        for t in threads:
            t.start()
        ready.wait()
        t0 = time.perf_counter()
        halt.wait(opts.throughput_seconds)
        halt.set()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.perf_counter() - t0
        done = [x for lat in latencies for x in lat]
        results[mode] = {
            "requests": len(done),
            "seconds": elapsed,
            "qps": len(done) / elapsed if elapsed else 0.0,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            **stats(done),
        }
        opts.log(
            f"    throughput {mode:<8} {results[mode]['qps']:.0f} q/s ({len(done)} requests, "
            f"{opts.clients} clients, p50 {results[mode]['p50_ms']:.1f} ms)"
        )
    return results


# --- SmartNoise SQL -------------------------------------------------------------------------------------


def ensure_venv(
    venv: Path, requirements: list[str], imports: str, log: Callable[[str], None]
) -> tuple[Path | None, str]:
    """The Python of a peer's own virtual environment, where `import <imports>` works, installing `requirements`
    into it if needed; (None, why) if it cannot be."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", f"import {imports}"]
    if py.exists() and subprocess.run(check, capture_output=True, timeout=120).returncode == 0:
        return py, "ok"
    log(f"  installing {' '.join(requirements)} into {venv} ...")
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        pip = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", *requirements],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if pip.returncode != 0:
            tail = " ".join((pip.stderr or pip.stdout).strip().splitlines()[-3:])
            return None, f"pip install failed: {tail[-500:]}"
        if subprocess.run(check, capture_output=True, timeout=120).returncode != 0:
            return None, f"installed, but `import {imports}` fails"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot create the environment: {exc}"
    return py, "ok"


def ensure_smartnoise(opts: Options) -> tuple[Path | None, str]:
    """The SmartNoise virtual environment's Python, installing it if needed; (None, why) if it cannot be."""
    return ensure_venv(opts.smartnoise_venv, SMARTNOISE_REQUIREMENTS, "snsql, pyarrow", opts.log)


def run_smartnoise(opts: Options, py: Path, source: Path, n_rows: int) -> dict[str, Any]:
    spec = {
        "parquet": str(source),
        "metadata": data.smartnoise_metadata(),
        "workloads": [{"name": w.name, "sql": w.smartnoise_sql()} for w in opts.selected() if w.smartnoise],
        "reps": opts.smartnoise_reps,
        "warmup": 1 if n_rows <= 1_000_000 else 0,  # a query on 10M rows takes SmartNoise tens of seconds
        "epsilon": 1.0,
        "delta": data.QUERY_DELTA,
        "time_budget_s": opts.smartnoise_time_budget_s,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [str(py), str(HERE / "smartnoise_runner.py"), f.name], capture_output=True, text=True, timeout=3 * 3600
        )
    finally:
        os.unlink(f.name)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"runner exited {proc.returncode}: {proc.stderr.strip()[-500:]}", "workloads": {}}


def smartnoise_entry(w: Workload, sn: dict[str, Any] | None, skipped: str | None) -> dict[str, Any]:
    if skipped:
        return {"status": "skipped", "reason": skipped, **stats([])}
    if w.smartnoise is None:
        return {"status": "unsupported", "reason": w.unsupported, **stats([])}
    assert sn is not None
    if sn.get("error"):
        return {"status": "error", "reason": sn["error"], **stats([])}
    entry = sn["workloads"].get(w.name, {})
    if entry.get("error"):
        return {"status": "error", "reason": entry["error"], **stats(entry.get("times_s", []))}
    return {"status": "ok", "sql": entry.get("sql"), **stats(entry.get("times_s", []))}


# --- the whole suite ------------------------------------------------------------------------------------


def run(opts: Options) -> dict[str, Any]:
    opts.work.mkdir(parents=True, exist_ok=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "rows": opts.rows,
            "reps": opts.reps,
            "warmup": opts.warmup,
            "fresh": opts.fresh,
            "clients": opts.clients,
            "throughput_seconds": opts.throughput_seconds,
            "max_rows_per_unit": data.MAX_ROWS_PER_UNIT,
            "http": opts.http,
            "smartnoise": opts.smartnoise,
            "workloads": [w.name for w in opts.selected()],
            "command": opts.command,
        },
        "engines": list(ENGINES),
        "workloads": [
            {
                "name": w.name,
                "title": w.title,
                "sql": w.sql(),
                "raw_sql": w.raw_sql(),
                "smartnoise_sql": w.smartnoise_sql(),
            }
            for w in opts.selected()
        ],
        "runs": [],
        "throughput": None,
        "smartnoise": {"status": "disabled" if not opts.smartnoise else "pending"},
    }
    fresh = Fresh(opts.fresh)
    sn_py: Path | None = None
    if opts.smartnoise:
        sn_py, why = ensure_smartnoise(opts)
        results["smartnoise"] = {"status": "ok" if sn_py else "unavailable", "reason": None if sn_py else why}
        opts.log(f"  SmartNoise SQL: {results['smartnoise']['status']} {'' if sn_py else why}")
    for n in sorted(opts.rows):
        opts.log(f"== {n:,} rows")
        settings, token, principal, facts = prepare(opts, n)
        opts.log(f"  registered in {facts['registration_s']:.1f} s ({facts['bounded_rows']:,} bounded rows)")
        run_entry: dict[str, Any] = {**facts, "workloads": {}}
        with contextlib.ExitStack() as stack:
            url, proc = None, None
            if opts.http:
                url, proc = stack.enter_context(
                    server(settings.workspace, opts.work / f"server_{n}.log", opts.server_workers)
                )
                run_entry["gateway_rss_after_start_mib"] = peak_rss_mib(proc.pid)
            timed, run_entry["durable_floor"] = time_engines(opts, settings, token, principal, url, fresh)
            if proc is not None:
                run_entry["gateway_peak_rss_mib"] = peak_rss_mib(proc.pid)
            if url is not None and results["throughput"] is None:
                results["throughput"] = {"rows": n, **throughput(opts, url, token, fresh)}
        skipped = None
        sn = None
        if not opts.smartnoise:
            skipped = "SmartNoise SQL disabled for this run"
        elif sn_py is None:
            skipped = f"SmartNoise SQL unavailable: {results['smartnoise']['reason']}"
        elif n > opts.smartnoise_max_rows:
            skipped = f"over --smartnoise-max-rows {opts.smartnoise_max_rows:,}"
        else:
            opts.log("  SmartNoise SQL ...")
            sn = run_smartnoise(opts, sn_py, Path(facts["source"]), n)
            run_entry["smartnoise_load_s"] = sn.get("load_s")
            results["smartnoise"].update({k: sn[k] for k in ("version", "opendp_version") if k in sn})
        for w in opts.selected():
            entry: dict[str, Any] = {e: timed[w.name].get(e) for e in ("raw", "bastion", "http")}
            if entry["http"] is None:
                entry["http"] = {"status": "skipped", "reason": "HTTP disabled for this run", **stats([])}
            entry["smartnoise"] = smartnoise_entry(w, sn, skipped)
            run_entry["workloads"][w.name] = entry
            s = entry["smartnoise"]
            if s["p50_ms"] is not None:
                opts.log(f"    {w.name:<18} SmartNoise p50 {s['p50_ms']:.0f} ms")
        if not opts.keep_data:
            Path(facts["source"]).unlink(missing_ok=True)
        results["runs"].append(run_entry)
    results["targets"] = report.targets(results)
    results["elapsed_s"] = time.time() - started
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (opts.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    markdown = report.markdown(results)
    (opts.out / "results.md").write_text(markdown)
    if opts.copy_markdown is not None:
        kept = report.accuracy_section(opts.copy_markdown.read_text()) if opts.copy_markdown.exists() else ""
        opts.copy_markdown.write_text(markdown + ("\n" + kept if kept else ""))
    opts.log(markdown)
    return results


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="table sizes")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per workload and engine")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--fresh",
        choices=["sql", "epsilon"],
        default="sql",
        help="make every timed query new by a distinct SQL text (default) or by a new ε",
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients for throughput")
    p.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="gateway worker processes (peak memory is then the supervisor's, not the workers')",
    )
    p.add_argument("--throughput-seconds", type=float, default=5.0)
    p.add_argument("--no-http", action="store_true", help="skip the HTTP server (and throughput, memory)")
    p.add_argument("--no-smartnoise", action="store_true", help="skip SmartNoise SQL")
    p.add_argument("--smartnoise-reps", type=int, default=5)
    p.add_argument("--smartnoise-max-rows", type=int, default=10_000_000)
    p.add_argument("--smartnoise-time-budget", type=float, default=60.0, help="seconds per workload (≥ 1 query)")
    p.add_argument("--smartnoise-venv", type=Path, default=HERE / ".venv-smartnoise")
    p.add_argument("--work", type=Path, default=HERE / "results" / "work", help="data and workspaces")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-copy", action="store_true", help="do not write benchmarks/RESULTS.md")
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=[w.name for w in WORKLOADS],
        help="run only these workloads (default: all)",
    )
    a = p.parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    return Options(
        rows=a.rows,
        reps=a.reps,
        warmup=a.warmup,
        fresh=a.fresh,
        clients=a.clients,
        server_workers=a.server_workers,
        throughput_seconds=a.throughput_seconds,
        http=not a.no_http,
        smartnoise=not a.no_smartnoise,
        smartnoise_reps=a.smartnoise_reps,
        smartnoise_max_rows=a.smartnoise_max_rows,
        smartnoise_time_budget_s=a.smartnoise_time_budget,
        smartnoise_venv=a.smartnoise_venv,
        work=a.work,
        out=a.out,
        copy_markdown=None if a.no_copy else HERE / "RESULTS.md",
        workloads=a.workloads,
        command=" ".join([".venv/bin/python -m benchmarks.run", *args]),
    )


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
