"""Times Tumult Analytics on the Spark benchmark table. Runs in its own virtual environment (Tumult Analytics pins
pandas and, on Python 3.11, PySpark versions Bastion does not use), so it imports nothing of Bastion:
`python tumult_peer.py spec.json` prints one JSON object with the timings as its last line.

spec: {"parquet", "unit", "max_rows_per_unit", "master", "conf": {Spark settings}, "epsilon", "reps", "warmup",
"time_budget_s", "max_run_s", "workloads": [{"name", "queries": [{"agg", "column", "low", "high", "filter",
"keys"}]}]}.

The session is built once over the unbounded source Parquet, protected change AddRowsWithID(unit); every query
enforces MaxRowsPerID(max_rows_per_unit) and groups by a KeySet of the public domain in `keys` (none: one total).
A workload's queries share `epsilon` evenly; one timed run evaluates all of them and collects every answer. One
untimed count warms the session up (the JVM's JIT, Python workers); then each workload runs `warmup` untimed and
up to `reps` timed runs, stopping early (after at least one) once `time_budget_s` has passed. A run still going
after `max_run_s` has its Spark jobs cancelled and is reported as `over_s` (a lower bound), and the workload stops.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from importlib.metadata import version
from typing import Any


def _query(spec: dict[str, Any], q: dict[str, Any]) -> Any:
    from tmlt.analytics import KeySet, MaxRowsPerID, QueryBuilder

    builder = QueryBuilder("events").enforce(MaxRowsPerID(int(spec["max_rows_per_unit"])))
    if q.get("filter"):
        builder = builder.filter(q["filter"])  # after the bound, as Bastion filters its pre-bounded table
    target: Any = builder.groupby(KeySet.from_dict(q["keys"])) if q.get("keys") else builder
    agg = q["agg"]
    if agg == "count":
        return target.count()
    if agg == "sum":
        return target.sum(q["column"], q["low"], q["high"])
    if agg == "average":
        return target.average(q["column"], q["low"], q["high"])
    if agg == "median":
        return target.median(q["column"], q["low"], q["high"])
    raise ValueError(f"unknown aggregate {agg!r}")


class Cap:
    """Cancels the session's Spark jobs, again and again, once a run has taken `seconds` (0: never)."""

    def __init__(self, spark: Any, seconds: float) -> None:
        self.spark, self.seconds = spark, seconds
        self.hit = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        self.hit = True
        while not self._done.is_set():
            self.spark.sparkContext.cancelAllJobs()
            self._done.wait(0.5)

    def __enter__(self) -> Cap:
        if self.seconds > 0:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    out: dict[str, Any] = {"workloads": {}}
    os.environ["PYSPARK_PYTHON"] = sys.executable  # Tumult's UDFs run in Python workers of this interpreter
    try:
        from pyspark.sql import SparkSession
        from tmlt.analytics import AddRowsWithID, PureDPBudget, Session

        out["version"] = version("tmlt.analytics")
        out["core_version"] = version("tmlt.core")
        out["pyspark_version"] = version("pyspark")
        out["python"] = sys.version.split()[0]
        builder = SparkSession.builder.master(spec["master"]).appName("tumult-peer")
        for k, v in spec["conf"].items():
            builder = builder.config(k, v)
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        t0 = time.perf_counter()
        df = spark.read.parquet(spec["parquet"])
        session = Session.from_dataframe(
            privacy_budget=PureDPBudget(float("inf")),
            source_id="events",
            dataframe=df,
            protected_change=AddRowsWithID(spec["unit"]),
        )
        out["session_s"] = time.perf_counter() - t0
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        print(json.dumps(out))
        return
    try:
        t0 = time.perf_counter()
        session.evaluate(_query(spec, {"agg": "count"}), PureDPBudget(float(spec["epsilon"]))).collect()
        out["warmup_s"] = time.perf_counter() - t0
        cap_s = float(spec.get("max_run_s", 0))
        for w in spec["workloads"]:
            entry: dict[str, Any] = {"queries": w["queries"]}
            times: list[float] = []
            try:
                queries = [_query(spec, q) for q in w["queries"]]
                budget = PureDPBudget(float(spec["epsilon"]) / len(queries))

                def run(queries: list[Any] = queries, budget: Any = budget) -> None:
                    for query in queries:
                        session.evaluate(query, budget).collect()

                start = time.perf_counter()
                for i in range(int(spec["warmup"]) + int(spec["reps"])):
                    t = time.perf_counter()
                    with Cap(spark, cap_s) as cap:
                        try:
                            run()
                        except Exception:
                            if not cap.hit:
                                raise
                    if cap.hit:
                        entry["over_s"] = time.perf_counter() - t
                        break
                    if i >= int(spec["warmup"]):
                        times.append(time.perf_counter() - t)
                        if time.perf_counter() - start > float(spec["time_budget_s"]):
                            break
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                entry["trace"] = traceback.format_exc(limit=3)[-800:]
            entry["times_s"] = times
            out["workloads"][w["name"]] = entry
            print(f"tumult {w['name']}: {len(times)} runs", file=sys.stderr, flush=True)
    finally:
        from tmlt.analytics.utils import cleanup

        cleanup()  # Tumult materialises intermediate tables in the warehouse: drop them
        spark.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
