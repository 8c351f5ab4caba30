"""Accuracy per ε: Bastion against SmartNoise SQL and OpenDP's Polars context on one generated table.

    .venv/bin/python -m benchmarks.accuracy                       # ~15 min: 200,000 rows, 100 releases, both peers
    .venv/bin/python -m benchmarks.accuracy --quick               # seconds: 20,000 rows, 10 releases, no peers
    .venv/bin/python -m benchmarks.accuracy --quick --peers opendp
    .venv/bin/python -m benchmarks.accuracy --queries median median_value --peers opendp   # the medians, full size
    .venv/bin/python -m benchmarks.accuracy --queries private_keys --peers --accounting zcdp   # Bastion under zCDP

The table (`benchmarks.accuracy_data`: ~50,000 persons, at most 5 rows each, so it is already bounded and every tool
reads the same rows) is registered with Bastion, whose pre-bounded table then holds exactly those rows; the exact
answers are the queries' plain SQL (`Workload.raw_sql`) run by DuckDB on that table. Each query is released `--bastion-
reps` times (default 10 × `reps`) at each ε by Bastion in process (`Bastion.query`, a distinct SQL text each time so
none is cached), and `reps` times by each peer in its own virtual environment (`accuracy_smartnoise_runner.py`,
`accuracy_opendp_runner.py`, which import nothing of Bastion), with the same privacy unit (5 rows per person), bounds, ε
per query and δ for key selection. Per query, tool and ε: median and p95 absolute error (over releases, and over keys
for grouped queries: kept keys only), the median reported 95% half-width and the empirical coverage of the reported
interval, the keys kept (private keys) and the time per release. "MEDIAN, value only" is the same SQL released by
Bastion with `quantile_interval` false (the value only, by one selection at the whole ε, no interval), compared
with the peers' releases of MEDIAN (which they run once). Then the targets, each met, met within sampling error
(see `worse_share` and FAMILY_ALPHA) or not met.

With `--accounting zcdp` Bastion's dataset uses zCDP accounting and each release is asked for at the ρ that makes it
as private as the peers' at the same ε (`bastion_request`): the largest ρ whose OpenDP conversion at δ/2 is within ε,
δ = the peers' key-selection δ, with the other δ/2 for Bastion's key selection, so a private-key release is (ε, δ)-DP
as the peers' thresholds are (and any other release (ε, δ/2)-DP); the peers run as before. Its report is written to
`accuracy_zcdp.json` and `accuracy_zcdp.md`.

Writes `<out>/accuracy.json` and `<out>/accuracy.md`; with --update-results also the accuracy section of
`benchmarks/RESULTS.md`. `--rejudge <out>/accuracy.json` judges an earlier run's figures again with this code's
rules (no release) and rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import accuracy_data, data, report
from benchmarks.run import HERE, SMARTNOISE_REQUIREMENTS, duckdb_engine, ensure_venv, machine
from benchmarks.workloads import SMARTNOISE_TABLE, Workload
from gateway.service import Bastion, Context
from gateway.settings import Settings
from policies.accountant import Accounting, conversion_delta, rho_cap
from policies.schema import load_policy

EPSILONS = (1.0, 0.1)
ALPHA = 0.05
QUANTILE_GRID_POINTS = 1024  # the fixed grid of candidates that the quantile target is measured against
PEERS = ("smartnoise", "opendp")
TOOLS = ("bastion", *PEERS)
TOOL_TITLES = {"bastion": "Bastion", "smartnoise": "SmartNoise SQL", "opendp": "OpenDP Polars"}
OPENDP_REQUIREMENTS = ["opendp[polars]==0.16.0", "pyarrow"]
RUNNERS = {"smartnoise": HERE / "accuracy_smartnoise_runner.py", "opendp": HERE / "accuracy_opendp_runner.py"}
# A public upper bound on the rows of any group, for OpenDP's float sums (the population the table is drawn from).
OPENDP_MAX_LENGTH = 10_000_000
# Bastion's median error counts as worse than a peer's only if it is larger in at least 1 - FAMILY_ALPHA / n of
# the bootstrap resamples of both tools' errors, n the number of such comparisons in the run (one-sided tests with
# Bonferroni's correction): a run whose every comparison is between equal mechanisms then judges any of them "not
# met" about 1 time in 40, where a test at 2.5% each (with 12 comparisons) would do so about 1 time in 4.
FAMILY_ALPHA = 0.025
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 16


class Kind(StrEnum):
    COUNT = "count"
    SUM = "sum"
    AVG = "avg"
    GROUPED_COUNT = "grouped_count"
    PRIVATE_KEYS = "private_keys"
    MEDIAN = "median"


@dataclass(frozen=True)
class Query:
    kind: Kind
    workload: Workload
    column: str | None = None
    by: str | None = None
    # Bastion's request option quantile_interval false: the value only, by one selection at the whole ε. The peers
    # do not run such a row again: it is compared with their figures of `peers_of` (the same SQL).
    value_only: bool = False
    peers_of: str | None = None

    @property
    def name(self) -> str:
        return self.workload.name


SCORE = "score"
QUERIES: list[Query] = [
    Query(
        Kind.COUNT, Workload("count", "COUNT(*)", "SELECT COUNT(*) AS n{v} FROM {t}", "SELECT COUNT(*) AS n FROM {t}")
    ),
    Query(
        Kind.SUM,
        Workload(
            "sum", f"SUM({SCORE})", f"SELECT SUM({SCORE}) AS total{{v}} FROM {{t}}", f"SELECT SUM({SCORE}) FROM {{t}}"
        ),
        column=SCORE,
    ),
    Query(
        Kind.AVG,
        Workload(
            "avg", f"AVG({SCORE})", f"SELECT AVG({SCORE}) AS mean{{v}} FROM {{t}}", f"SELECT AVG({SCORE}) FROM {{t}}"
        ),
        column=SCORE,
    ),
    Query(
        Kind.GROUPED_COUNT,
        Workload(
            "grouped_count",
            "COUNT by region (public keys)",
            "SELECT region, COUNT(*) AS n{v} FROM {t} GROUP BY region",
            "SELECT region, COUNT(*) AS n FROM {t} GROUP BY region",
        ),
        by="region",
    ),
    Query(
        Kind.PRIVATE_KEYS,
        Workload(
            "private_keys",
            "COUNT by product (private keys)",
            "SELECT product, COUNT(*) AS n{v} FROM {t} GROUP BY product",
            "SELECT product, COUNT(*) AS n FROM {t} GROUP BY product",
            private_keys=True,
        ),
        by="product",
    ),
    Query(
        Kind.MEDIAN,
        Workload(
            "median",
            f"MEDIAN({SCORE})",
            f"SELECT MEDIAN({SCORE}) AS median{{v}} FROM {{t}}",
            None,
            unsupported="SmartNoise SQL has no private quantile",
        ),
        column=SCORE,
    ),
    Query(
        Kind.MEDIAN,
        Workload(
            "median_value",
            f"MEDIAN({SCORE}), value only",
            f"SELECT MEDIAN({SCORE}) AS median{{v}} FROM {{t}}",
            None,
            unsupported="SmartNoise SQL has no private quantile",
        ),
        column=SCORE,
        value_only=True,
        peers_of="median",
    ),
]
QUERY_NAMES = tuple(q.name for q in QUERIES)

# One release: a number, or {key: number} for a grouped query; its intervals alike (None where none is reported).
Value = float | dict[str, float]
Interval = tuple[float, float] | None


@dataclass
class Releases:
    """`reps` releases of one query by one tool at one ε."""

    values: list[Value] = field(default_factory=list)
    intervals: list[Interval | dict[str, Interval]] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Options:
    rows: int = 200_000
    reps: int = 100
    # Bastion's releases are cheap (milliseconds): more of them make its side of every comparison exact enough
    # that a verdict turns on the peers' sampling error alone (and the AVG interval's p95 on 1,000 errors, not 100).
    bastion_reps: int = 1_000
    epsilons: tuple[float, ...] = EPSILONS
    queries: tuple[str, ...] = QUERY_NAMES
    peers: tuple[str, ...] = PEERS
    smartnoise_venv: Path = HERE / ".venv-smartnoise"
    opendp_venv: Path = HERE / ".venv-opendp-polars"
    work: Path = HERE / "results" / "accuracy"
    out: Path = HERE / "results"
    update_results: bool = False
    rejudge: Path | None = None
    command: str | None = None
    accounting: Accounting = Accounting.PURE
    log: Callable[[str], None] = print


# --- Bastion in process ---------------------------------------------------------------------------------


def bastion_request(accounting: Accounting, epsilon: float, private_keys: bool) -> tuple[float, float | None, float]:
    """The `epsilon` and `delta` of a Bastion request that is as private as the peers' releases at `epsilon`, and
    the ρ it costs (0 under pure accounting).

    Pure: ε itself, and the peers' δ (`data.QUERY_DELTA`) for key selection. zCDP: the largest ρ whose OpenDP
    conversion at δ/2 is within ε (`rho_cap`, as a policy's cap is converted), asked for as the ε with ε²/2 = ρ, and
    the other δ/2 for key selection: a private-key release is then (ε, δ)-DP as the peers' thresholds are, and any
    other (ε, δ/2)-DP."""
    if accounting is Accounting.PURE:
        return epsilon, data.QUERY_DELTA if private_keys else None, 0.0
    rho = rho_cap(epsilon, data.QUERY_DELTA)
    selection = data.QUERY_DELTA - conversion_delta(data.QUERY_DELTA)
    return math.sqrt(2 * rho), selection if private_keys else None, rho


def run_bastion(opts: Options, source: Path, policy: Path) -> tuple[dict[str, Any], dict[str, Value], dict]:
    """Register the table in a fresh workspace, compute the exact answers on its pre-bounded table and release
    every query `reps` times at each ε. Returns the table's facts, the exact answers and the releases."""
    ws = opts.work / "workspace"
    if ws.exists():
        shutil.rmtree(ws)
    settings = Settings(workspace=ws)
    settings.save()
    bastion = Bastion(settings, read_only=False)
    releases: dict[str, dict[float, Releases]] = {}
    try:
        bastion.engine.register(load_policy(policy), source)
        _, principal = bastion.tokens.create("accuracy", "analyst")
        con = duckdb_engine(bastion).connect()
        exact: dict[str, Value] = {}
        for q in QUERIES:
            rows = con.execute(q.workload.raw_sql()).fetchall()
            exact[q.name] = {str(k): float(v) for k, v in rows} if q.by else float(rows[0][0])
        source_rows = con.execute("SELECT COUNT(*), COUNT(DISTINCT person_id) FROM read_parquet(?)", [str(source)])
        (n_rows, n_units) = source_rows.fetchone() or (0, 0)
        if exact["count"] != n_rows:
            raise RuntimeError(f"the pre-bounded table has {exact['count']} rows, the source {n_rows}: not the same")
        facts = {"rows": int(n_rows), "units": int(n_units), "source": str(source)}
        variant = 0
        for q in selected(opts):
            releases[q.name] = {}
            for eps in opts.epsilons:
                r = Releases()
                asked, delta, rho = bastion_request(opts.accounting, eps, q.workload.private_keys)
                if rho:
                    r.extra["rho"] = rho
                for _ in range(opts.bastion_reps):
                    variant += 1
                    ctx = Context(principal, source="benchmark")
                    t = time.perf_counter()
                    answer = bastion.query(
                        ctx, q.workload.sql(variant), epsilon=asked, delta=delta, quantile_interval=not q.value_only
                    )
                    r.times_s.append(time.perf_counter() - t)
                    if answer["cached"]:
                        raise RuntimeError(f"a release was answered from the cache: {q.workload.sql(variant)}")
                    r.values.append(_bastion_value(q, answer["rows"]))
                    r.intervals.append(_bastion_interval(q, answer["rows"], answer["intervals"]))
                    facts["epsilon_spent"] = answer["budget"]["spent"]["epsilon"]
                    if rho:
                        facts["rho_spent"] = answer["budget"]["spent"]["rho"]
                releases[q.name][eps] = r
                opts.log(f"  bastion {q.name:<14} ε={eps:<4} {np.median(r.times_s) * 1e3:.1f} ms/release")
    finally:
        bastion.close()
    return facts, exact, releases


def selected(opts: Options) -> list[Query]:
    """The queries this run releases (--queries), in their order; a value-only row brings the peers' row it is
    compared with."""
    return [q for q in QUERIES if q.name in opts.queries]


def _peer_queries(opts: Options) -> list[Query]:
    """The queries the peers release: the selected ones that are not Bastion-only modes, and those that a
    selected value-only row is compared with."""
    wanted = {q.peers_of or q.name for q in selected(opts)}
    return [q for q in QUERIES if q.name in wanted and not q.value_only]


def _bastion_value(q: Query, rows: list[list[Any]]) -> Value:
    if q.by:
        return {str(row[0]): float(row[1]) for row in rows}
    return float(rows[0][0])


def _as_interval(cell: Any) -> Interval:
    return None if cell is None else (float(cell[0]), float(cell[1]))


def _bastion_interval(q: Query, rows: list[list[Any]], intervals: list[list[Any]]) -> Interval | dict[str, Interval]:
    if q.by:
        return {str(row[0]): _as_interval(iv[1]) for row, iv in zip(rows, intervals, strict=True)}
    return _as_interval(intervals[0][0])


# --- the peers, each in its own environment -------------------------------------------------------------


def peer_spec(peer: str, opts: Options, source: Path) -> dict[str, Any]:
    low, high = accuracy_data.SCORE_BOUNDS
    common = {"parquet": str(source), "delta": data.QUERY_DELTA, "epsilons": list(opts.epsilons), "reps": opts.reps}
    queries: list[dict[str, Any]]
    if peer == "smartnoise":
        queries = [
            {"name": q.name, "kind": q.kind.value, "sql": q.workload.smartnoise_sql(), "by": q.by}
            for q in _peer_queries(opts)
            if q.workload.smartnoise is not None
        ]
        return {**common, "metadata": accuracy_data.smartnoise_metadata(SMARTNOISE_TABLE), "queries": queries}
    step = 0.01  # OpenDP's median picks from the candidates it is given: 100,001 of them, far finer than the noise
    candidates = np.round(np.arange(low, high + step / 2, step), 2).tolist()
    queries = [
        {
            "name": q.name,
            "kind": q.kind.value,
            "column": q.column,
            "bounds": [low, high],
            "by": q.by,
            **({"candidates": candidates} if q.kind is Kind.MEDIAN else {}),
        }
        for q in _peer_queries(opts)
    ]
    return {
        **common,
        "contributions": data.MAX_ROWS_PER_UNIT,
        "alpha": ALPHA,
        "max_length": OPENDP_MAX_LENGTH,
        "queries": queries,
    }


def start_peer(peer: str, opts: Options, source: Path) -> tuple[subprocess.Popen[str] | None, dict[str, Any]]:
    """Start a peer's runner in its environment (installed if needed); (None, why) if it cannot run."""
    venv, requirements, imports = {
        "smartnoise": (opts.smartnoise_venv, SMARTNOISE_REQUIREMENTS, "snsql, pyarrow"),
        "opendp": (opts.opendp_venv, OPENDP_REQUIREMENTS, "opendp, polars, pyarrow"),
    }[peer]
    py, why = ensure_venv(venv, requirements, imports, opts.log)
    if py is None:
        return None, {"status": "unavailable", "reason": why}
    spec = opts.work / f"{peer}_spec.json"
    spec.write_text(json.dumps(peer_spec(peer, opts, source)))
    stdout = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([str(py), str(RUNNERS[peer]), str(spec)], stdout=stdout, stderr=subprocess.PIPE, text=True)
    return proc, {"status": "running", "stdout": stdout}


def finish_peer(proc: subprocess.Popen[str], state: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Wait for a runner; its facts (version, status) and releases per query and ε."""
    _, stderr = proc.communicate()
    stdout = state["stdout"]
    stdout.seek(0)
    lines = stdout.read().strip().splitlines()
    stdout.close()
    try:
        out = json.loads(lines[-1])
    except (ValueError, IndexError):
        return {"status": "error", "reason": f"runner exited {proc.returncode}: {stderr.strip()[-500:]}"}, {}
    if out.get("error"):
        return {"status": "error", "reason": out["error"]}, {}
    releases: dict[str, dict[float, Releases]] = {}
    for name, by_eps in out["results"].items():
        releases[name] = {}
        for eps_text, entry in by_eps.items():
            r = Releases(values=entry["values"], times_s=entry["times_s"], error=entry.get("error"))
            r.intervals = [_peer_interval(v, w) for v, w in zip(entry["values"], _widths(entry), strict=True)]
            r.extra = {k: entry[k] for k in ("cost", "resolve_s") if k in entry}
            releases[name][float(eps_text)] = r
    facts = {"status": "ok", **{k: out[k] for k in ("version", "opendp_version", "polars_version") if k in out}}
    return facts, releases


def _widths(entry: dict[str, Any]) -> list[Any]:
    return entry.get("half_widths") or [None] * len(entry["values"])


def _peer_interval(value: Value, width: Any) -> Interval | dict[str, Interval]:
    if isinstance(value, dict):
        return {k: None if width is None else (v - width[k], v + width[k]) for k, v in value.items()}
    return None if width is None else (value - width, value + width)


# --- figures and targets --------------------------------------------------------------------------------


def summarize(q: Query, exact: Value, r: Releases) -> dict[str, Any]:
    """Errors, half-widths, coverage, keys kept and time of one tool's releases of one query at one ε."""
    if r.error or not r.values:
        return {"status": "error", "reason": r.error or "no release"}
    errors: list[float] = []
    widths: list[float] = []
    covered: list[bool] = []
    kept: list[int] = []
    spurious = 0
    for value, interval in zip(r.values, r.intervals or [None] * len(r.values), strict=True):
        if isinstance(value, dict):
            assert isinstance(exact, dict)
            kept.append(sum(1 for k in value if k in exact))
            spurious += sum(1 for k in value if k not in exact)
            cells = [(value[k], exact[k], interval.get(k) if isinstance(interval, dict) else None) for k in value]
        else:
            assert not isinstance(exact, dict) and not isinstance(interval, dict)
            cells = [(value, exact, interval)]
        for v, truth, iv in cells:
            if v != v or truth is None:  # a key the truth does not have: counted as spurious above
                continue
            errors.append(abs(v - truth))
            if iv is not None:
                widths.append((iv[1] - iv[0]) / 2)
                covered.append(iv[0] <= truth <= iv[1])
    err = np.asarray(errors)
    out: dict[str, Any] = {
        "status": "ok",
        "releases": len(r.values),
        "cells": len(err),
        "errors": err.tolist(),
        "median_error": float(np.median(err)),
        "p95_error": float(np.percentile(err, 95)),
        "half_width": float(np.median(widths)) if widths else None,
        "coverage": float(np.mean(covered)) if covered else None,
        "ms_per_release": float(np.median(r.times_s) * 1e3) if r.times_s else None,
        **r.extra,
    }
    if kept:
        total = len(exact) if isinstance(exact, dict) else 0
        out.update(keys_kept=float(np.mean(kept)), keys_kept_min=int(min(kept)), keys_total=total, spurious=spurious)
        out["keys_kept_se"] = float(np.std(kept, ddof=1) / np.sqrt(len(kept))) if len(kept) > 1 else 0.0
    return out


def worse_share(errors: list[float], peer_errors: list[float]) -> float:
    """The share of bootstrap resamples (of both samples) in which the first sample's median exceeds the second's.
    The resampling is the benchmark's own analysis of released values, not noise of a release."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    a, b = np.asarray(errors), np.asarray(peer_errors)
    ma = np.median(a[rng.integers(0, len(a), (BOOTSTRAP_RESAMPLES, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), (BOOTSTRAP_RESAMPLES, len(b)))], axis=1)
    return float(np.mean(ma > mb))


def _peers_ok(cells: dict[str, dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {p: cells[p][key] for p in PEERS if cells.get(p, {}).get(key, {}).get("status") == "ok"}


def worse_share_needed(figures: dict[str, dict[str, dict[str, Any]]], epsilons: tuple[float, ...]) -> float:
    """The bootstrap share above which Bastion's median error is judged worse than the best peer's: 1 -
    FAMILY_ALPHA / n over the n comparisons the run makes (Bastion and at least one peer measured)."""
    n = sum(
        1
        for q in QUERIES
        if q.name in figures
        for eps in epsilons
        if figures[q.name].get("bastion", {}).get(f"{eps:g}", {}).get("status") == "ok"
        and _peers_ok(figures[q.name], f"{eps:g}")
    )
    return 1 - FAMILY_ALPHA / max(n, 1)


def targets(figures: dict[str, dict[str, dict[str, Any]]], epsilons: tuple[float, ...]) -> list[dict[str, Any]]:
    """The issue's targets per query and ε, each met, met within sampling error, not met, or not measured."""
    out: list[dict[str, Any]] = []
    low, high = accuracy_data.SCORE_BOUNDS
    needed = worse_share_needed(figures, epsilons)
    half_step = (high - low) / (QUANTILE_GRID_POINTS - 1) / 2
    for q in QUERIES:
        if q.name not in figures:
            continue
        for eps in epsilons:
            key = f"{eps:g}"
            cells = figures[q.name]
            b = cells["bastion"].get(key, {})
            peers = _peers_ok(cells, key)
            where = {"query": q.name, "epsilon": eps}
            if b.get("status") != "ok":
                out.append({**where, "target": "median error", "status": "not measured", "detail": "Bastion failed"})
                continue
            if peers:
                best = min(peers, key=lambda p: peers[p]["median_error"])
                bp = peers[best]
                share = worse_share(b["errors"], bp["errors"])
                if b["median_error"] <= bp["median_error"]:
                    status = "met"
                elif share < needed:
                    status = "met within sampling error"
                else:
                    status = "not met"
                detail = (
                    f"Bastion {b['median_error']:.4g} vs {TOOL_TITLES[best]} {bp['median_error']:.4g} "
                    f"(Bastion's larger in {share:.1%} of bootstrap resamples; worse from {needed:.2%})"
                )
                out.append({**where, "target": "median error ≤ best peer's", "status": status, "detail": detail})
            else:
                out.append({**where, "target": "median error ≤ best peer's", "status": "not measured", "detail": ""})
            if q.kind is Kind.PRIVATE_KEYS:
                if peers:
                    best = max(peers, key=lambda p: peers[p]["keys_kept"])
                    bk, pk = b["keys_kept"], peers[best]["keys_kept"]
                    # two standard errors of the difference of the two means (the same mechanism keeps 23.6 keys
                    # on average for both, and one of the two sample means is always the smaller)
                    tolerance = 2 * float(np.hypot(b.get("keys_kept_se", 0.0), peers[best].get("keys_kept_se", 0.0)))
                    status = "met" if bk >= pk else "met within sampling error" if bk >= pk - tolerance else "not met"
                    detail = f"Bastion {bk:.2f} vs {TOOL_TITLES[best]} {pk:.2f} of {b['keys_total']} (mean per release"
                    detail += f"; two standard errors of the difference: {tolerance:.2f})"
                else:
                    status, detail = "not measured", ""
                out.append({**where, "target": "keys kept ≥ best peer's", "status": status, "detail": detail})
            if q.kind is Kind.MEDIAN:
                met = b["median_error"] < half_step
                detail = f"{b['median_error']:.4g} vs half the {QUANTILE_GRID_POINTS}-point grid step {half_step:.4g}"
                out.append(
                    {
                        **where,
                        "target": "error < half grid step",
                        "status": "met" if met else "not met",
                        "detail": detail,
                    }
                )
            if q.kind is Kind.AVG:
                hw, cov = b.get("half_width"), b.get("coverage")
                if hw is None or cov is None:
                    out.append({**where, "target": "AVG interval", "status": "not met", "detail": "no interval"})
                else:
                    ratio = hw / b["p95_error"] if b["p95_error"] > 0 else float("inf")
                    met = ratio <= 1.25 and cov >= 0.95
                    detail = f"half-width {ratio:.2f}× the p95 error, coverage {cov:.1%}"
                    target = "AVG half-width ≤ 1.25× p95, coverage ≥ 95%"
                    out.append({**where, "target": target, "status": "met" if met else "not met", "detail": detail})
    return out


# --- report ---------------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    if x != 0 and (abs(x) >= 10**digits or abs(x) < 10 ** -(digits - 1)):
        return f"{x:.{digits - 1}g}"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def summary(results: dict[str, Any]) -> list[str]:
    """The short table (the README's): median absolute error per query, ε and tool; keys kept of private keys."""
    tools = [t for t in TOOLS if t == "bastion" or t in results["peers"]]
    lines = [
        "| query | ε | " + " | ".join(TOOL_TITLES[t] for t in tools) + " |",
        "|---|---|" + "---|" * len(tools),
    ]
    for q in QUERIES:
        if q.name not in results["figures"]:
            continue
        for eps in results["config"]["epsilons"]:
            cells = []
            for tool in tools:
                cell = results["figures"][q.name].get(tool, {}).get(f"{eps:g}")
                if cell is None or cell["status"] != "ok":
                    cells.append("–" if cell is None else cell["status"])
                    continue
                text = _num(cell["median_error"])
                if q.kind is Kind.PRIVATE_KEYS:
                    text += f" ({cell['keys_kept']:.1f} of {cell['keys_total']} keys)"
                cells.append(text)
            lines.append(f"| {q.workload.title} | {eps:g} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    f = results["facts"]
    cfg = results["config"]
    zcdp = cfg.get("accounting") == Accounting.ZCDP.value
    lines = [
        "## Accuracy per ε" + (" (Bastion under zCDP accounting)" if zcdp else ""),
        "",
        f"`{cfg['command']}` on {results['finished_at']}: {f['rows']:,} rows of {f['units']:,} persons (at most "
        f"{data.MAX_ROWS_PER_UNIT} rows each, the same bounded rows for every tool), {cfg['reps']} releases per query, "
        f"peer and ε ({cfg.get('bastion_reps', cfg['reps'])} for Bastion, whose releases are cheap). Errors are "
        f"absolute, against the exact answer; grouped queries pool every released key "
        f"(private keys: the kept ones). Half-width: the median reported 95% half-width; coverage: how often the "
        f"reported interval held the exact answer. Time: median per release.",
        "",
    ]
    if zcdp:
        lines[-1:-1] = [
            "",
            f"Bastion's dataset uses zCDP accounting: each release at ε is asked for at the largest ρ whose OpenDP "
            f"conversion at δ/2 is within ε (δ = {cfg['delta']:g}, the peers' key-selection δ), with the other δ/2 "
            f"for its key selection, so a private-key release is (ε, δ)-DP as the peers' thresholds are (any other "
            f"(ε, δ/2)-DP). ρ per release: "
            + ", ".join(f"{rho:.4g} at ε = {eps}" for eps, rho in cfg.get("rho", {}).items())
            + ".",
        ]
    for name, tool in results["peers"].items():
        state = tool.get("version") or tool.get("reason", "")
        lines.append(f"- {TOOL_TITLES[name]}: {tool['status']} {state}".rstrip())
    if results["peers"]:
        lines.append("")
    lines += ["Median absolute error (private keys: and the keys kept, mean per release):", ""]
    lines += summary(results)
    lines += [
        "",
        "| query | ε | tool | median error | p95 error | half-width | coverage | keys kept | ms/release |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for q in QUERIES:
        if q.name not in results["figures"]:
            continue
        for eps in cfg["epsilons"]:
            for tool in TOOLS:
                cell = results["figures"][q.name].get(tool, {}).get(f"{eps:g}")
                if cell is None:
                    continue
                head = f"| {q.workload.title} | {eps:g} | {TOOL_TITLES[tool]} |"
                if cell["status"] != "ok":
                    lines.append(f"{head} {cell['status']}: {cell.get('reason', '')[:80]} | | | | | |")
                    continue
                kept = (
                    f"{cell['keys_kept']:.1f} of {cell['keys_total']} (min {cell['keys_kept_min']})"
                    if "keys_kept" in cell
                    else "–"
                )
                cov = "–" if cell["coverage"] is None else f"{cell['coverage']:.1%}"
                lines.append(
                    f"{head} {_num(cell['median_error'])} | {_num(cell['p95_error'])} | {_num(cell['half_width'])} | "
                    f"{cov} | {kept} | {_num(cell['ms_per_release'], 3)} |"
                )
    resolve = [
        cell["resolve_s"]
        for by_tool in results["figures"].values()
        for cell in by_tool.get("opendp", {}).values()
        if "resolve_s" in cell
    ]
    if resolve:
        lines += [
            "",
            f"OpenDP Polars's times are of releasing a resolved measurement; resolving a query (its calibration, a "
            f"binary search over the noise scale) took {min(resolve):.1f}-{max(resolve):.1f} s once per query and ε.",
        ]
    lines += ["", "### Accuracy targets", "", "| query | ε | target | status | figures |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['query']} | {t['epsilon']:g} | {t['target']} | {t['status']} | {t['detail']} |")
    return "\n".join(lines) + "\n"


# --- the whole benchmark --------------------------------------------------------------------------------


def run(opts: Options) -> dict[str, Any]:
    started = time.time()
    opts.work.mkdir(parents=True, exist_ok=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    source, policy = accuracy_data.write(opts.work / "data", opts.rows, accounting=opts.accounting.value)
    opts.log(f"== {opts.rows:,} rows, {opts.reps} releases per query and ε {list(opts.epsilons)}")
    facts, exact, bastion_releases = run_bastion(opts, source, policy)
    releases: dict[str, dict[str, dict[float, Releases]]] = {"bastion": bastion_releases}
    peers: dict[str, dict[str, Any]] = {}
    for peer in opts.peers:  # one after the other, so that their times are not taken on a shared CPU
        opts.log(f"  {TOOL_TITLES[peer]} ...")
        proc, state = start_peer(peer, opts, source)
        if proc is None:
            peers[peer] = state
            continue
        peers[peer], releases[peer] = finish_peer(proc, state)
        opts.log(f"  {TOOL_TITLES[peer]}: {peers[peer]['status']} {peers[peer].get('reason', '')}".rstrip())
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for q in selected(opts):
        figures[q.name] = {}
        for tool, by_query in releases.items():
            name = q.name if tool == "bastion" else q.peers_of or q.name  # a value-only row: the peers' same SQL
            if name in by_query:
                figures[q.name][tool] = {f"{e:g}": summarize(q, exact[name], r) for e, r in by_query[name].items()}
    results: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "rows": opts.rows,
            "reps": opts.reps,
            "bastion_reps": opts.bastion_reps,
            "epsilons": list(opts.epsilons),
            "queries": list(opts.queries),
            "delta": data.QUERY_DELTA,
            "alpha": ALPHA,
            "max_rows_per_unit": data.MAX_ROWS_PER_UNIT,
            "score_bounds": list(accuracy_data.SCORE_BOUNDS),
            "peers": list(opts.peers),
            "command": opts.command,
            "accounting": opts.accounting.value,
            **(
                {"rho": {f"{e:g}": bastion_request(opts.accounting, e, False)[2] for e in opts.epsilons}}
                if opts.accounting is Accounting.ZCDP
                else {}
            ),
        },
        "facts": facts,
        "queries": [
            {
                "name": q.name,
                "title": q.workload.title,
                "sql": q.workload.sql(),
                "smartnoise_sql": q.workload.smartnoise_sql(),
                **({"quantile_interval": False} if q.value_only else {}),
            }
            for q in selected(opts)
        ],
        "exact": exact,
        "peers": peers,
        "figures": figures,
    }
    results["targets"] = targets(figures, opts.epsilons)
    results["elapsed_s"] = time.time() - started
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return write_report(results, opts)


def write_report(results: dict[str, Any], opts: Options) -> dict[str, Any]:
    """Write the run's JSON and Markdown (and RESULTS.md's accuracy section with --update-results)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(results["config"].get("accounting", Accounting.PURE.value))
    (opts.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (opts.out / f"{stem}.md").write_text(text)
    if opts.update_results:
        path = HERE / "RESULTS.md"
        path.write_text(report.with_accuracy_section(path.read_text() if path.exists() else "", text))
    opts.log(text)
    return results


def report_stem(accounting: str) -> str:
    """The name of a run's report files: `accuracy`, or `accuracy_zcdp` for a run under zCDP accounting."""
    return "accuracy" if accounting == Accounting.PURE.value else f"accuracy_{accounting}"


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="rows of the generated table (default 200,000; 20,000 with --quick)")
    p.add_argument("--reps", type=int, help="releases per query, peer and ε (default 100; 10 with --quick)")
    p.add_argument("--bastion-reps", type=int, help="Bastion's releases per query and ε (default 10 × --reps)")
    p.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    p.add_argument(
        "--queries",
        nargs="+",
        choices=QUERY_NAMES,
        default=list(QUERY_NAMES),
        help="the queries to release (default: all); e.g. --queries median median_value",
    )
    p.add_argument("--quick", action="store_true", help="a small table, few releases and no peers unless --peers")
    p.add_argument("--peers", nargs="*", choices=PEERS, help="peers to run (default: both; none with --quick)")
    p.add_argument("--smartnoise-venv", type=Path, default=HERE / ".venv-smartnoise")
    p.add_argument("--opendp-venv", type=Path, default=HERE / ".venv-opendp-polars")
    p.add_argument("--work", type=Path, default=HERE / "results" / "accuracy", help="data and workspace")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--update-results", action="store_true", help="write the accuracy section of RESULTS.md")
    p.add_argument(
        "--accounting",
        choices=[a.value for a in Accounting],
        default=Accounting.PURE.value,
        help="Bastion's accounting (default pure): zcdp releases each query at the ρ whose (ε, δ) conversion is the "
        "peers' ε and δ, and writes accuracy_zcdp.json / .md",
    )
    p.add_argument(
        "--rejudge",
        type=Path,
        metavar="JSON",
        help="judge the targets of an earlier run's accuracy.json again with this code's rules and rewrite its report"
        " (in --out), without releasing anything",
    )
    a = p.parse_args(argv)
    if a.update_results and a.accounting != Accounting.PURE.value:
        p.error("--update-results writes the pure-ε accuracy section of RESULTS.md; a zCDP run's report is its own")
    args = sys.argv[1:] if argv is None else argv
    peers = a.peers if a.peers is not None else ([] if a.quick else list(PEERS))
    return Options(
        rows=a.rows or (20_000 if a.quick else 200_000),
        reps=a.reps or (10 if a.quick else 100),
        bastion_reps=a.bastion_reps or 10 * (a.reps or (10 if a.quick else 100)),
        epsilons=tuple(a.epsilons),
        queries=tuple(a.queries),
        peers=tuple(peers),
        smartnoise_venv=a.smartnoise_venv,
        opendp_venv=a.opendp_venv,
        work=a.work,
        out=a.out,
        update_results=a.update_results,
        rejudge=a.rejudge,
        command=" ".join([".venv/bin/python -m benchmarks.accuracy", *args]),
        accounting=Accounting(a.accounting),
    )


def rejudge(opts: Options) -> dict[str, Any]:
    """Judge an earlier run's figures again with this code's rules: nothing is released again."""
    assert opts.rejudge is not None
    results = json.loads(opts.rejudge.read_text())
    results["targets"] = targets(results["figures"], tuple(results["config"]["epsilons"]))
    return write_report(results, opts)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.rejudge is not None:
        rejudge(opts)
    else:
        run(opts)


if __name__ == "__main__":
    main()
