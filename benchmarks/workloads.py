"""The benchmark workloads: one analyst query each, in Bastion's SQL, the plain SQL that computes the same
aggregates on the pre-bounded table without privacy (the floor), and the SmartNoise SQL equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.data import DATASET
from gateway.engines.duckdb import bounded_table

RAW_TABLE = bounded_table(DATASET)
SMARTNOISE_TABLE = "bench.events"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    bastion: str  # {t}: the table; {v}: a suffix of the first output name that makes the SQL text distinct
    smartnoise: str | None  # None: SmartNoise SQL has no equivalent
    private_keys: bool = False
    unsupported: str = ""  # why SmartNoise SQL cannot run it

    def sql(self, variant: int | None = None) -> str:
        """Bastion's SQL; each `variant` is a distinct query text (a new query to plan, charge and compute)."""
        return self.bastion.format(t=DATASET, v="" if variant is None else f"_{variant}")

    def raw_sql(self) -> str:
        return self.bastion.format(t=f'"{RAW_TABLE}"', v="")

    def smartnoise_sql(self) -> str | None:
        return None if self.smartnoise is None else self.smartnoise.format(t=SMARTNOISE_TABLE)


WORKLOADS: list[Workload] = [
    Workload("count", "COUNT(*)", "SELECT COUNT(*) AS n{v} FROM {t}", "SELECT COUNT(*) AS n FROM {t}"),
    Workload(
        "grouped_count_avg",
        "grouped COUNT, AVG with WHERE",
        "SELECT region, COUNT(*) AS n{v}, AVG(amount) AS avg_amount FROM {t} WHERE age >= 40 GROUP BY region",
        "SELECT region, COUNT(*) AS n, AVG(amount) AS avg_amount FROM {t} WHERE age >= 40 GROUP BY region",
    ),
    Workload(
        "sum_two_keys",
        "SUM over two keys",
        "SELECT region, channel, SUM(amount) AS total{v} FROM {t} GROUP BY region, channel",
        "SELECT region, channel, SUM(amount) AS total FROM {t} GROUP BY region, channel",
    ),
    Workload(
        "sum_expression",
        "SUM, AVG of row expressions",
        "SELECT region, SUM(CASE WHEN age >= 40 THEN amount ELSE 0 END) AS total{v}, AVG(amount / 100) AS avg_h "
        "FROM {t} GROUP BY region",
        None,
        unsupported="SmartNoise SQL refuses aggregates of expressions (\"We don't support aggregation over "
        'expressions")',
    ),
    Workload(
        "quantile",
        "quantile (p90)",
        "SELECT QUANTILE_CONT(amount, 0.9) AS p90{v} FROM {t}",
        None,
        unsupported="SmartNoise SQL has no private quantile (its grammar parses PERCENTILE_CONT(col) without a "
        "fraction and the private reader has no mechanism for it)",
    ),
    Workload(
        "private_keys",
        "private keys (thresholding)",
        "SELECT product, COUNT(*) AS n{v} FROM {t} GROUP BY product",
        "SELECT product, COUNT(*) AS n FROM {t} GROUP BY product",
        private_keys=True,
    ),
]
