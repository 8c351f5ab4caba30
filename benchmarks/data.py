"""The benchmark table: generated with numpy from a fixed seed, written to Parquet, with its Bastion policy and
the equivalent SmartNoise SQL metadata (same privacy unit, rows per unit and bounds).

`events` has several rows per user (about 4 on average, Poisson, so some users exceed the bound of 5 and are cut
down by the pre-bounded table). `region` and `channel` have public domains; `product` has none, so grouping by it
needs private key selection (thresholding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATASET = "events"
MAX_ROWS_PER_UNIT = 5
REGIONS = ["north", "south", "east", "west", "central", "islands", "alpine", "coast"]
CHANNELS = ["web", "app", "store", "phone"]
N_PRODUCTS = 1000
AGE_BOUNDS = (18, 90)
AMOUNT_BOUNDS = (0.0, 1000.0)
# A budget large enough for every benchmark query (the ledger counts ε in 1e-12 units in a 64-bit integer).
BUDGET_EPSILON = 1_000_000.0
BUDGET_DELTA = 0.5
QUERY_DELTA = 1e-6


def policy_yaml() -> str:
    return f"""\
dataset: {DATASET}
privacy_unit: user_id
max_rows_per_unit: {MAX_ROWS_PER_UNIT}
budget:
  per_principal: {{epsilon: {BUDGET_EPSILON}, delta: {BUDGET_DELTA}}}
  total: {{epsilon: {BUDGET_EPSILON}, delta: {BUDGET_DELTA}}}
columns:
  user_id: {{type: int, usage: hidden}}
  region:  {{type: category, domain: [{", ".join(REGIONS)}]}}
  channel: {{type: category, domain: [{", ".join(CHANNELS)}]}}
  product: {{type: category}}
  age:     {{type: int, bounds: [{AGE_BOUNDS[0]}, {AGE_BOUNDS[1]}]}}
  amount:  {{type: decimal, bounds: [{AMOUNT_BOUNDS[0]}, {AMOUNT_BOUNDS[1]}], precision: 0.01}}
roles:
  analyst: [query]
"""


def smartnoise_metadata() -> dict[str, Any]:
    """SmartNoise SQL metadata for table `bench.events`: the same unit, max_ids and bounds as the policy."""
    return {
        "": {
            "bench": {
                "events": {
                    "max_ids": MAX_ROWS_PER_UNIT,
                    "row_privacy": False,
                    "sample_max_ids": True,
                    "censor_dims": True,
                    "user_id": {"type": "int", "private_id": True},
                    "region": {"type": "string"},
                    "channel": {"type": "string"},
                    "product": {"type": "string"},
                    "age": {"type": "int", "lower": AGE_BOUNDS[0], "upper": AGE_BOUNDS[1]},
                    "amount": {"type": "float", "lower": AMOUNT_BOUNDS[0], "upper": AMOUNT_BOUNDS[1]},
                }
            }
        }
    }


def generate(n_rows: int, seed: int = 20240611) -> pa.Table:
    """`n_rows` events of about n_rows/4 users, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    n_users = max(n_rows // 4, 1)
    user = rng.integers(0, n_users, n_rows)
    user_region = rng.choice(len(REGIONS), n_users, p=[0.2, 0.18, 0.15, 0.12, 0.12, 0.08, 0.08, 0.07])
    user_age = np.clip(np.round(rng.normal(45, 15, n_users)), 10, 99).astype(np.int64)
    channel = rng.choice(len(CHANNELS), n_rows, p=[0.45, 0.3, 0.2, 0.05])
    weights = 1.0 / np.arange(1, N_PRODUCTS + 1) ** 1.1
    product = rng.choice(N_PRODUCTS, n_rows, p=weights / weights.sum())
    amount = np.round(rng.lognormal(3.5, 1.0, n_rows), 2)  # a few above the bound of 1000, clamped
    products = np.asarray([f"p{i:04d}" for i in range(N_PRODUCTS)], dtype=object)
    return pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "region": pa.array(np.asarray(REGIONS, dtype=object)[user_region[user]], pa.string()),
            "channel": pa.array(np.asarray(CHANNELS, dtype=object)[channel], pa.string()),
            "product": pa.array(products[product], pa.string()),
            "age": pa.array(user_age[user], pa.int64()),
            "amount": pa.array(amount, pa.float64()),
        }
    )


def write(directory: Path, n_rows: int, seed: int = 20240611) -> tuple[Path, Path]:
    """Write `events_<n>.parquet` and its policy into `directory` (reused if already there)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"events_{n_rows}.parquet"
    if not data.exists():
        tmp = data.with_suffix(".tmp")
        pq.write_table(generate(n_rows, seed), tmp, row_group_size=1 << 20)
        tmp.replace(data)
    policy = directory / "events.yaml"
    policy.write_text(policy_yaml())
    return data, policy
