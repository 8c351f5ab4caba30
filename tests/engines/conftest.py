"""Both engines over the same data: one generated visits table registered on DuckDB and on Spark (`local[2]`)
with the same bounding key, shared by every engine test of the session (Spark starts once)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from gateway.demo import POLICY_YAML, generate_visits
from gateway.engines.duckdb import DuckDBEngine
from gateway.engines.kind import EngineKind
from gateway.settings import Settings
from policies.schema import parse_policy

POLICY = parse_policy(yaml.safe_load(POLICY_YAML))


@dataclass
class Pair:
    duck: DuckDBEngine
    spark: object  # SparkEngine (imported when the fixture runs)
    settings: Settings
    source: Path


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    from gateway.engines.spark import SparkEngine

    root = tmp_path_factory.mktemp("engines")
    source = root / "visits.parquet"
    pq.write_table(generate_visits(20_000, seed=11), source)
    settings = Settings(workspace=root, engine=EngineKind.SPARK)
    duck = DuckDBEngine(settings.database, settings.bounding_key, read_only=False)
    duck.register(POLICY, source)
    spark = SparkEngine(settings, read_only=False)
    spark.register(POLICY, source)
    yield Pair(duck, spark, settings, source)
    duck.close()
    spark.close()


@pytest.fixture(scope="session")
def engines(pair: Pair) -> tuple[object, object]:
    return pair.duck, pair.spark
