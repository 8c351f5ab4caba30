"""Dataset policy: the public facts Bastion may rely on, loaded from YAML and validated.

Everything a mechanism needs to know about a dataset without looking at it comes from here: the privacy unit,
how many rows one unit may contribute, numeric bounds, categorical domains, which columns may be used where,
the budgets and which roles may do what.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from policies.accountant import Accounting

# The largest number of distinct values a bounded int/date column may have for Bastion to treat its
# range as a public domain of group keys.
MAX_ENUMERABLE_DOMAIN = 10_000

# Largest bound of an int column: integers up to 2**53 are exact as doubles, and registration clamps through them.
MAX_INT_BOUND = 2**53
# Largest bound of a float or decimal column, and the range of precisions: squares of values stay finite doubles.
MAX_FLOAT_BOUND = 1e150
PRECISION_RANGE = (1e-150, 1e150)

# Public cap on the characters kept per value (a labeling function's cost per row grows with the length).
DEFAULT_MAX_LENGTH = {"text": 2_000, "category": 200}
MAX_LENGTH_LIMIT = 1_000_000


def bounded_table(dataset: str) -> str:
    """Name of a dataset's pre-bounded table in the private database."""
    return f"bounded_{dataset}"


def public_table_name(dataset: str, table: str) -> str:
    """Name of a dataset's public table in the engine: `public_<dataset>__<table>`. No analyst names it (the
    compiled SQL does), and it cannot be a bounded table's name. One-to-one, as a table's name neither starts with
    `_` nor holds `__` (the policy checks): its last `__` splits it back."""
    return f"public_{dataset}__{table}"


# Largest multiplicity a public table may declare for a join key: each private row joins at most this many rows,
# and every sensitivity of a join on that key is multiplied by it.
MAX_MULTIPLICITY = 1_000


def row_keys_table(dataset: str) -> str:
    """Name of the table of every source row's key (the policy's `row_key`, converted) in the private database: the
    keys predictions may be attached to (the bounded table keeps only the rows bounding kept)."""
    return f"__bastion_rowkeys_{dataset}"


ROW_KEY = "__key"  # the row-keys table's one column


class PolicyError(ValueError):
    """A policy file is missing, malformed or unsafe."""


class ColumnType(StrEnum):
    INT = "int"
    FLOAT = "float"
    DECIMAL = "decimal"
    CATEGORY = "category"
    DATE = "date"
    BOOL = "bool"
    TEXT = "text"


class Usage(StrEnum):
    QUERY = "query"  # usable everywhere (queries, synthesis, labeling functions)
    LABELING = "labeling"  # usable inside labeling-function conditions only
    HIDDEN = "hidden"  # never usable


class Grant(StrEnum):
    QUERY = "query"
    SYNTH = "synth"
    LABELING = "labeling"
    EVALUATE = "evaluate"  # DP evaluation of attached model predictions against the gold labels
    ACCESS = "access"  # file requests to read consented units' rows (not DP: approved on the host, audited per read)


