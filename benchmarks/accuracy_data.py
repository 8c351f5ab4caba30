"""The accuracy benchmark's table: generated with numpy from a fixed seed and bounded once, before any tool sees
it, so that every tool answers on the same rows and contribution bounding is not what is compared.

The table (registered under the benchmark suite's dataset name, so that `benchmarks.workloads` applies) has about
`n_rows / 4` persons (`person_id`, the privacy unit), each with 1 to `MAX_ROWS_PER_UNIT` rows (1 + Binomial(4, 3/4),
mean 4). `region` (a person's) has a public domain; `product` (a row's) has none, so
grouping by it needs private key selection: `N_PRODUCTS` values with Zipf-like counts, so that the rarest ones are
near the threshold at small ε. `score` is a dense real column in `SCORE_BOUNDS` (the sums, averages and the
median); `age` an integer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.data import AGE_BOUNDS, BUDGET_DELTA, BUDGET_EPSILON, DATASET, MAX_ROWS_PER_UNIT, REGIONS

UNIT = "person_id"
N_PRODUCTS = 40
SCORE_BOUNDS = (0.0, 1000.0)
PRODUCT_SKEW = 1.5  # product i (1-based) is drawn with probability ∝ i ** -PRODUCT_SKEW
SEED = 20261216


def policy_yaml(accounting: str = "pure") -> str:
    """The table's policy, with a budget large enough for every release of the benchmark, under `accounting`
    ("pure" or "zcdp")."""
    return f"""\
dataset: {DATASET}
privacy_unit: {UNIT}
max_rows_per_unit: {MAX_ROWS_PER_UNIT}
accounting: {accounting}
budget:
  per_principal: {{epsilon: {BUDGET_EPSILON}, delta: {BUDGET_DELTA}}}
  total: {{epsilon: {BUDGET_EPSILON}, delta: {BUDGET_DELTA}}}
columns:
  {UNIT}: {{type: int, usage: hidden}}
  region:  {{type: category, domain: [{", ".join(REGIONS)}]}}
  product: {{type: category}}
  age:     {{type: int, bounds: [{AGE_BOUNDS[0]}, {AGE_BOUNDS[1]}]}}
  score:   {{type: float, bounds: [{SCORE_BOUNDS[0]}, {SCORE_BOUNDS[1]}]}}
roles:
  analyst: [query]
"""


def smartnoise_metadata(table: str) -> dict[str, Any]:
    """SmartNoise SQL metadata for `schema.table`: the same unit, max_ids and bounds as the policy."""
    schema, name = table.split(".")
    return {
        "": {
            schema: {
                name: {
                    "max_ids": MAX_ROWS_PER_UNIT,
                    "row_privacy": False,
                    "sample_max_ids": True,
                    "censor_dims": True,
                    UNIT: {"type": "int", "private_id": True},
                    "region": {"type": "string"},
                    "product": {"type": "string"},
                    "age": {"type": "int", "lower": AGE_BOUNDS[0], "upper": AGE_BOUNDS[1]},
                    "score": {"type": "float", "lower": SCORE_BOUNDS[0], "upper": SCORE_BOUNDS[1]},
                }
            }
        }
    }


def generate(n_rows: int, seed: int = SEED) -> pa.Table:
    """About `n_rows` rows of about `n_rows / 4` persons, at most MAX_ROWS_PER_UNIT each; deterministic."""
    rng = np.random.default_rng(seed)
    n_people = max(n_rows // 4, 1)
    per_person = 1 + rng.binomial(MAX_ROWS_PER_UNIT - 1, 0.75, n_people)
    person = np.repeat(np.arange(n_people), per_person)
    n = len(person)
    region = rng.choice(len(REGIONS), n_people, p=[0.2, 0.18, 0.15, 0.12, 0.12, 0.08, 0.08, 0.07])
    age = np.clip(np.round(rng.normal(45, 15, n_people)), *AGE_BOUNDS).astype(np.int64)
    weights = np.arange(1, N_PRODUCTS + 1, dtype=float) ** -PRODUCT_SKEW
    product = rng.choice(N_PRODUCTS, n, p=weights / weights.sum())
    score = np.clip(rng.normal(480.0, 150.0, n), *SCORE_BOUNDS)
    products = np.asarray([f"p{i:02d}" for i in range(N_PRODUCTS)], dtype=object)
    return pa.table(
        {
            UNIT: pa.array(person, pa.int64()),
            "region": pa.array(np.asarray(REGIONS, dtype=object)[region[person]], pa.string()),
            "product": pa.array(products[product], pa.string()),
            "age": pa.array(age[person], pa.int64()),
            "score": pa.array(score, pa.float64()),
        }
    )


def write(directory: Path, n_rows: int, seed: int = SEED, accounting: str = "pure") -> tuple[Path, Path]:
    """Write the table and its policy (under `accounting`) into `directory` (the table reused if already there)."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"accuracy_{n_rows}_{seed}.parquet"
    if not source.exists():
        tmp = source.with_suffix(".tmp")
        pq.write_table(generate(n_rows, seed), tmp)
        tmp.replace(source)
    policy = directory / "accuracy.yaml"
    policy.write_text(policy_yaml(accounting))
    return source, policy
