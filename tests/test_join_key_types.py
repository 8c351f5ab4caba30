"""A join of an int column with a float or decimal one compares them as doubles: distinct ints beyond ±2**53 can be
one double, so one private row would join several rows of a public key declared unique (priced at one). Such a join
is refused before the charge unless the int side's values are known to lie within ±2**53 (its bounds, or the range
of its int domain, beyond which values read as missing), where every int is exactly one double."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql.plan import plan_query
from gateway.sql.price import price
from gateway.sql.release import execute
from policies.errors import QueryRejected
from policies.schema import parse_policy

KEY = 2**53


def _policy(key: dict[str, Any]) -> dict[str, Any]:
    return {
        "dataset": "t",
        "privacy_unit": "uid",
        "max_rows_per_unit": 5,
        "budget": {"per_principal": {"epsilon": 10}, "total": {"epsilon": 10}},
        "columns": {"uid": {"type": "int", "usage": "hidden"}, "x": {"type": "float", "bounds": [0, 1e17]}},
        "roles": {"analyst": ["query"]},
        "public_tables": {"big": {"source": "big.csv", "unique_key": "k", "columns": {"k": key}}},
    }


def _engine(tmp_path: Path, key: dict[str, Any], keys: list[int]) -> DuckDBEngine:
    # Unit 9's five rows hold x = 2**53, which as a double equals both 2**53 and 2**53 + 1.
    rows = [(i, 1.0) for i in range(1, 9)] + [(9, float(KEY))] * 5
    pd.DataFrame(rows, columns=["uid", "x"]).to_csv(tmp_path / "s.csv", index=False)
    pd.DataFrame({"k": keys}).to_csv(tmp_path / "big.csv", index=False)
    engine = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    engine.register(parse_policy(_policy(key)), tmp_path / "s.csv")
    return engine


SQL = "SELECT COUNT(*) AS n FROM t v JOIN big b ON v.x = b.k"


def test_an_int_key_beyond_2_53_joined_with_a_float_column_is_refused(tmp_path: Path) -> None:
    engine = _engine(tmp_path, {"type": "int", "domain": [1, KEY, KEY + 1]}, [1, KEY, KEY + 1])
    try:
        with pytest.raises(QueryRejected) as info:
            plan_query(SQL, lambda name: engine.policy(name)[0], engine.public_table)
        assert info.value.reason == "type_error" and info.value.details["highlight"] == "v.x = b.k"
    finally:
        engine.close()


def test_an_int_key_within_2_53_joined_with_a_float_column_joins_each_row_once(tmp_path: Path) -> None:
    engine = _engine(tmp_path, {"type": "int", "bounds": [0, KEY]}, [1, KEY - 1, KEY])
    try:
        plan = plan_query(SQL, lambda name: engine.policy(name)[0], engine.public_table)
        pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None)
        release = execute(plan, pricing, engine)
        assert len(release.rows) == 1
        # Exact joined count: 8 rows of x = 1 and unit 9's 5 rows of x = 2**53, each joined to one key.
        exact = (
            engine.connect().execute("SELECT COUNT(*) FROM bounded_t b JOIN public_t__big p ON b.x = p.k").fetchone()
        )
        assert exact is not None and exact[0] == 13
    finally:
        engine.close()
