"""Dataset versions are public, so they are registration counters with a random suffix, never derived from data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest
import yaml

from gateway.engines.duckdb import DuckDBEngine
from policies.schema import Policy, parse_policy

POLICY = parse_policy(
    yaml.safe_load("""
dataset: ver
privacy_unit: uid
max_rows_per_unit: 2
budget: {per_principal: {epsilon: 1}, total: {epsilon: 5}}
columns:
  uid:   {type: int, usage: hidden}
  value: {type: int, bounds: [0, 100]}
roles: {analyst: [query]}
""")
)


def _serial(version: str) -> int:
    serial, suffix = version.split("-")
    assert len(suffix) == 8 and int(suffix, 16) >= 0
    return int(serial)


def _sources(root: Path) -> tuple[Path, Path]:
    a, b = root / "a.csv", root / "b.csv"
    a.write_text("uid,value\n1,10\n2,20\n3,30\n")
    b.write_text("uid,value\n1,11\n2,21\n3,31\n")
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    return a, b


def _data_hashes(paths: list[Path], policy: Policy) -> list[str]:
    out = []
    for path in paths:
        data = path.read_bytes()
        for digest in (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()):
            out += [digest, hashlib.sha256(f"{digest}/{policy.fingerprint()}".encode()).hexdigest()]
    return out


def test_versions_count_registrations_and_carry_no_hash_of_data(tmp_path: Path) -> None:
    a, b = _sources(tmp_path)
    cat = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    versions = [cat.register(POLICY, a), cat.register(POLICY, b), cat.register(POLICY, b)]
    assert [_serial(v) for v in versions] == [1, 2, 3]
    assert len(set(versions)) == 3  # the same file registered again gets a new version: not a function of the data
    hashes = _data_hashes([a, b], POLICY)
    assert not any(h[i : i + 8] in v for v in versions for h in hashes for i in range(0, len(h) - 7))
    assert cat.datasets()["ver"][1] == versions[-1] == cat.policy("ver")[1]
    other = parse_policy({**POLICY.model_dump(mode="json"), "dataset": "ver2"})
    assert _serial(cat.register(other, a)) == 1  # counted per dataset
    assert _serial(cat.register(POLICY, a)) == 4
    cat.close()
    fresh = DuckDBEngine(tmp_path / "fresh.duckdb", tmp_path / "key", read_only=False)
    again = fresh.register(POLICY, a)  # same key, file and policy as the first registration
    assert _serial(again) == 1 and again != versions[0]
    fresh.close()


def test_databases_from_before_serials_are_upgraded(tmp_path: Path) -> None:
    a, _ = _sources(tmp_path)
    con = duckdb.connect(str(tmp_path / "db.duckdb"))
    con.execute(
        "CREATE TABLE __bastion_datasets (name VARCHAR PRIMARY KEY, version VARCHAR, policy_json VARCHAR, "
        "source VARCHAR, registered_at TIMESTAMP)"
    )
    con.execute(
        "INSERT INTO __bastion_datasets VALUES ('ver', '0123456789abcdef', ?, 'x', now())",
        [POLICY.model_dump_json()],
    )
    con.close()
    cat = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    assert cat.policy("ver")[1] == "0123456789abcdef"
    assert _serial(cat.register(POLICY, a)) == 1
    assert _serial(cat.register(POLICY, a)) == 2
    cat.close()


@pytest.mark.parametrize("read_only", [True, False])
def test_version_survives_reopening(tmp_path: Path, read_only: bool) -> None:
    a, _ = _sources(tmp_path)
    cat = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=False)
    version = cat.register(POLICY, a)
    cat.close()
    reopened = DuckDBEngine(tmp_path / "db.duckdb", tmp_path / "key", read_only=read_only)
    assert reopened.policy("ver")[1] == version
    reopened.close()
