"""Times SmartNoise SQL on the benchmark table. Runs in its own virtual environment (SmartNoise SQL pins an older
OpenDP than Bastion), so it imports nothing of Bastion: `python smartnoise_runner.py spec.json` prints one JSON
object with the timings.

spec: {"parquet", "metadata", "workloads": [{"name", "sql"}], "reps", "warmup", "epsilon", "delta",
"time_budget_s"}. Each workload runs `warmup` untimed and up to `reps` timed queries, stopping early (after at
least one timed query) once `time_budget_s` has passed.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    out: dict = {"workloads": {}}
    try:
        import pandas as pd
        import snsql
        from snsql import Privacy

        out["version"] = getattr(snsql, "__version__", None)
        try:
            from importlib.metadata import version

            out["version"] = version("smartnoise-sql")
            out["opendp_version"] = version("opendp")
        except Exception:
            pass
        t0 = time.perf_counter()
        df = pd.read_parquet(spec["parquet"])
        t1 = time.perf_counter()
        privacy = Privacy(epsilon=spec["epsilon"], delta=spec["delta"])
        reader = snsql.from_df(df, privacy=privacy, metadata=spec["metadata"])
        out["read_parquet_s"] = t1 - t0
        out["load_s"] = time.perf_counter() - t1  # PandasReader copies the frame into an in-memory SQLite
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
        return
    for w in spec["workloads"]:
        times: list[float] = []
        entry: dict = {"sql": w["sql"]}
        try:
            for _ in range(spec.get("warmup", 1)):
                reader.execute(w["sql"])
            start = time.perf_counter()
            for _ in range(spec["reps"]):
                t = time.perf_counter()
                reader.execute(w["sql"])
                times.append(time.perf_counter() - t)
                if time.perf_counter() - start > spec["time_budget_s"]:
                    break
            entry["times_s"] = times
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            entry["trace"] = traceback.format_exc(limit=2)[-600:]
            entry["times_s"] = times
        out["workloads"][w["name"]] = entry
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
