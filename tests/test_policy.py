"""Policy files: the demo and PUMS policies load; unsafe ones are refused with a message saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.demo import POLICY_YAML
from policies.schema import PolicyError, load_policy, parse_policy

BAD = sorted((Path(__file__).parent / "fixtures" / "policies").glob("*.yaml"))


def test_good_policies_load() -> None:
    visits = parse_policy(yaml.safe_load(POLICY_YAML))
    assert visits.unit_column == "patient_id" and visits.max_rows_per_unit == 10
    assert "ssn" not in visits.usable_columns() and "triage_note" not in visits.usable_columns()
    assert "triage_note" in visits.usable_columns(labeling=True)
    assert visits.columns["region"].key_domain() == ["north", "south", "east", "west", "central"]
    pums = load_policy(Path(__file__).parent / "data" / "pums.yaml")
    assert pums.unit_column == "pid"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_unsafe_policy_is_refused_with_reason(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert expected in str(info.value)
    assert path.name in str(info.value)


def test_text_and_category_columns_carry_a_public_max_length() -> None:
    visits = parse_policy(yaml.safe_load(POLICY_YAML))
    assert visits.columns["triage_note"].max_length == 2_000 and visits.columns["diagnosis"].max_length == 200
    assert visits.columns["age"].max_length is None
    schema = visits.public_schema()["columns"]
    assert schema["triage_note"]["max_length"] == 2_000 and schema["sex"]["max_length"] == 200
    assert "max_length" not in schema["age"] and "ssn" not in schema
    raw = yaml.safe_load(POLICY_YAML)
    raw["columns"]["triage_note"]["max_length"] = 500
    capped = parse_policy(raw)
    assert capped.columns["triage_note"].max_length == 500 and capped.fingerprint() != visits.fingerprint()
    assert parse_policy(capped.model_dump(mode="json")) == capped  # stored policies read back the same
