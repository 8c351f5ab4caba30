"""Releases the accuracy benchmark's queries through SmartNoise SQL. Runs in its own virtual environment
(SmartNoise SQL pins an older OpenDP than Bastion), so it imports nothing of Bastion:
`python accuracy_smartnoise_runner.py spec.json` prints one JSON object.

spec: {"parquet", "metadata", "delta", "epsilons", "reps", "queries": [{"name", "kind", "sql", "by",
"public_keys"}]}. SmartNoise's `Privacy(epsilon=...)` is the ε of each statistic, and a query may run several (AVG
is a SUM and a COUNT; a GROUP BY over keys it must censor adds a count of units); so the per-statistic ε is scaled
until `get_privacy_cost` of the query equals the benchmark's ε, the whole query's cost. A query over public keys
runs with `censor_dims: false` (the keys are not thresholded, as a declared domain would have them), a query over
private keys with `censor_dims: true` and the benchmark's δ. Output per query and ε (as a string): "values" (a
number, or {key: number} for grouped queries, per release), "times_s" and "cost" (ε, δ of the query, ε and δ per
statistic). SmartNoise SQL 1.0 reports no intervals ("Simple accuracy has been removed").
"""

from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from typing import Any


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    out: dict[str, Any] = {"results": {}}
    try:
        from importlib.metadata import version

        import pandas as pd
        import snsql
        from snsql import Privacy

        out["version"] = version("smartnoise-sql")
        out["opendp_version"] = version("opendp")
        frame = pd.read_parquet(spec["parquet"])
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
        return

    def metadata(censor: bool) -> dict[str, Any]:
        meta = copy.deepcopy(spec["metadata"])
        for schema in meta[""].values():
            for table in schema.values():
                table["censor_dims"] = censor
        return meta

    readers = {censor: snsql.from_df(frame, privacy=Privacy(), metadata=metadata(censor)) for censor in (False, True)}

    def calibrated(q: dict[str, Any], epsilon: float) -> tuple[Any, dict[str, Any]]:
        """The reader whose per-statistic ε makes the query cost `epsilon` in all."""
        censor = q["kind"] == "private_keys"
        target_delta = spec["delta"] if censor else 0.0
        reader = readers[censor]
        per, delta = epsilon, target_delta
        for _ in range(20):
            reader.privacy = Privacy(epsilon=per, delta=delta)
            cost_eps, cost_delta = reader.get_privacy_cost(q["sql"])
            if abs(cost_eps - epsilon) <= 1e-9 * epsilon and (not censor or cost_delta <= target_delta):
                break
            per *= epsilon / cost_eps
            if censor:
                delta *= target_delta / cost_delta
        return reader, {"epsilon": cost_eps, "delta": cost_delta, "epsilon_per_statistic": per, "delta_set": delta}

    for q in spec["queries"]:
        by_eps: dict[str, Any] = {}
        for epsilon in spec["epsilons"]:
            entry: dict[str, Any] = {"values": [], "times_s": []}
            try:
                reader, entry["cost"] = calibrated(q, epsilon)
                for _ in range(spec["reps"]):
                    t = time.perf_counter()
                    rows = reader.execute(q["sql"])
                    entry["times_s"].append(time.perf_counter() - t)
                    header, body = rows[0], rows[1:]
                    value_at = len(header) - 1  # the aggregate is the last output column
                    if q.get("by"):
                        entry["values"].append({str(row[0]): float(row[value_at]) for row in body})
                    else:
                        ((row),) = body
                        entry["values"].append(float(row[value_at]))
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                entry["trace"] = traceback.format_exc(limit=3)[-800:]
            by_eps[str(epsilon)] = entry
        out["results"][q["name"]] = by_eps
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
