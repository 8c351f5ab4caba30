"""Benchmark of one DP model evaluation on the demo visits.

Generates the demo visits with a visit_id (500,000 rows by default) and an example model's predictions, registers
them in a temporary workspace, attaches the predictions (timed once), then times POST /v1/evaluate through the app
(validation, one join and GROUP BY per model and slice on DuckDB, one OpenDP release, metrics), each repetition a
new ε so that no answer comes from the cache. Prints the median and the spread.

    .venv/bin/python benchmarks/evaluate_bench.py [--rows 500000] [--reps 5] [--models 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from gateway.demo import write_evaluation_demo  # noqa: E402
from gateway.http.app import create_app  # noqa: E402
from gateway.predictions import attach  # noqa: E402
from gateway.service import Bastion  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from policies.schema import load_policy  # noqa: E402

SLICES = ["sex", "region", "CASE WHEN age >= 65 THEN 'senior' WHEN age >= 18 THEN 'adult' ELSE 'child' END"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", type=int, default=1, help="models compared in the one request")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, policy, predictions = write_evaluation_demo(root / "demo", n_rows=args.rows)
        settings = Settings(workspace=root / "ws")
        settings.save()
        bastion = Bastion(settings, read_only=False)
        try:
            bastion.engine.register(load_policy(policy), data)
            token = bastion.tokens.create("bench", "analyst")[0]
        finally:
            bastion.close()
        bastion = Bastion(settings)
        try:
            start = time.perf_counter()
            attach(bastion, "visits", "model-0", predictions)
            attach_s = time.perf_counter() - start
            for i in range(1, args.models):
                attach(bastion, "visits", f"model-{i}", predictions)
        finally:
            bastion.close()
        headers = {"Authorization": f"Bearer {token}"}
        models = [f"model-{i}" for i in range(args.models)]
        times = []
        with TestClient(create_app(settings)) as c:
            for rep in range(args.reps + 1):
                body = {"dataset": "visits", "models": models, "slices": SLICES, "epsilon": 0.1 + rep * 1e-3}
                start = time.perf_counter()
                r = c.post("/v1/evaluate", json=body, headers=headers)
                elapsed = time.perf_counter() - start
                if r.status_code != 200:
                    raise SystemExit(f"evaluation failed: {r.status_code} {r.text}")
                if rep:  # the first request warms the app up
                    times.append(elapsed)
        cells = r.json()["cells"]
    print(f"rows {args.rows:,}; models {args.models}; slices {len(SLICES)}; released counts {cells}")
    print(f"attach predictions: {attach_s * 1000:.0f} ms (validation, key check, durable write, audit record)")
    print(
        f"POST /v1/evaluate: median {statistics.median(times) * 1000:.0f} ms "
        f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}) over {len(times)} requests"
    )


if __name__ == "__main__":
    main()
