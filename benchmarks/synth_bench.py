"""Benchmark of DP synthetic proxies on the demo table.

Generates the demo visits (500,000 rows by default), registers them in a temporary workspace, then times:
the DP measurements (DuckDB aggregates + OpenDP noise), building a proxy with SDV (`dpcopula`), and sampling
1,000,000 rows straight from the DP model and through SDV. Prints wall times and the peak resident memory.

    .venv/bin/python benchmarks/synth_bench.py [--rows 500000] [--sample 1000000] [--epsilon 1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo import POLICY_YAML, generate_visits  # noqa: E402
from gateway.service import Bastion  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from policies.schema import parse_policy  # noqa: E402
from synth import allocate, dp_fidelity, dp_proxy, measure  # noqa: E402


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="rows of the demo table")
    parser.add_argument("--sample", type=int, default=1_000_000, help="rows to sample")
    parser.add_argument("--epsilon", type=float, default=1.0)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        data = root / "visits.parquet"
        pq.write_table(generate_visits(args.rows, seed=7), data)
        policy = parse_policy(yaml.safe_load(POLICY_YAML))
        settings = Settings(workspace=root / "ws")
        admin = Bastion(settings, read_only=False)
        admin.engine.register(policy, data)
        admin.close()
        print(f"demo table: {args.rows:,} rows generated and registered in {time.perf_counter() - t:.1f} s")

        bastion = Bastion(settings)
        try:
            policy, _ = bastion.engine.policy("visits")
            con = bastion.engine
            t0 = time.perf_counter()
            allocation = allocate(policy, args.epsilon, policy.budget.per_principal.delta / 10)
            model = measure(con, "bounded_visits", policy, allocation)
            t1 = time.perf_counter()
            proxy = dp_proxy(model, args.rows, seed=1)
            t2 = time.perf_counter()
            report = dp_fidelity(model, proxy)
            t3 = time.perf_counter()
            print(
                f"DP measurements ({len(model.marginals)} marginals, {len(model.pairs)} pairs, ε={args.epsilon}): "
                f"{t1 - t0:.2f} s"
            )
            print(f"proxy of {args.rows:,} rows via SDV (dpcopula): {t2 - t1:.2f} s")
            print(f"fit total (measure + SDV proxy): {t2 - t0:.2f} s")
            print(
                f"fidelity report: {t3 - t2:.2f} s; scores { ({k: round(v, 3) for k, v in report['scores'].items()}) }"
            )
            t = time.perf_counter()
            direct = model.sample(args.sample, seed=2)
            print(f"sample {len(direct):,} rows from the DP model (dpcopula_direct): {time.perf_counter() - t:.2f} s")
            t = time.perf_counter()
            via_sdv = dp_proxy(model, args.sample, seed=3)
            print(f"sample {len(via_sdv):,} rows via SDV (dpcopula): {time.perf_counter() - t:.2f} s")
            print(f"peak resident memory: {_peak_gb():.2f} GB")
        finally:
            bastion.close()


if __name__ == "__main__":
    main()
