"""How many COUNT queries an analyst's budget buys under pure ε and under zCDP accounting, measured by charging.

Generates the demo visits, registers them twice in a temporary workspace, once under the demo policy (pure ε) and
once under the same policy with `accounting: zcdp` (per-principal budget ε = 10, δ = 1e-6; k = 10 rows per
patient), then, for each target half-width, lets a fresh analyst run distinct `SELECT COUNT(*) ...` queries with
that 95% accuracy target through the gateway's own query path (pricing, ledger charge, audit, release) until the
ledger refuses one, and prints how many were answered under each accounting, with the ε or ρ each cost and what
OpenDP's formulas predict (the ledger's caps divided by one query's cost).

    .venv/bin/python benchmarks/budget_lasts.py [--rows 20000] [--accuracy 10 50 200]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo import write_demo  # noqa: E402
from gateway.service import Bastion, Context  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from policies.accountant import EPS_UNIT, RHO_UNIT, Accounting, rho_cap  # noqa: E402
from policies.errors import BudgetExhausted  # noqa: E402
from policies.schema import parse_policy  # noqa: E402

# A runaway guard: no accounting answers this many queries at the targets this script is meant for.
MAX_QUERIES = 100_000


def workspace(root: Path, rows: int, ks: list[int]) -> Settings:
    """A workspace with the demo visits registered, for each k, as `visits_k{k}` (pure ε) and `visits_k{k}_zcdp`
    (the same policy with zCDP accounting)."""
    data, policy_path = write_demo(root / "demo", n_rows=rows)
    raw = yaml.safe_load(policy_path.read_text())
    settings = Settings(workspace=root / "ws")
    settings.save()
    admin = Bastion(settings, read_only=False)
    try:
        for k in ks:
            admin.engine.register(parse_policy({**raw, "dataset": f"visits_k{k}", "max_rows_per_unit": k}), data)
            zcdp = {**raw, "dataset": f"visits_k{k}_zcdp", "max_rows_per_unit": k, "accounting": "zcdp"}
            admin.engine.register(parse_policy(zcdp), data)
    finally:
        admin.close()
    return settings


def run_until_refused(bastion: Bastion, principal: str, dataset: str, accuracy: float) -> int:
    """Distinct COUNT(*) queries at the target, charged one by one, until the ledger refuses one: how many were
    answered."""
    token, _ = bastion.tokens.create(principal, "analyst")
    ctx = Context(bastion.authenticate(token))
    answered = 0
    while answered < MAX_QUERIES:
        # A different statement each time (the same one would be answered from the cache at no cost).
        sql = f"SELECT COUNT(*) AS n FROM {dataset} WHERE age < {111 + answered}"
        try:
            answer = bastion.query(ctx, sql, accuracy={"n": accuracy})
        except BudgetExhausted:
            return answered
        if answer["cached"]:
            raise RuntimeError("a query was answered from the cache: the count would be wrong")
        answered += 1
    raise RuntimeError(f"more than {MAX_QUERIES} queries answered")


def costs(bastion: Bastion, dataset: str, accuracy: float) -> dict[str, dict[str, float]]:
    """One query's cost under each accounting, from the gateway's dry run."""
    token, _ = bastion.tokens.create("planner", "analyst")
    ctx = Context(bastion.authenticate(token))
    dry = bastion.query(ctx, f"SELECT COUNT(*) AS n FROM {dataset}", accuracy={"n": accuracy}, dry_run=True)
    return dry["costs"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the demo table")
    parser.add_argument(
        "--accuracy", type=float, nargs="+", default=[10.0, 50.0, 200.0], help="95%% half-widths to target"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[10, 5], help="rows per patient kept")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        settings = workspace(Path(tmp), args.rows, args.k)
        bastion = Bastion(settings)
        try:
            policy, _ = bastion.engine.datasets()[f"visits_k{args.k[0]}_zcdp"]
            cap = policy.budget.per_principal
            rho_units = math.floor(rho_cap(cap.epsilon, cap.delta) * RHO_UNIT)
            print(
                f"COUNT(*) queries one analyst can run on the demo visits with a per-principal budget of "
                f"ε = {cap.epsilon:g}, δ = {cap.delta:g} before the ledger refuses one; zCDP caps ρ at "
                f"{rho_cap(cap.epsilon, cap.delta):.4f} (OpenDP's conversion at δ/2)\n"
            )
            print("| k | 95% half-width | pure: ε per query | queries | zCDP: ρ per query | queries | zCDP / pure |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for k in args.k:
                for i, accuracy in enumerate(args.accuracy):
                    each = costs(bastion, f"visits_k{k}_zcdp", accuracy)
                    eps, rho = each["pure"]["epsilon"], each["zcdp"]["rho"]
                    pure_n = run_until_refused(bastion, f"pure_k{k}_{i}", f"visits_k{k}", accuracy)
                    zcdp_n = run_until_refused(bastion, f"zcdp_k{k}_{i}", f"visits_k{k}_zcdp", accuracy)
                    # What the caps predict: floor(cap / cost) in the ledger's integer units (charges rounded up).
                    assert pure_n == int(cap.epsilon * EPS_UNIT) // math.ceil(eps * EPS_UNIT), (k, accuracy)
                    assert zcdp_n == rho_units // math.ceil(rho * RHO_UNIT), (k, accuracy)
                    ratio = f"{zcdp_n / pure_n:.2f}×" if pure_n else "–"
                    print(
                        f"| {k} | ±{accuracy:g} | {eps:.4g} | {pure_n} | {rho:.4g} | {zcdp_n} | {ratio} |", flush=True
                    )
            print(
                f"\nsettings: {args.rows:,} demo rows, one query per charge through the gateway's query path "
                f"(Bastion.query: price, ledger charge, audit, release); {Accounting.ZCDP.value} releases use the "
                "discrete Gaussian at L2 sensitivity k, pure ones the discrete Laplace at L1 sensitivity k."
            )
        finally:
            bastion.close()


if __name__ == "__main__":
    main()
