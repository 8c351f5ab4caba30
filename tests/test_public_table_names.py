"""The engine names of public tables (`public_<dataset>__<table>`) are one-to-one: no two (dataset, table) pairs a
valid policy may declare share one, so registering a dataset can never replace another dataset's public table (whose
declared key and multiplicities were checked against other rows: a join with it would be priced for a unique key
while one private row joins many rows)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from policies.schema import PolicyError, parse_policy, public_table_name

BASE = """
dataset: shop
privacy_unit: uid
max_rows_per_unit: 2
budget: {per_principal: {epsilon: 10}, total: {epsilon: 10}}
columns: {uid: {type: int, usage: hidden}, g: {type: int, bounds: [0, 9]}}
roles: {analyst: [query]}
"""


def _policy(dataset: str, table: str, source: str = "t.csv", key: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(BASE)
    raw["dataset"] = dataset
    raw["public_tables"] = {
        table: {"source": source, **(key or {"unique_key": "g"}), "columns": {"g": {"type": "int", "bounds": [0, 9]}}}
    }
    return raw


def _valid(dataset: str, table: str) -> bool:
    try:
        parse_policy(_policy(dataset, table))
    except PolicyError:
        return False
    return True


@pytest.mark.parametrize("table", ["x__t", "_t", "a__", "t__"])
def test_public_table_names_with_a_double_underscore_or_a_leading_one_are_refused(table: str) -> None:
    with pytest.raises(PolicyError, match="public table name"):
        parse_policy(_policy("shop", table))


def test_engine_names_of_valid_declarations_are_one_to_one() -> None:
    parts = ["a", "b", "a_", "_a", "a_b", "a__b", "_", "__a", "a___b", "b_"]
    seen: dict[str, tuple[str, str]] = {}
    for dataset, table in itertools.product(parts, repeat=2):
        if not (_valid(dataset, table)):
            continue
        name = public_table_name(dataset, table)
        assert seen.setdefault(name, (dataset, table)) == (dataset, table), name


def test_a_dataset_cannot_replace_another_datasets_public_table(tmp_path: Path) -> None:
    """`shop` + `x__t` and `shop__x` + `t` would both be `public_shop__x__t`: the second registration would have
    replaced the first dataset's checked table by 50 rows of one key. One of the two declarations is refused."""
    from gateway.engines.duckdb import DuckDBEngine

    pd.DataFrame({"uid": [1, 2], "g": [7, 1]}).to_csv(tmp_path / "s.csv", index=False)
    pd.DataFrame({"g": [1, 7]}).to_csv(tmp_path / "u.csv", index=False)
    pd.DataFrame({"g": [7] * 50}).to_csv(tmp_path / "d.csv", index=False)
    engine = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    try:
        registered = []
        declarations: list[tuple[str, str, str, dict[str, Any]]] = [
            ("shop", "x__t", "u.csv", {"unique_key": "g"}),
            ("shop__x", "t", "d.csv", {"max_multiplicity": {"g": 1000}}),
        ]
        for dataset, table, source, key in declarations:
            try:
                policy = parse_policy(_policy(dataset, table, source, key))
            except PolicyError:
                continue
            engine.register(policy, tmp_path / "s.csv")
            registered.append((dataset, table))
        for dataset, table in registered:  # each keeps the rows its own declaration was checked against
            values = engine.public_table(dataset, table).column("g").to_pylist()
            declared = 1 if dataset == "shop" else 1000
            assert max(values.count(v) for v in values) <= declared, (dataset, table)
        assert registered  # the other declaration is valid and registers
    finally:
        engine.close()