NUMERIC_TYPES = {ColumnType.INT, ColumnType.FLOAT, ColumnType.DECIMAL}
ROW_KEY_TYPES = {ColumnType.INT, ColumnType.CATEGORY, ColumnType.TEXT}
CONSENT_UNIT_TYPES = ROW_KEY_TYPES  # the privacy unit of a dataset with consent (`gateway.access`)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Strict):
    """One column of a dataset and the public facts about it.

    - `type`: int, float, decimal, category, date, bool or text.
    - `bounds`: `[low, high]` of a numeric or date column; values are clamped to them when the pre-bounded table is
      built, and every sensitivity follows from them. Required for numeric columns that are not hidden (unless a
      `domain` is declared); |bounds| at most 2**53 for int and 1e150 for float and decimal columns.
    - `domain`: the public set of values of a category, int or bool column; all of them are released as group keys.
    - `precision`: the fixed-point step of sums of a float or decimal column (default 0.01 for decimal, 1e-4 for
      float), between 1e-150 and 1e150.
    - `usage`: query (everywhere), labeling (inside labeling functions only) or hidden (never).
    - `max_length`: text and category columns only: the number of characters kept per value (longer values are
      truncated when the pre-bounded table is built), so the per-row cost of scanning a value is bounded by a
      public number. Default 2,000 for text and 200 for category columns; 1 to 1,000,000.
    """

    type: ColumnType
    bounds: tuple[Any, Any] | None = None
    domain: list[str | int | bool] | None = None
    precision: float | None = None
    usage: Usage = Usage.QUERY
    max_length: StrictInt | None = Field(default=None, ge=1, le=MAX_LENGTH_LIMIT)

    @model_validator(mode="before")
    @classmethod
    def _parse_dates(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "date" and isinstance(data.get("bounds"), list | tuple):
            try:
                data = {
                    **data,
                    "bounds": [dt.date.fromisoformat(b) if isinstance(b, str) else b for b in data["bounds"]],
                }
            except ValueError as exc:
                raise ValueError(f"date bounds must be YYYY-MM-DD: {exc}") from None
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_max_length(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind in DEFAULT_MAX_LENGTH and data.get("max_length") is None:
            data = {**data, "max_length": DEFAULT_MAX_LENGTH[kind]}
        return data

    @model_validator(mode="after")
    def _check(self) -> Column:
        if (
            self.type in NUMERIC_TYPES
            and self.usage is not Usage.HIDDEN
            and self.bounds is None
            and self.domain is None
        ):
            raise ValueError(
                f"a {self.type.value} column needs bounds: [low, high] (sums, means and quantiles are "
                "clamped to them); mark it usage: hidden if it must not be used"
            )
        if self.bounds is not None:
            lo, hi = self.bounds
            if self.type in NUMERIC_TYPES:
                if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
                    raise ValueError("numeric bounds must be numbers")
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError("bounds must be finite")
                if self.type is ColumnType.INT and not (float(lo).is_integer() and float(hi).is_integer()):
                    raise ValueError("bounds of an int column must be integers")
                if self.type is ColumnType.INT and max(abs(lo), abs(hi)) > MAX_INT_BOUND:
                    raise ValueError("bounds of an int column must lie within ±2**53 (9007199254740992)")
                if max(abs(lo), abs(hi)) > MAX_FLOAT_BOUND:
                    raise ValueError(f"bounds of a {self.type.value} column must lie within ±1e150")
            elif self.type is ColumnType.DATE:
                if not all(isinstance(v, dt.date) for v in (lo, hi)):
                    raise ValueError("date bounds must be dates (YYYY-MM-DD)")
            else:
                raise ValueError(f"a {self.type.value} column cannot have bounds")
            if lo >= hi:
                raise ValueError(f"bounds must satisfy low < high, got [{lo}, {hi}]")
        if self.domain is not None:
            if self.type not in {ColumnType.CATEGORY, ColumnType.INT, ColumnType.BOOL}:
                raise ValueError(f"a {self.type.value} column cannot declare a domain")
            if len(set(map(str, self.domain))) != len(self.domain):
                raise ValueError("domain values must be distinct")
            if not self.domain:
                raise ValueError("a declared domain must not be empty")
        if self.precision is not None:
            if self.type not in {ColumnType.DECIMAL, ColumnType.FLOAT}:
                raise ValueError("precision applies to decimal and float columns only")
            if not (self.precision > 0 and math.isfinite(self.precision)):
                raise ValueError("precision must be a positive number")
            if not PRECISION_RANGE[0] <= self.precision <= PRECISION_RANGE[1]:
                raise ValueError(f"precision must lie between {PRECISION_RANGE[0]:g} and {PRECISION_RANGE[1]:g}")
        if self.max_length is not None:
            if self.type not in {ColumnType.TEXT, ColumnType.CATEGORY}:
                raise ValueError("max_length applies to text and category columns only")
            if any(len(str(v)) > self.max_length for v in self.domain or []):
                raise ValueError(f"domain values must not be longer than max_length ({self.max_length})")
        if self.type is ColumnType.TEXT and self.usage is Usage.QUERY:
            raise ValueError("free-text columns must be usage: labeling or usage: hidden")
        return self

    @property
    def scale(self) -> float:
        """Size of one fixed-point unit used for exact sums (1 for ints)."""
        if self.type is ColumnType.INT:
            return 1.0
        if self.precision is not None:
            return self.precision
        return 0.01 if self.type is ColumnType.DECIMAL else 1e-4

    @property
    def max_abs(self) -> float:
        assert self.bounds is not None
        return float(max(abs(self.bounds[0]), abs(self.bounds[1])))

    @property
    def fx_unit(self) -> float:
        """Fixed-point unit of sums: the column's precision, coarsened so one row fits in 31 bits."""
        return max(self.scale, self.max_abs / 2**31)

    @property
    def fx2_unit(self) -> float:
        """Fixed-point unit of sums of squares, chosen the same way."""
        return max(self.scale**2, self.max_abs**2 / 2**31)

    def key_domain(self) -> list[Any] | None:
        """The public set of values of this column as a group key, or None if there is none."""
        if self.domain is not None:
            return list(self.domain)
        if self.type is ColumnType.BOOL:
            return [False, True]
        if self.bounds is not None and self.type is ColumnType.INT:
            lo, hi = int(self.bounds[0]), int(self.bounds[1])
            if hi - lo + 1 <= MAX_ENUMERABLE_DOMAIN:
                return list(range(lo, hi + 1))
        if self.bounds is not None and self.type is ColumnType.DATE:
            lo, hi = self.bounds
            days = (hi - lo).days + 1
            if days <= MAX_ENUMERABLE_DOMAIN:
                return [lo + dt.timedelta(days=i) for i in range(days)]
        return None


class Budget(_Strict):
    epsilon: float = Field(gt=0)
    delta: float = Field(default=0.0, ge=0, lt=1)

    @field_validator("epsilon")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("epsilon must be finite: an infinite budget means no privacy")
        return v


class Budgets(_Strict):
    per_principal: Budget
    total: Budget

    @model_validator(mode="after")
    def _check(self) -> Budgets:
        if self.per_principal.epsilon > self.total.epsilon or self.per_principal.delta > self.total.delta:
            raise ValueError("per_principal budget cannot exceed the total budget")
        return self


class Monitoring(_Strict):
    """DP data monitoring of every version (gateway.monitoring): `epsilon` is charged per version's report to the
    reserved principal `bastion:monitoring`, which may spend at most `cap` on the dataset (and counts against the
    dataset's total budget); `alert_rate` bounds the chance that a report on an unchanged feed raises any alert;
    numeric and date columns are histogrammed in `bins` equal bins over their bounds."""

    epsilon: float = Field(gt=0)
    cap: Budget
    alert_rate: float = Field(default=0.01, gt=0, lt=1)
    bins: int = Field(default=10, ge=2, le=100)

    @model_validator(mode="after")
    def _check(self) -> Monitoring:
        if not math.isfinite(self.epsilon):
            raise ValueError("monitoring.epsilon must be finite")
        if self.epsilon > self.cap.epsilon:
            raise ValueError("monitoring.epsilon (per version) cannot exceed monitoring.cap")
        return self


PERIOD_EVERY = ("day", "week", "month", "quarter", "year")
# Most periods a policy may declare (each is a budget of its own, enumerated from the column's bounds).
MAX_PERIODS = 10_000


def period_start(day: dt.date, every: str) -> dt.date:
    """First day of the period of `every` that holds `day` (weeks start on Monday)."""
    if every == "day":
        return day
    if every == "week":
        return day - dt.timedelta(days=day.weekday())
    if every == "month":
        return day.replace(day=1)
    if every == "quarter":
        return dt.date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)
    if every == "year":
        return dt.date(day.year, 1, 1)
    raise ValueError(f"unknown period {every!r}")


def next_period_start(start: dt.date, every: str) -> dt.date:
    """First day of the period after the one starting on `start`."""
    if every == "day":
        return start + dt.timedelta(days=1)
    if every == "week":
        return start + dt.timedelta(days=7)
    months = {"month": 1, "quarter": 3, "year": 12}[every]
    m = start.month - 1 + months
    return dt.date(start.year + m // 12, m % 12 + 1, 1)


class Period(_Strict):
    """A time-partitioned privacy unit: the protected unit is (privacy unit, period of `column`), as in block
    composition. `column` must be a date column with declared bounds (its values are clamped to them, so every row
    falls in one of the enumerated periods); `every` is day, week, month, quarter or year. Each period has its own
    budget (the policy's per-principal and total caps apply to each period separately)."""

    column: str
    every: Literal["day", "week", "month", "quarter", "year"]


class Synthesis(_Strict):
    mode: Literal["dp", "non_dp_allowed"] = "dp"


class Labels(_Strict):
    gold_column: str | None = None
    classes: list[str]

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("labels.classes needs at least two distinct classes")
        return v


SCOPE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Consent(_Strict):
    """Where the consent of the dataset's units to debug access lives (`gateway.access`): a CSV or Parquet file with
    one row per consent, loaded at registration (and by `bastion consent reload`) into the workspace's private
    directory, never readable through any query path.

    - `source`: the file, relative to the policy file unless absolute.
    - `unit`, `scope`, `expires`: its columns holding the privacy unit's value, the scope consented to, and when
      the consent ends (ISO 8601 date or time; a time without a zone is UTC). A row whose unit, scope or expiry
      cannot be read, or whose scope is not declared, is no consent.
    - `scopes`: the scopes a request may name (public strings); the first is the default.
    """

    source: str
    unit: str
    scope: str = "scope"
    expires: str = "expires"
    scopes: list[str] = Field(min_length=1)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        for s in v:
            if not re.match(SCOPE, s):
                raise ValueError(f"scope {s!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if len(set(v)) != len(v):
            raise ValueError("consent.scopes repeats a scope")
        return v


class PublicTable(_Strict):
    """A public lookup table of a dataset (diagnosis codes to chapters, regions to countries): no privacy unit, no
    budget; any principal granted on the dataset may read its rows, and queries may join the private table with it.

    - `source`: its CSV or Parquet file, relative to the policy file (as the dataset's own source) unless absolute.
    - `columns`: its columns and their types, as the dataset's (values are converted and clamped the same way).
      A category, int or bool column without a declared domain takes the table's own distinct values as its
      public domain of group keys.
    - `unique_key`: a column whose values are unique (checked when the table is loaded): a join on it leaves every
      sensitivity as it is.
    - `max_multiplicity`: for other join columns, the most rows one value may have (checked when loaded): a join on
      such a column multiplies every sensitivity by it.
    """

    source: str
    columns: dict[str, Column]
    unique_key: str | None = None
    max_multiplicity: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> PublicTable:
        if not self.columns:
            raise ValueError("a public table needs columns")
        for name, col in self.columns.items():
            if not name.isidentifier() or name.lower() != name or name.startswith("__"):
                raise ValueError(f"column name {name!r} must be a lower-case identifier not starting with __")
            if col.usage is not Usage.QUERY:
                raise ValueError(f"column {name!r}: every column of a public table is public (usage: query)")
        if self.unique_key is None and not self.max_multiplicity:
            raise ValueError(
                "a public table needs a unique_key (a column whose values are unique) or a max_multiplicity per "
                "join column: joins are priced from them"
            )
        if self.unique_key is not None and self.unique_key not in self.columns:
            raise ValueError(f"unique_key {self.unique_key!r} is not a column of the table")
        for name, m in self.max_multiplicity.items():
            if name not in self.columns:
                raise ValueError(f"max_multiplicity names {name!r}, not a column of the table")
            if name == self.unique_key:
                raise ValueError(f"{name!r} is the unique key: its multiplicity is 1")
            if not 1 <= m <= MAX_MULTIPLICITY:
                raise ValueError(f"max_multiplicity of {name!r} must be between 1 and {MAX_MULTIPLICITY}")
        return self

    def multiplicity(self, column: str) -> int | None:
        """How many rows of the table one value of `column` may match: 1 for the unique key, the declared
        multiplicity, or None if a join on it is not allowed."""
        if column == self.unique_key:
            return 1
        return self.max_multiplicity.get(column)

    def public_schema(self) -> dict[str, Any]:
        return {
            "columns": {
                name: {k: v for k, v in col.model_dump(mode="json").items() if v is not None}
                for name, col in self.columns.items()
            },
            "unique_key": self.unique_key,
            "max_multiplicity": dict(self.max_multiplicity),
        }


def private_table_name(dataset: str, table: str) -> str:
    """The name a dataset's further private table has as a dataset of its own (its bounded table is
    `bounded_<dataset>__<table>`): one-to-one for table names without `__` (the policy checks)."""
    return f"{dataset}__{table}"


class PrivateTable(_Strict):
    """A further private table of a dataset (visits and labs beside patients): the same privacy unit, its own
    source, columns and bound, bounded at registration as the dataset's own table (at most `max_rows_per_unit` rows
    per unit, kept by the keyed digest). Queries read it as `<dataset>.<table>`, alone or joined with the dataset's
    other private tables on the unit (`gateway.sql.privatejoins`); one budget covers every table of the dataset.

    - `source`: its CSV or Parquet file, relative to the policy file unless absolute.
    - `unit_column`: its column holding the dataset's privacy unit (same type as the dataset's unit column).
    - `columns`, `max_rows_per_unit`: as the dataset's.
    - `foreign_keys`: column → `<table>.<column>` of another private table (or of the dataset's own, named by the
      dataset's name): documentation of the schema, and the columns a join may add to the unit's equality.
    """

    source: str
    unit_column: str
    columns: dict[str, Column]
    max_rows_per_unit: int = Field(ge=1, le=10_000)
    foreign_keys: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> PrivateTable:
        for name in self.columns:
            if not name.isidentifier() or name.lower() != name or name.startswith("__"):
                raise ValueError(f"column name {name!r} must be a lower-case identifier not starting with __")
        if self.unit_column not in self.columns:
            raise ValueError(f"unit_column {self.unit_column!r} is not a column of the table")
        for name, target in self.foreign_keys.items():
            if name not in self.columns:
                raise ValueError(f"foreign_keys names {name!r}, not a column of the table")
            if target.count(".") != 1 or not all(part.isidentifier() for part in target.split(".")):
                raise ValueError(f"foreign key {name!r} must name <table>.<column>, not {target!r}")
        return self

    def public_schema(self) -> dict[str, Any]:
        return {
            "unit_column": self.unit_column,
            "max_rows_per_unit": self.max_rows_per_unit,
            "columns": {
                name: {k: v for k, v in col.model_dump(mode="json").items() if v is not None}
                for name, col in self.columns.items()
                if col.usage is not Usage.HIDDEN
            },
            "foreign_keys": dict(self.foreign_keys),
        }


class Policy(_Strict):
    dataset: str = Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    source: str | None = None
    privacy_unit: str
    max_rows_per_unit: int = Field(ge=1, le=10_000)
    budget: Budgets
    columns: dict[str, Column]
    roles: dict[Literal["analyst", "lf_author", "auditor", "admin"], list[Grant]] = Field(default_factory=dict)
    synthesis: Synthesis = Synthesis()
    labels: Labels | None = None
    # The column that identifies a row of the dataset (unique in the source, checked at registration): model
    # predictions are attached by it (`bastion predictions add`). Kept in the bounded table, never released.
    row_key: str | None = None
    # Key selection processes at least this many candidate keys (padded), so its time does not depend on how many
    # distinct private keys there are up to this many (see policies.mechanisms.select_keys).
    key_candidates: int = Field(default=1_000, ge=1, le=100_000)
    # How spend is accounted (policies.accountant): pure ε (default) or ρ-zCDP with Gaussian noise.
    accounting: Accounting = Accounting.PURE
    # Public lookup tables (no unit, no budget) the private table may be joined with: name → table.
    public_tables: dict[str, PublicTable] = Field(default_factory=dict)
    # Where the units' consent to debug access lives (`bastion access`); none: no access requests on the dataset.
    consent: Consent | None = None
    # Further private tables of the same unit (visits, labs): name → table, read as `<dataset>.<table>`.
    private_tables: dict[str, PrivateTable] = Field(default_factory=dict)
    # A join of private tables whose product of bounds exceeds this keeps at most this many joined rows per unit
    # (chosen by a hash of their values) and is priced at it; None: every join is priced at the product.
    max_joined_rows_per_unit: int | None = Field(default=None, ge=1, le=10_000)
    # DP data monitoring of each version (a report per registration and append); none: versions are not monitored.
    monitoring: Monitoring | None = None
    # A time-partitioned privacy unit (`Period`): bounding, budgets and charges are per (unit, period).
    period: Period | None = None

    @model_validator(mode="after")
    def _check(self) -> Policy:
        if self.monitoring is not None and (
            self.monitoring.cap.epsilon > self.budget.per_principal.epsilon
            or self.monitoring.cap.delta > self.budget.per_principal.delta
        ):
            raise ValueError(
                "monitoring.cap cannot exceed budget.per_principal: monitoring is one principal of the dataset "
                "(bastion:monitoring), and its spend counts against the total budget like any principal's"
            )
        if self.period is not None:
            self._check_period(self.period)
        if self.consent is not None and self.privacy_unit == "row":
            raise ValueError("consent needs a privacy unit column (consent is given per unit); privacy_unit is 'row'")
        for name in self.public_tables:
            # No leading `_` and no `__` inside: `public_<dataset>__<table>` then names one (dataset, table) only,
            # so no dataset's registration can replace another's public table (checked against other rows).
            if not name.isidentifier() or name.lower() != name or name.startswith("_") or "__" in name:
                raise ValueError(
                    f"public table name {name!r} must be a lower-case identifier, not starting with _ and without __"
                )
            if len(name) > 63:
                raise ValueError(f"public table name {name!r} is longer than 63 characters")
            if name == self.dataset:
                raise ValueError(f"public table {name!r} has the dataset's own name")
        self._check_private_tables()
        if self.accounting is Accounting.ZCDP and not (
            self.budget.per_principal.delta > 0 and self.budget.total.delta > 0
        ):
            raise ValueError(
                "accounting: zcdp needs a δ > 0 in both budgets (ρ is converted to (ε, δ) at half of it); "
                "give the budgets a δ or use accounting: pure"
            )
        for name in self.columns:
            if not name.isidentifier() or name.lower() != name or name.startswith("__"):
                raise ValueError(f"column name {name!r} must be a lower-case identifier not starting with __")
        if self.privacy_unit != "row":
            if self.privacy_unit not in self.columns:
                raise ValueError(
                    f"privacy_unit {self.privacy_unit!r} is not a column of the policy; "
                    "name one of its columns, or use 'row'"
                )
            kind = self.columns[self.privacy_unit].type
            if self.consent is not None and kind not in CONSENT_UNIT_TYPES:
                raise ValueError(
                    f"consent needs a privacy unit of type int, category or text (requests and consent records name "
                    f"its values); {self.privacy_unit!r} is {kind.value}"
                )
        elif self.max_rows_per_unit != 1:
            raise ValueError("privacy_unit: row implies max_rows_per_unit: 1")
        if self.labels is not None and self.labels.gold_column is not None:
            gold = self.columns.get(self.labels.gold_column)
            if gold is None:
                raise ValueError(f"labels.gold_column {self.labels.gold_column!r} is not a column")
            if gold.usage is Usage.QUERY:
                raise ValueError("the gold-label column must be usage: labeling or hidden")
        if self.row_key is not None:
            key = self.columns.get(self.row_key)
            if key is None:
                raise ValueError(f"row_key {self.row_key!r} is not a column of the policy")
            if key.type not in ROW_KEY_TYPES:
                raise ValueError(
                    f"row_key {self.row_key!r} must be an int, category or text column (it is {key.type.value})"
                )
            gold_name = self.labels.gold_column if self.labels is not None else None
            if self.row_key == gold_name:
                raise ValueError("row_key cannot be the gold-label column")
        return self

    def _check_private_tables(self) -> None:
        for name, table in self.private_tables.items():
            if not name.isidentifier() or name.lower() != name or name.startswith("_") or "__" in name:
                raise ValueError(
                    f"private table name {name!r} must be a lower-case identifier, not starting with _ and without __"
                )
            if len(private_table_name(self.dataset, name)) > 63:
                raise ValueError(f"private table name {name!r}: <dataset>__<table> is longer than 63 characters")
            if name == self.dataset or name in self.public_tables:
                raise ValueError(f"private table {name!r} has the name of the dataset or of one of its public tables")
            if self.privacy_unit == "row":
                raise ValueError(
                    "private_tables need a privacy unit column shared by every table; privacy_unit is 'row'"
                )
            unit = self.columns.get(self.privacy_unit)
            mine = table.columns[table.unit_column]
            if unit is not None and unit.type != mine.type:
                raise ValueError(
                    f"private table {name!r}: its unit column {table.unit_column!r} is {mine.type.value}, the "
                    f"dataset's {self.privacy_unit!r} is {unit.type.value}"
                )
            for column, target in table.foreign_keys.items():
                other, other_column = target.split(".")
                columns = self.columns if other == self.dataset else None
                if other in self.private_tables:
                    columns = self.private_tables[other].columns
                if columns is None or other == name:
                    raise ValueError(f"private table {name!r}: foreign key {column!r} names no other private table")
                if other_column not in columns:
                    raise ValueError(f"private table {name!r}: foreign key {column!r} names no column {target!r}")
                if columns[other_column].type != table.columns[column].type:
                    raise ValueError(f"private table {name!r}: foreign key {column!r} and {target!r} differ in type")

    def private_policy(self, table: str) -> Policy:
        """A private table as a dataset of its own (`<dataset>__<table>`): its columns, unit and bound, the dataset's
        budget and roles; what its bounded table is built from and a query over it alone is planned with."""
        spec = self.private_tables[table]
        return Policy(
            dataset=private_table_name(self.dataset, table),
            source=spec.source,
            privacy_unit=spec.unit_column,
            max_rows_per_unit=spec.max_rows_per_unit,
            budget=self.budget,
            columns=spec.columns,
            roles=self.roles,
            key_candidates=self.key_candidates,
            accounting=self.accounting,
        )

    def _check_period(self, period: Period) -> None:
        col = self.columns.get(period.column)
        if col is None:
            raise ValueError(f"period.column {period.column!r} is not a column of the policy")
        if col.type is not ColumnType.DATE or col.bounds is None:
            raise ValueError(
                f"period.column {period.column!r} must be a date column with declared bounds (the periods are "
                "public: they are enumerated from the bounds)"
            )
        if col.usage is not Usage.QUERY:
            raise ValueError(f"period.column {period.column!r} must be usage: query (queries filter on it)")
        if self.privacy_unit == "row":
            raise ValueError("a period needs a privacy unit column (privacy_unit: row has one row per unit)")
        if period.column == self.privacy_unit:
            raise ValueError("period.column cannot be the privacy unit")
        if self.consent is not None:
            raise ValueError("consent (access requests) is not supported with a period: remove one of them")
        if self.private_tables:
            raise ValueError(
                "private_tables are not supported with a period (their rows have no period of their own): remove one "
                "of them"
            )
        count, start = 0, period_start(col.bounds[0], period.every)
        while start <= col.bounds[1]:
            count += 1
            if count > MAX_PERIODS:
                raise ValueError(f"the period column's bounds span more than {MAX_PERIODS} periods of {period.every}")
            start = next_period_start(start, period.every)

    # --- periods ---------------------------------------------------------------------------------------

    def periods(self) -> list[tuple[str, dt.date, dt.date]]:
        """The public periods, oldest first: (label, first day, first day of the next period). The first and last
        periods are those holding the column's bounds (values are clamped to the bounds)."""
        if self.period is None:
            return []
        col = self.columns[self.period.column]
        assert col.bounds is not None
        out = []
        start = period_start(col.bounds[0], self.period.every)
        while start <= col.bounds[1]:
            end = next_period_start(start, self.period.every)
            out.append((self.period_label(start), start, end))
            start = end
        return out

    def period_label(self, start: dt.date) -> str:
        """A period's public name: 2024 (year), 2024-Q2 (quarter), 2024-03 (month), 2024-03-04 (week: its Monday;
        day)."""
        assert self.period is not None
        every = self.period.every
        if every == "year":
            return f"{start.year:04d}"
        if every == "quarter":
            return f"{start.year:04d}-Q{(start.month - 1) // 3 + 1}"
        if every == "month":
            return f"{start.year:04d}-{start.month:02d}"
        return start.isoformat()

    # --- helpers used by planners ---------------------------------------------------------------------

    @property
    def bounded_table(self) -> str:
        """Name of the pre-bounded table every query, synthesis and labeling-function run reads."""
        return bounded_table(self.dataset)

    @property
    def unit_column(self) -> str | None:
        return None if self.privacy_unit == "row" else self.privacy_unit

    def grants(self, role: str) -> set[Grant]:
        return set(self.roles.get(role, []))  # type: ignore[call-overload]

    def names_column(self, name: str) -> bool:
        """Whether a refusal may confirm that column `name` exists: every column but the hidden ones does (the
        privacy unit is named); a hidden column is refused like an absent one."""
        spec = self.columns.get(name)
        return spec is not None and (spec.usage is not Usage.HIDDEN or name == self.privacy_unit)

    def usable_columns(self, *, labeling: bool = False) -> dict[str, Column]:
        """Columns an expression may reference: query columns, plus labeling-only ones inside LFs."""
        allowed = {Usage.QUERY, Usage.LABELING} if labeling else {Usage.QUERY}
        return {name: col for name, col in self.columns.items() if col.usage in allowed and name != self.privacy_unit}

    def fingerprint(self) -> str:
        """Stable hash of the policy's content; part of every cache key and proxy version."""
        content = self.model_dump(mode="json")
        if self.accounting is Accounting.PURE:
            del content["accounting"]  # the fingerprints of policies from before the option stay as they were
        if not self.public_tables:
            del content["public_tables"]  # likewise for policies without public tables
        if self.row_key is None:
            del content["row_key"]  # likewise
        if self.consent is None:
            del content["consent"]  # likewise
        if not self.private_tables:
            del content["private_tables"]  # likewise
        if self.max_joined_rows_per_unit is None:
            del content["max_joined_rows_per_unit"]  # likewise
        if self.monitoring is None:
            del content["monitoring"]  # likewise
        if self.period is None:
            del content["period"]  # likewise
        payload = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def public_schema(self) -> dict[str, Any]:
        """What any granted principal may see about the dataset: no counts, no data."""
        return {
            "dataset": self.dataset,
            "privacy_unit": self.privacy_unit,
            "max_rows_per_unit": self.max_rows_per_unit,
            "columns": {
                name: {k: v for k, v in col.model_dump(mode="json").items() if v is not None}
                for name, col in self.columns.items()
                if col.usage is not Usage.HIDDEN
            },
            "budget": self.budget.model_dump(mode="json"),
            "labels": self.labels.model_dump(mode="json") if self.labels else None,
            **({"row_key": self.row_key} if self.row_key is not None else {}),
            "synthesis": self.synthesis.model_dump(mode="json"),
            "accounting": self.accounting.value,
            "public_tables": {name: t.public_schema() for name, t in self.public_tables.items()},
            **(
                {
                    "private_tables": {name: t.public_schema() for name, t in self.private_tables.items()},
                    "max_joined_rows_per_unit": self.max_joined_rows_per_unit,
                }
                if self.private_tables
                else {}
            ),
            # The scopes an access request may name (the consent source and its columns are the admin's).
            **({"consent": {"scopes": list(self.consent.scopes)}} if self.consent is not None else {}),
            **({"monitoring": self.monitoring.model_dump(mode="json")} if self.monitoring is not None else {}),
            **(
                {
                    "period": {
                        **self.period.model_dump(mode="json"),
                        "periods": [label for label, _, _ in self.periods()],
                    }
                }
                if self.period is not None
                else {}
            ),
        }


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy YAML file; raise PolicyError with every problem found."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as exc:
        raise PolicyError(f"policy file not found: {p}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{p}: not valid YAML: {exc}") from exc
    return parse_policy(raw, origin=str(p))


def parse_policy(raw: Any, origin: str = "policy") -> Policy:
    if not isinstance(raw, dict):
        raise PolicyError(f"{origin}: a policy must be a mapping")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise PolicyError(f"{origin}: unsafe or invalid policy: {problems}") from exc
