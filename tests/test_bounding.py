"""Contribution bounding on the real stack: stable under neighbours and row order, keyed without pasting the key,
text capped to a public length, and every registration expression total on hostile values."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml

from gateway.engines.duckdb import CatalogError, DuckDBEngine
from policies.schema import Policy, parse_policy

K = 3
KEY = "a3" * 32

POLICY = parse_policy(
    yaml.safe_load(f"""
dataset: bnd
privacy_unit: uid
max_rows_per_unit: {K}
budget: {{per_principal: {{epsilon: 1}}, total: {{epsilon: 5}}}}
columns:
  uid:    {{type: int, usage: hidden}}
  kind:   {{type: category, domain: [a, b, c]}}
  value:  {{type: int, bounds: [0, 1000]}}
  amount: {{type: decimal, bounds: [-50, 50], precision: 0.01}}
  day:    {{type: date, bounds: [2020-01-01, 2020-12-31]}}
  flag:   {{type: bool}}
  note:   {{type: text, usage: labeling}}
  ssn:    {{type: text, usage: hidden}}
roles: {{analyst: [query]}}
""")
)


def _frame(seed: int = 3) -> pd.DataFrame:
    """60 units with 1-12 rows each (most over-full), interleaved, with NULLs and duplicate rows in a unit."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, size=60)
    uid = np.repeat(np.arange(60), sizes)
    n = len(uid)
    frame = pd.DataFrame(
        {
            "uid": uid,
            "kind": rng.choice(["a", "b", "c", "zz"], n),
            "value": rng.integers(-100, 1200, n),
            "amount": rng.normal(0, 40, n).round(3),
            "day": pd.to_datetime("2019-06-01") + pd.to_timedelta(rng.integers(0, 800, n), unit="D"),
            "flag": rng.random(n) < 0.5,
            "note": [f"note {i % 7}" for i in range(n)],
            "ssn": [f"{i:09d}" for i in range(n)],
        }
    )
    frame.loc[rng.random(n) < 0.1, "amount"] = None
    frame.loc[rng.random(n) < 0.1, "note"] = None
    frame["day"] = frame["day"].dt.strftime("%Y-%m-%d")
    # Unit 0 holds five identical rows (ssn aside, which is hidden and never kept): interchangeable duplicates.
    dup = frame[frame.uid == 1].iloc[[0] * 5].assign(uid=0)
    frame = pd.concat([dup, frame[frame.uid != 0]], ignore_index=True)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def _catalog(root: Path) -> DuckDBEngine:
    root.mkdir(parents=True, exist_ok=True)
    (root / "key").write_text(KEY)
    return DuckDBEngine(root / "db.duckdb", root / "key", read_only=False)


