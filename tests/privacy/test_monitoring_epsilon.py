"""Empirical ε of a monitoring release, on two feeds that differ in one worst-case privacy unit of the appended
batch (k rows, each in the same cell of every monitored column: the same domain value, clamped above the bound, the
same date bin, missing text).

The exact count vectors come through the real path (registration, append, `profile` on DuckDB over the batch's
kept rows) and must differ by exactly the claimed sensitivity k × (monitored columns) in L1. Releases are drawn with
`gateway.monitoring.release`; the event (privacy loss at the claimed scale reaching ε) is fixed before sampling. A
Clopper–Pearson lower bound on ε at 99% must not exceed the claimed ε; on releases with half the noise it must.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.engines.monitor import monitored
from gateway.monitoring import release, sensitivity
from gateway.service import Bastion
from policies.mechanisms import release_integers
from tests.conftest import ROLES, build_workspace
from tests.privacy.epsilon import epsilon_lower_bound

K = 3
EPSILON = 1.0
DRAWS = 4_000
POLICY = f"""\
dataset: mon
privacy_unit: pid
max_rows_per_unit: {K}
budget:
  per_principal: {{epsilon: 100.0}}
  total: {{epsilon: 1000.0}}
columns:
  pid: {{type: int, usage: hidden}}
  region: {{type: category, domain: [north, south]}}
  income: {{type: decimal, bounds: [0, 1000]}}
  day: {{type: date, bounds: [2020-01-01, 2020-12-31]}}
  tag: {{type: category}}
roles:
  analyst: [query]
monitoring: {{epsilon: {EPSILON}, cap: {{epsilon: 50.0}}}}
"""


def _batch(offset: int, with_unit: bool) -> pa.Table:
    rng = np.random.default_rng(offset)
    n = 400
    rows = {
        "pid": (np.arange(n) // 2 + offset).tolist(),
        "region": rng.choice(["north", "south"], n).tolist(),
        "income": rng.uniform(0, 900, n).tolist(),
        "day": (np.datetime64("2020-01-01") + rng.integers(0, 366, n).astype("timedelta64[D]")).tolist(),
        "tag": rng.choice(["a", "b"], n).tolist(),
    }
    if with_unit:  # a unit with more than k rows: k are kept, all in the same cells
        for name, value in (
            ("pid", 999_999),
            ("region", "north"),
            ("income", 5_000.0),
            ("day", rows["day"][0]),
            ("tag", None),
        ):
            rows[name] = rows[name] + [value] * (K + 2)
    return pa.table(rows)


def _exact(root: Path, with_unit: bool) -> list[int]:
    root.mkdir()
    (root / "mon.yaml").write_text(POLICY)
    pq.write_table(_batch(0, False), root / "b0.parquet")
    pq.write_table(_batch(10_000, with_unit), root / "b1.parquet")
    ws = build_workspace(root, [(root / "mon.yaml", root / "b0.parquet")], ROLES)
    bastion = Bastion(ws.settings)
    try:
        version, _ = bastion.engine.append("mon", root / "b1.parquet")
        engine = bastion.engine
        return engine.profile("mon", root / "b1.parquet", version.version, 10)  # type: ignore[attr-defined,no-any-return]
    finally:
        bastion.close()


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("mon_neighbours")
    return np.asarray(_exact(root / "d", False)), np.asarray(_exact(root / "d_prime", True))


def _policy():  # type: ignore[no-untyped-def]
    import yaml

    from policies.schema import parse_policy

    return parse_policy(yaml.safe_load(POLICY))


def _hits(draws: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> int:
    loss = (np.abs(draws - b).sum(axis=1) - np.abs(draws - a).sum(axis=1)) / scale
    return int((loss >= EPSILON - 1e-9).sum())


def test_neighbours_differ_by_the_claimed_sensitivity(neighbours: tuple[np.ndarray, np.ndarray]) -> None:
    b, a = neighbours
    policy = _policy()
    columns = monitored(policy, 10)
    assert int(np.abs(a - b).sum()) == sensitivity(policy, columns) == K * len(columns)


def test_empirical_epsilon_of_a_monitoring_release(neighbours: tuple[np.ndarray, np.ndarray]) -> None:
    b, a = neighbours
    policy = _policy()
    _, scale = release(policy, a.tolist())
    on_a = np.array([release(policy, a.tolist())[0] for _ in range(DRAWS)])
    on_b = np.array([release(policy, b.tolist())[0] for _ in range(DRAWS)])
    bound = epsilon_lower_bound(_hits(on_a, a, b, scale), DRAWS, _hits(on_b, a, b, scale), DRAWS, 0.99)
    assert bound <= EPSILON, bound
    d = sensitivity(policy, monitored(policy, 10))
    half_a = np.array([release_integers(a.tolist(), d, 2 * EPSILON).values for _ in range(DRAWS)])
    half_b = np.array([release_integers(b.tolist(), d, 2 * EPSILON).values for _ in range(DRAWS)])
    control = epsilon_lower_bound(_hits(half_a, a, b, scale), DRAWS, _hits(half_b, a, b, scale), DRAWS, 0.99)
    assert control > EPSILON, control
