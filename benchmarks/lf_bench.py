"""Benchmark of declarative labeling functions against Snorkel's PandasLFApplier on the demo table.

Generates the demo visits (500,000 rows by default), registers them in a temporary workspace, then, in this one
process, times for the same LFs over the same pre-bounded rows:

- Bastion: the whole DP path of POST /v1/lf/stats through the app (validation, one DuckDB GROUP BY over the vote
  patterns, exact statistics, OpenDP release), and its core without HTTP;
- Snorkel: PandasLFApplier.apply on the rows (already in a DataFrame, not timed) plus LFAnalysis.lf_summary.

It checks that both label matrices are identical, and prints the times and the speed-up.

    .venv/bin/python benchmarks/lf_bench.py [--rows 500000] [--reps 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlglot import exp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo import write_demo  # noqa: E402
from gateway.service import Bastion  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from labeling_functions.analysis import compute_lf_stats, plan_lf_stats  # noqa: E402
from labeling_functions.matrix import VoteQuery, label_matrix, lf_inputs  # noqa: E402
from policies.schema import load_policy  # noqa: E402

URGENT, ROUTINE, ABSTAIN = 0, 1, -1
RED_FLAGS = ["chest pain", "shortness of breath", "stroke", "unresponsive", "bleeding"]
URGENT_DX = {"I21", "I63", "J96", "R07", "S72", "A41"}

LFS: list[dict[str, Any]] = [
    {"name": "red_flags", "label": "urgent", "keywords": {"column": "triage_note", "any": RED_FLAGS}},
    {
        "name": "planned",
        "label": "routine",
        "regex": {"column": "triage_note", "pattern": r"^(routine|follow-up|prescription|vaccination|annual)"},
    },
    {"name": "urgent_dx", "label": "urgent", "when": "diagnosis IN ('I21', 'I63', 'J96', 'R07', 'S72', 'A41')"},
    {"name": "old_long_stay", "label": "urgent", "when": "age >= 70 AND length_of_stay >= 6"},
    {"name": "young_same_day", "label": "routine", "when": "age < 40 AND length_of_stay = 0"},
    {
        "name": "mild_words",
        "label": "routine",
        "keywords": {"column": "triage_note", "any": ["mild", "rash", "sore throat", "review"]},
    },
]


def python_equivalents() -> list[Any]:
    from snorkel.labeling import labeling_function

    planned_re = re.compile(r"^(routine|follow-up|prescription|vaccination|annual)")

    @labeling_function()
    def red_flags(x: Any) -> int:
        note = x.triage_note.lower()
        return URGENT if any(w in note for w in RED_FLAGS) else ABSTAIN

    @labeling_function()
    def planned(x: Any) -> int:
        return ROUTINE if planned_re.search(x.triage_note) else ABSTAIN

    @labeling_function()
    def urgent_dx(x: Any) -> int:
        return URGENT if x.diagnosis in URGENT_DX else ABSTAIN

    @labeling_function()
    def old_long_stay(x: Any) -> int:
        return URGENT if x.age >= 70 and x.length_of_stay >= 6 else ABSTAIN

    @labeling_function()
    def young_same_day(x: Any) -> int:
        return ROUTINE if x.age < 40 and x.length_of_stay == 0 else ABSTAIN

    @labeling_function()
    def mild_words(x: Any) -> int:
        note = x.triage_note.lower()
        return ROUTINE if any(w in note for w in ("mild", "rash", "sore throat", "review")) else ABSTAIN

    return [red_flags, planned, urgent_dx, old_long_stay, young_same_day, mild_words]


def demo_workspace(root: Path, rows: int) -> tuple[Settings, str]:
    """A workspace under `root` with `rows` generated demo visits registered, and an LF author's token."""
    print(f"generating and registering {rows:,} demo visits...", flush=True)
    data, policy_path = write_demo(root / "demo", n_rows=rows)
    settings = Settings(workspace=root / "ws")
    settings.save()
    admin = Bastion(settings, read_only=False)
    try:
        admin.engine.register(load_policy(policy_path), data)
        token, _ = admin.tokens.create("bench", "lf_author")
    finally:
        admin.close()
    return settings, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="rows of the demo table")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of the Bastion path")
    args = parser.parse_args()

    from fastapi.testclient import TestClient
    from snorkel.labeling import LFAnalysis, PandasLFApplier

    from gateway.http.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings, token = demo_workspace(root, args.rows)

        bastion = Bastion(settings)
        policy, _ = bastion.engine.policy("visits")
        cur = bastion.engine
        n_rows = cur.rows(exp.select(exp.Count(this=exp.Star())).from_(exp.table_("bounded_visits", quoted=True)))[0][0]

        core = []
        for rep in range(args.reps + 1):
            t0 = time.perf_counter()
            plan = plan_lf_stats(policy, lfs=LFS, epsilon=0.1, alpha=0.05)
            compute_lf_stats(plan, cur)
            if rep:  # the first run warms the engine's caches
                core.append(time.perf_counter() - t0)

        http = []
        with TestClient(create_app(settings, bastion)) as client:
            headers = {"Authorization": f"Bearer {token}"}
            for rep in range(args.reps + 1):
                body = {"dataset": "visits", "lfs": LFS, "epsilon": 0.01 * (rep + 1)}  # distinct: never cached
                t0 = time.perf_counter()
                r = client.post("/v1/lf/stats", json=body, headers=headers)
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                if rep:
                    http.append(elapsed)

            _, sql_matrix, gold, frame = label_matrix(cur, VoteQuery(policy, plan.declarative), lf_inputs(policy))
            print(
                f"applying the equivalent Python LFs with Snorkel's PandasLFApplier on {len(frame):,} rows...",
                flush=True,
            )
            t0 = time.perf_counter()
            snorkel_matrix = PandasLFApplier(python_equivalents()).apply(frame, progress_bar=False)
            apply_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            LFAnalysis(snorkel_matrix).lf_summary(Y=gold)
            summary_s = time.perf_counter() - t0

    same = np.array_equal(sql_matrix, snorkel_matrix)
    bastion_s = statistics.median(http)
    snorkel_s = apply_s + summary_s
    print()
    print(f"rows in the pre-bounded table:       {n_rows:,} ({len(LFS)} labeling functions)")
    print(f"label matrices identical:            {same}")
    print(f"Bastion, POST /v1/lf/stats (median): {bastion_s * 1000:,.1f} ms  (min {min(http) * 1000:,.1f} ms)")
    print(f"Bastion core without HTTP (median):  {statistics.median(core) * 1000:,.1f} ms")
    print(f"Snorkel PandasLFApplier.apply:       {apply_s:,.2f} s")
    print(f"Snorkel LFAnalysis.lf_summary:       {summary_s:,.2f} s")
    print(f"speed-up (Snorkel / Bastion HTTP):   {snorkel_s / bastion_s:,.0f}x")
    if not same:
        sys.exit("the label matrices differ")


if __name__ == "__main__":
    main()