def _bounded(frame: pd.DataFrame, root: Path, suffix: str, policy: Policy = POLICY) -> Counter[tuple[Any, ...]]:
    cat = _catalog(root)
    try:
        cat.register(policy, _write(frame, root / f"src{suffix}"))
        rows = cat.connect().execute(f'SELECT * EXCLUDE (__row_id) FROM "{policy.bounded_table}"').fetchall()
    finally:
        cat.close()
    return Counter(rows)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_neighbours_differ_only_in_the_removed_unit(tmp_path: Path, suffix: str) -> None:
    frame = _frame()
    full = _bounded(frame, tmp_path / "full", suffix)
    assert max(Counter(r[0] for r in full.elements()).values()) == K
    # Remove the unit of the first row in the file (its removal shifts every later row's position), an over-full
    # unit in the middle, and the unit of duplicates.
    sizes = frame.groupby("uid").size()
    first = int(frame.uid.iloc[0])
    middle = int(sizes[sizes > 2 * K].index[len(sizes[sizes > 2 * K]) // 2])
    for removed in dict.fromkeys([first, middle, 0]):
        neighbour = _bounded(frame[frame.uid != removed], tmp_path / f"without{removed}", suffix)
        kept = Counter({row: n for row, n in full.items() if row[0] == removed})
        assert sum(kept.values()) == min(K, int(sizes[removed]))
        assert full - neighbour == kept
        assert neighbour - full == Counter()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_bounded_table_does_not_depend_on_row_order(tmp_path: Path, suffix: str) -> None:
    frame = _frame()
    first = _bounded(frame, tmp_path / "a", suffix)
    for seed in (1, 2):
        shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        assert _bounded(shuffled, tmp_path / f"s{seed}", suffix) == first


def test_other_key_keeps_other_rows(tmp_path: Path) -> None:
    frame = _frame()
    first = _bounded(frame, tmp_path / "a", ".parquet")
    cat = DuckDBEngine(tmp_path / "b" / "db.duckdb", tmp_path / "b" / "key", read_only=False)  # a fresh random key
    cat.register(POLICY, _write(frame, tmp_path / "src.parquet"))
    other = Counter(cat.connect().execute("SELECT * EXCLUDE (__row_id) FROM bounded_bnd").fetchall())
    cat.close()
    assert sum(other.values()) == sum(first.values()) and other != first


def test_units_are_bounded_by_their_converted_value(tmp_path: Path) -> None:
    """Spellings of one unit id ("7", "7.0", " 7") are one unit of the bounded table, so they share its k rows."""
    frame = _frame()
    frame["uid"] = frame["uid"].astype(str)
    spellings = ["7", "7.0", " 7", "7e0", "07"]
    extra = frame.iloc[: 4 * len(spellings)].assign(uid=[s for s in spellings for _ in range(4)])
    counts = Counter(r[0] for r in _bounded(pd.concat([frame, extra]), tmp_path, ".csv").elements())
    assert counts[7] == K and max(counts.values()) == K


class _Recorder:
    """A cursor that records every statement and its parameters, and so do the cursors it opens."""

    def __init__(self, cursor: Any, log: list[tuple[str, Any]]) -> None:
        self._cursor, self._log = cursor, log

    def execute(self, sql: str, params: Any = None) -> Any:
        self._log.append((sql, params))
        return self._cursor.execute(sql) if params is None else self._cursor.execute(sql, params)

    def cursor(self) -> _Recorder:
        return _Recorder(self._cursor.cursor(), self._log)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def test_the_key_never_reaches_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest is computed outside the engine: the key is in no statement, no parameter, no stored SQL."""
    cat = _catalog(tmp_path)
    log: list[tuple[str, Any]] = []
    connect = DuckDBEngine.connect
    monkeypatch.setattr(DuckDBEngine, "connect", lambda self: _Recorder(connect(self), log))
    cat.register(POLICY, _write(_frame(), tmp_path / "src.csv"))
    assert any("CREATE" in sql for sql, _ in log)
    assert all(KEY not in sql and KEY not in repr(params) for sql, params in log)
    monkeypatch.undo()
    stored = cat.connect().execute("SELECT sql FROM duckdb_tables() UNION ALL SELECT sql FROM duckdb_views()")
    assert all(KEY not in (sql or "") for (sql,) in stored.fetchall())
    cat.close()


def test_text_and_categories_are_capped_to_max_length(tmp_path: Path) -> None:
    columns = POLICY.model_dump(mode="json")["columns"]
    columns["kind"] = {"type": "category", "max_length": 3}
    columns["note"] = {"type": "text", "usage": "labeling", "max_length": 5}
    policy = parse_policy({**POLICY.model_dump(mode="json"), "columns": columns})
    frame = _frame()
    frame["note"] = ["é" * (i % 9) + "x" * 100_000 * (i % 2) for i in range(len(frame))]
    frame["kind"] = "abcdef"
    cat = _catalog(tmp_path)
    cat.register(policy, _write(frame, tmp_path / "src.parquet"))
    notes, kinds = zip(*cat.connect().execute("SELECT note, kind FROM bounded_bnd").fetchall(), strict=True)
    cat.close()
    assert set(kinds) == {"abc"}
    assert set(notes) <= {n[:5] for n in frame["note"]} and max(map(len, notes)) == 5
    assert any(len(n) == 5 and "é" in n and "x" in n for n in notes)  # characters, not bytes
    schema = policy.public_schema()["columns"]
    assert schema["note"]["max_length"] == 5 and schema["kind"]["max_length"] == 3
    defaults = POLICY.public_schema()["columns"]
    assert defaults["note"]["max_length"] == 2_000 and defaults["kind"]["max_length"] == 200
    assert "max_length" not in defaults["value"]


def test_default_max_length_caps_long_text(tmp_path: Path) -> None:
    frame = _frame()
    frame["note"] = "y" * 5_000
    frame["kind"] = "k" * 300
    cat = _catalog(tmp_path)
    cat.register(POLICY, _write(frame, tmp_path / "src.csv"))
    assert cat.connect().execute("SELECT max(length(note)), max(length(kind)) FROM bounded_bnd").fetchone() == (
        2_000,
        200,
    )
    cat.close()


EXTREME = parse_policy(
    yaml.safe_load("""
dataset: extreme
privacy_unit: uid
max_rows_per_unit: 2
budget: {per_principal: {epsilon: 1}, total: {epsilon: 5}}
columns:
  uid:   {type: int, usage: hidden}
  big:   {type: int, bounds: [-1000000000000000, 1000000000000000]}
  wide:  {type: decimal, bounds: [-1.0e+15, 1.0e+15], precision: 1.0e-12}
  fine:  {type: float, bounds: [0, 1.0e-9], precision: 1.0e-12}
  coarse: {type: decimal, bounds: [-1, 1], precision: 1000000}
  small: {type: int, bounds: [-3, 3]}
  day:   {type: date, bounds: [2020-01-01, 2020-12-31]}
  flag:  {type: bool}
  kind:  {type: category}
roles: {analyst: [query]}
""")
)

HOSTILE = [
    "1e300",
    "-1e300",
    "nan",
    "inf",
    "-inf",
    "abc",
    "",
    "99999999999999999999999999",
    "-9.2e18",
    "1000000000000001",
    "-999999999999999.5",
    "0.4999999",
    "2.5",
    "1e-320",
    "5e-13",
]


def test_registration_is_total_on_hostile_values(tmp_path: Path) -> None:
    n = len(HOSTILE)
    frame = pd.DataFrame(
        {
            "uid": [str(i % 5) for i in range(n)] + ["x"],
            **{c: HOSTILE + ["1"] for c in ("big", "wide", "fine", "coarse", "small", "day", "flag", "kind")},
        }
    )
    frame.loc[0, "day"] = "2021-05-05 10:00:00"
    cat = _catalog(tmp_path)
    cat.register(EXTREME, _write(frame, tmp_path / "src.csv"))
    con = cat.connect()
    for name in ("big", "wide", "fine", "coarse", "small"):
        col = EXTREME.columns[name]
        assert col.bounds is not None
        lo, hi = col.bounds
        fx_max = math.ceil(col.max_abs / col.fx_unit - 1e-9)
        fx2_max = math.ceil(col.max_abs**2 / col.fx2_unit - 1e-9)
        rows = con.execute(f'SELECT "{name}", "__fx_{name}", "__fx2_{name}" FROM bounded_extreme').fetchall()
        for value, fx, fx2 in rows:
            assert (value is None) == (fx is None) == (fx2 is None), (name, value, fx, fx2)
            if value is not None:
                assert lo <= value <= hi and abs(fx) <= fx_max and 0 <= fx2 <= fx2_max, (name, value, fx, fx2)
    big = dict(con.execute("SELECT big, count(*) FROM bounded_extreme GROUP BY big").fetchall())
    assert big.get(10**15) and big.get(-(10**15)) and None in big  # clamped both ways; nan, abc, '' are missing
    # Only 'inf', '-inf' and a timestamp read as dates; each is clamped to a bound (which rows a unit keeps
    # depends on the key).
    days = {d.isoformat() for (d,) in con.execute("SELECT day FROM bounded_extreme WHERE day IS NOT NULL").fetchall()}
    assert days and days <= {"2020-01-01", "2020-12-31"}
    cat.close()


SOURCE_TYPES = {
    "bigint": "[9223372036854775807, -9223372036854775808, 0]",
    "hugeint": "[170141183460469231731687303715884105727::HUGEINT, -170141183460469231731687303715884105727::HUGEINT]",
    "double": "['nan'::DOUBLE, 'inf'::DOUBLE, '-inf'::DOUBLE, 1.7e308, -5e-324]",
    "decimal": "[9999999999999999999999999999999999.99::DECIMAL(38,2), -0.01::DECIMAL(38,2)]",
    "varchar": "['1e400', 'nan', '', 'true', '2020-02-30', '  3  ', '\u00e9']",
    "date": "['infinity'::DATE, '-infinity'::DATE, '0001-01-01'::DATE, '2020-06-01'::DATE]",
    "timestamp": "['294247-01-01 00:00:00'::TIMESTAMP, '2020-06-01 23:59:59'::TIMESTAMP]",
    "timestamptz": "['2020-06-01 23:59:59+05'::TIMESTAMPTZ]",
    "boolean": "[true, false]",
    "list": "[[1, 2], []]",
    "struct": "[{'a': 1, 'b': 'x'}]",
    "map": "[MAP {'a': 1}]",
    "blob": "['\\xFF\\x00'::BLOB]",
    "uuid": "['00000000-0000-0000-0000-000000000000'::UUID]",
    "interval": "[INTERVAL 3 DAY]",
}

ANY_TYPE = parse_policy(
    yaml.safe_load("""
dataset: anytype
privacy_unit: uid
max_rows_per_unit: 2
budget: {per_principal: {epsilon: 1}, total: {epsilon: 5}}
columns:
  uid:   {type: int, usage: hidden}
  ci:    {type: int, bounds: [-5, 5]}
  cd:    {type: decimal, bounds: [-1, 1]}
  cf:    {type: float, bounds: [0, 1]}
  cdom:  {type: int, domain: [0, 1]}
  cdate: {type: date, bounds: [2020-01-01, 2020-12-31]}
  cb:    {type: bool}
  ccat:  {type: category, max_length: 4}
  ctext: {type: text, usage: labeling, max_length: 4}
roles: {analyst: [query]}
""")
)


@pytest.mark.parametrize("source_type", list(SOURCE_TYPES))
def test_every_policy_type_reads_every_source_type(tmp_path: Path, source_type: str) -> None:
    path = tmp_path / "src.parquet"
    values = SOURCE_TYPES[source_type]
    names = [n for n in ANY_TYPE.columns if n != "uid"]
    with duckdb.connect() as con:
        con.execute(
            f"COPY (SELECT i AS uid, {', '.join(f'v AS {n}' for n in names)} FROM "
            f"(SELECT unnest(list_append({values}, NULL)) AS v, range(3) AS r), unnest(r) AS t(i)) TO '{path}'"
        )
    cat = _catalog(tmp_path)
    cat.register(ANY_TYPE, path)
    con = cat.connect()
    for name in ("ci", "cd", "cf"):
        col = ANY_TYPE.columns[name]
        assert col.bounds is not None
        lo, hi = col.bounds
        for value, fx, fx2 in con.execute(f"SELECT {name}, __fx_{name}, __fx2_{name} FROM bounded_anytype").fetchall():
            assert (value is None) == (fx is None) == (fx2 is None)
            assert value is None or (lo <= value <= hi and abs(fx) <= col.max_abs / col.fx_unit + 0.5)
    lengths = con.execute("SELECT max(length(ccat)), max(length(ctext)) FROM bounded_anytype").fetchone()
    assert lengths is not None
    assert all(n is None or n <= 4 for n in lengths)
    cat.close()


def test_registration_errors_are_catalog_errors_that_say_where(tmp_path: Path) -> None:
    pd.DataFrame({"uid": [1, 2], "kind": ["a", "b"]}).to_csv(tmp_path / "src.csv", index=False)
    columns = {"uid": {"type": "int", "usage": "hidden"}, "kind": {"type": "category"}}
    missing = parse_policy({**EXTREME.model_dump(mode="json"), "columns": {**columns, "gone": {"type": "bool"}}})
    cat = _catalog(tmp_path)
    with pytest.raises(CatalogError, match="gone"):
        cat.register(missing, tmp_path / "src.csv")
    # A malformed line past the sniffer's sample fails the read: the error says so, in one line, and nothing changes.
    policy = parse_policy({**EXTREME.model_dump(mode="json"), "columns": columns})
    rows = "".join(f"{i},k\n" for i in range(30_000))
    (tmp_path / "bad.csv").write_text(f"uid,kind\n{rows}1,k,extra\n")
    with pytest.raises(CatalogError) as info:
        cat.register(policy, tmp_path / "bad.csv")
    assert "cannot read column 'uid'" in str(info.value) and "\n" not in str(info.value)
    assert cat.datasets() == {}
    row = cat.connect().execute("SELECT current_setting('disabled_optimizers')").fetchone()
    assert row is not None
    setting = row[0]
    assert "type_pushdown" not in setting  # switched off for registration only
    cat.close()
