"""Releases the accuracy benchmark's queries through OpenDP's Polars context. Runs in its own virtual environment
(`opendp[polars]`), so it imports nothing of Bastion: `python accuracy_opendp_runner.py spec.json` prints one JSON
object.

spec: {"parquet", "contributions", "delta", "alpha", "max_length", "epsilons", "reps", "queries": [{"name",
"kind", "column", "bounds", "by", "candidates"}]}; kinds: count, sum, avg, grouped_count (public keys), private_keys,
median. The table is already bounded to `contributions` rows per unit, so the privacy unit is
`dp.unit_of(contributions=...)`. Each query is resolved (OpenDP's calibration) once per ε, as Bastion reuses its
calibration per public (sensitivity, ε), and its measurement submitted `reps` times to a context holding `reps` × ε
split evenly; with δ (key selection) to a new context of (ε, δ) each time. Output per query and ε (as a string):
"values" (a number, or {key: number} for grouped queries, per release), "half_widths" (OpenDP's 95% accuracy where
`summarize` gives one for the released column, else null), "times_s" (release and collect) and "resolve_s" (the
calibration, once).
"""

from __future__ import annotations

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

        import opendp.prelude as dp
        import polars as pl

        dp.enable_features("contrib")
        out["version"] = version("opendp")
        out["polars_version"] = version("polars")
        frame = pl.read_parquet(spec["parquet"])
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
        return

    def context(q: dict[str, Any], epsilon: float, parts: int) -> Any:
        """A context for `parts` releases of a query at ε: `parts` equal parts of parts × ε (pure ε), or of
        parts × (ε, δ) where keys are selected (δ only there)."""
        keyed = q["kind"] == "private_keys"
        margins = [dp.polars.Margin(by=[], max_length=spec["max_length"])]
        if q["kind"] == "grouped_count":
            margins.append(dp.polars.Margin(by=[q["by"]], invariant="keys", max_length=spec["max_length"]))
        return dp.Context.compositor(
            data=frame.lazy(),
            privacy_unit=dp.unit_of(contributions=spec["contributions"]),
            privacy_loss=dp.loss_of(epsilon=parts * epsilon, delta=parts * spec["delta"] if keyed else None),
            split_evenly_over=parts,
            margins=margins,
        )

    def query(q: dict[str, Any], ctx: Any) -> Any:
        kind = q["kind"]
        if kind == "count":
            return ctx.query().select(dp.len(signed=True))
        if kind in ("grouped_count", "private_keys"):
            return ctx.query().group_by(q["by"]).agg(dp.len(signed=True))
        col = pl.col(q["column"]).fill_null(0.0)
        bounds = tuple(q["bounds"])
        if kind == "sum":
            return ctx.query().select(col.dp.sum(bounds))
        if kind == "avg":
            return ctx.query().select(col.dp.mean(bounds))
        if kind == "median":
            return ctx.query().select(col.dp.median(q["candidates"]))
        raise ValueError(f"unknown kind {kind}")

    def half_width(q: dict[str, Any], summary: Any) -> float | None:
        if q["kind"] in ("avg", "median") or "accuracy" not in summary.columns:
            return None  # a mean's two measurements have no joint interval; a quantile reports none
        return float(summary["accuracy"][0])

    for q in spec["queries"]:
        by_eps: dict[str, Any] = {}
        for epsilon in spec["epsilons"]:
            entry: dict[str, Any] = {"values": [], "half_widths": [], "times_s": []}
            try:
                # OpenDP's compositor cannot split an (ε, δ) budget evenly (the parts' float sum is not comparable
                # with the whole), so a query that selects keys gets a context of one release each time (untimed).
                parts = 1 if q["kind"] == "private_keys" else spec["reps"]
                ctx = context(q, epsilon, parts)
                built = query(q, ctx)
                hw = half_width(q, built.summarize(alpha=spec["alpha"]))  # public: the same every release
                t = time.perf_counter()
                measurement = built.resolve()  # OpenDP's calibration (a binary search over the noise scale)
                entry["resolve_s"] = time.perf_counter() - t
                for i in range(spec["reps"]):
                    if parts == 1 and i > 0:
                        ctx = context(q, epsilon, parts)
                    t = time.perf_counter()
                    released = ctx(measurement).collect()  # charged to the context's compositor each time
                    entry["times_s"].append(time.perf_counter() - t)
                    if q.get("by"):
                        value_col = [c for c in released.columns if c != q["by"]][0]
                        keys = released[q["by"]].to_list()
                        values = released[value_col].to_list()
                        entry["values"].append({str(k): float(v) for k, v in zip(keys, values, strict=True)})
                        entry["half_widths"].append(None if hw is None else dict.fromkeys(map(str, keys), hw))
                    else:
                        entry["values"].append(float(released.item()))
                        entry["half_widths"].append(hw)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                entry["trace"] = traceback.format_exc(limit=3)[-800:]
            by_eps[str(epsilon)] = entry
        out["results"][q["name"]] = by_eps
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
