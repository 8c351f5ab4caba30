"""The median's error averaged over where the truth falls between candidates: many generated tables, not one.

    .venv/bin/python -m benchmarks.quantile_alignment --tables 30 --releases 20

The accuracy benchmark (`benchmarks.accuracy`) compares tools on one table, so a mode whose candidates happen to lie
near that table's true median looks better than it is. This script draws `--tables` tables like the accuracy
benchmark's score column (200,000 values from N(480 + U(0, 1), 150), clipped to [0, 1000]: the shift moves the
truth between candidates from table to table), and per table `--releases` releases of each mode, straight from the
mechanisms in `policies/mechanisms.py` (no gateway, no ledger), at sensitivity k = 5:

- default: the three-stage release with its value interval (`release_quantile`);
- value only: one report-noisy-max at the whole ε over the 131,073-position grid (`release_quantile_value`);
- given candidates: the same one selection at the whole ε over candidates every `--step` (0.01, what the accuracy
  benchmark gives OpenDP's median): the candidate set of OpenDP's setup, with Bastion's own mechanism.

Prints the median and 95th percentile of the absolute error over all releases per mode and ε.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from policies import mechanisms as mech
from policies.sensitivity import quantile_sensitivity

K = 5
LOW, HIGH = 0.0, 1000.0


def position_counts(values: np.ndarray, grid: mech.QuantileGrid) -> mech.PositionCounts:
    """Exact counts at the grid's position codes, as the engine computes them (CEIL(t) + FLOOR(t) + 1, clipped)."""
    t = (values - grid.lo) / grid.step
    codes = np.clip(np.ceil(t) + np.floor(t) + 1, 0, 2 * grid.size).astype(np.int64)
    unique, counts = np.unique(codes, return_counts=True)
    return mech.PositionCounts(unique, counts.astype(np.int64))


def modes(values: np.ndarray, q: float, step: float) -> dict[str, Callable[[float], float]]:
    """Per mode, a function that draws one release at ε."""
    d_in = quantile_sensitivity(K, q)
    grid = mech.quantile_grid(LOW, HIGH, False)
    counts = position_counts(values, grid)
    value_grid = mech.quantile_value_grid(LOW, HIGH, False)
    value_counts = position_counts(values, value_grid)
    given = mech.QuantileGrid(LOW, step, int(round((HIGH - LOW) / step)) + 1)
    given_counts = position_counts(values, given)

    def fine(g: mech.QuantileGrid) -> mech.PositionCounts:
        return position_counts(values, g)

    return {
        "default": lambda eps: mech.release_quantile(counts, grid, q, d_in, K, eps, 0.05, fine).value,
        "value only": lambda eps: mech.release_quantile_value(value_counts, value_grid, q, d_in, eps).value,
        f"given candidates (every {step:g})": lambda eps: (
            mech.release_quantile_value(given_counts, given, q, d_in, eps).value
        ),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--tables", type=int, default=30)
    p.add_argument("--releases", type=int, default=20, help="releases per table, mode and ε")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0])
    p.add_argument("--step", type=float, default=0.01, help="spacing of the given candidates")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = 0.5
    errors: dict[tuple[str, float], list[float]] = {}
    for table in range(args.tables):
        rng = np.random.default_rng(args.seed + table)
        values = np.clip(rng.normal(480.0 + rng.uniform(0.0, 1.0), 150.0, args.rows), LOW, HIGH)
        truth = float(np.quantile(values, q))
        for name, draw in modes(values, q, args.step).items():
            for eps in args.epsilons:
                errors.setdefault((name, eps), []).extend(abs(draw(eps) - truth) for _ in range(args.releases))
        print(f"table {table + 1}/{args.tables} done", flush=True)
    print(f"\n{args.tables} tables x {args.releases} releases, k = {K}, rows = {args.rows}")
    print("| mode | ε | median abs error | p95 abs error |")
    print("|---|---:|---:|---:|")
    for (name, eps), errs in errors.items():
        print(f"| {name} | {eps:g} | {np.median(errs):.4f} | {np.quantile(errs, 0.95):.4f} |")


if __name__ == "__main__":
    main()
