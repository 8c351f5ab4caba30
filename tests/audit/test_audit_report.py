"""Auditor queries: filters, one event with its inclusion proof, exports, and the privacy-spend report."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from audit.checkpoint import Checkpoint
from audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from audit.report import (
    consistency_proof,
    get_event,
    privacy_spend,
    query_events,
    read_records,
    to_csv,
    to_jsonl,
)


@pytest.fixture
def busy(new_log, make_event):
    log = new_log(checkpoint_every=10)
    events = []
    for i in range(8):  # alice: admitted + released for each request, 0.25 each
        events.append(make_event(i, epsilon=0.25, delta=1e-7, phase="admitted"))
        events.append(make_event(i, epsilon=0.25, delta=1e-7, phase="released"))
    events += [make_event(100 + i, principal="bob", dataset="claims", epsilon=0.5) for i in range(3)]
    events += [make_event(200, principal="bob", decision="denied", epsilon=1.0)]
    events += [{"event": "login", "actor": {"principal": "carol", "role": "auditor"}, "decision": "allowed"}]
    for event in events:
        log.append(event)
    log.close()
    return log


def test_query_filters(busy) -> None:
    d = busy.directory
    assert len(query_events(d)) == 21
    assert {r["actor"]["principal"] for r in query_events(d, actor="bob")} == {"bob"}
    assert len(query_events(d, actor="bob")) == 4
    assert len(query_events(d, dataset="claims")) == 3
    assert len(query_events(d, decision="denied")) == 1
    assert [r["event"] for r in query_events(d, event="login")] == ["login"]
    assert len(query_events(d, actor="alice", dataset="visits", decision="allowed")) == 16
    page = query_events(d, actor="alice", offset=4, limit=3)
    assert [r["seq"] for r in page] == [4, 5, 6]
    records = query_events(d)
    middle = records[10]["time"]
    assert all(r["time"] >= middle for r in query_events(d, since=middle))
    assert all(r["time"] < middle for r in query_events(d, until=middle))
    assert len(query_events(d, since=middle)) + len(query_events(d, until=middle)) == 21
    assert query_events(d, actor="nobody") == []


def test_get_event_comes_with_a_verifiable_inclusion_proof(busy) -> None:
    lines = busy.path.read_bytes().split(b"\n")[:-1]
    proof = get_event(busy.directory, 7)
    assert proof.record == json.loads(lines[7]) and proof.signed and proof.included
    cp = proof.checkpoint
    assert cp is not None and cp.tree_size == 21
    assert proof.proof is not None
    assert verify_inclusion(
        leaf_hash(lines[7]), 7, cp.tree_size, [bytes.fromhex(p) for p in proof.proof], bytes.fromhex(cp.root_hash)
    )
    assert not verify_inclusion(
        leaf_hash(lines[8]), 7, cp.tree_size, [bytes.fromhex(p) for p in proof.proof], bytes.fromhex(cp.root_hash)
    )
    json.dumps(proof.to_dict())
    with pytest.raises(LookupError):
        get_event(busy.directory, 21)


def test_get_event_newer_than_the_latest_checkpoint_has_no_proof_yet(busy, make_event) -> None:
    busy.append(make_event(999))
    proof = get_event(busy.directory, 21)
    assert proof.proof is None and not proof.included
    assert proof.checkpoint is not None and proof.checkpoint.tree_size == 21


def test_consistency_proof_between_checkpoints(busy) -> None:
    cps = [Checkpoint.from_dict(json.loads(x)) for x in busy.checkpoints_path.read_bytes().splitlines()]
    old, new = cps[0], cps[-1]
    proof = [bytes.fromhex(p) for p in consistency_proof(busy.directory, old)]
    assert verify_consistency(old.tree_size, new.tree_size, old.root, new.root, proof)
    forged = Checkpoint(old.tree_size, "00" * 32, old.time, old.key_id, old.signature)
    with pytest.raises(ValueError):
        consistency_proof(busy.directory, forged)


def test_jsonl_export_round_trips(busy) -> None:
    records = list(read_records(busy.directory))
    text = to_jsonl(records)
    assert [json.loads(x) for x in text.splitlines()] == records
    assert text.encode() == busy.path.read_bytes()  # the export is byte-identical to the canonical log


def test_csv_export_flattens_and_defuses_formulas(make_event) -> None:
    evil = make_event(1)
    evil["request"]["sql"] = '=HYPERLINK("http://x")'
    records = [{"seq": 0, "time": "t", **make_event(0)}, {"seq": 1, "time": "t", **evil, "extra": [1, 2]}]
    rows = list(csv.DictReader(io.StringIO(to_csv(records))))
    assert rows[0]["actor.principal"] == "alice" and rows[0]["cost.epsilon"] == "0.1"
    assert rows[1]["request.sql"].startswith("'=")
    assert rows[1]["extra"] == "[1,2]" and rows[0]["extra"] == ""
    assert rows[0]["release_digest"] == ""
    header = to_csv(records).splitlines()[0].split(",")
    assert header[:3] == ["seq", "time", "event"]
    raw = list(csv.DictReader(io.StringIO(to_csv(records, spreadsheet_safe=False))))
    assert raw[1]["request.sql"].startswith("=")


def test_privacy_spend_per_principal_and_dataset(busy) -> None:
    caps: dict[str, dict[str, Any]] = {
        "visits": {"epsilon": 1.5, "delta": 1e-5, "per_principal": {"epsilon": 1.0, "delta": 1e-6}},
        "claims": {"epsilon": 20.0, "delta": 1e-5},
    }
    report = privacy_spend(busy.directory, caps)
    alice = report.series[("alice", "visits")]
    # each request is charged once even though it has an admitted and a released record
    assert len(alice) == 8 and report.charges == 11
    assert [round(p.cumulative_epsilon, 12) for p in alice] == [0.25 * k for k in range(1, 9)]
    assert alice[-1].cumulative_delta == pytest.approx(8e-7)
    assert [p.seq for p in alice] == [0, 2, 4, 6, 8, 10, 12, 14]
    bob = report.series[("bob", "claims")]
    assert [p.cumulative_epsilon for p in bob] == [0.5, 1.0, 1.5]
    assert ("bob", "visits") not in report.series  # denied requests spend nothing
    visits, claims = report.datasets["visits"], report.datasets["claims"]
    assert visits.epsilon == pytest.approx(2.0) and visits.remaining_epsilon == pytest.approx(-0.5)
    assert visits.over_cap and visits.principals_over_cap == ["alice"]
    assert claims.epsilon == pytest.approx(1.5) and claims.remaining_epsilon == pytest.approx(18.5)
    assert not claims.over_cap
    json.dumps(report.to_dict())


def _allowed(i: int, epsilon: float, delta: float = 0.0) -> dict[str, Any]:
    """An allowed record of principal "a" on dataset "d", second `i` of a minute, with the given cost."""
    return {
        "seq": i,
        "time": f"2025-01-01T00:00:{i:02d}.000000Z",
        "event": "query",
        "decision": "allowed",
        "actor": {"principal": "a"},
        "dataset": "d",
        "request_id": str(i),
        "cost": {"epsilon": epsilon, "delta": delta},
    }


def test_privacy_spend_of_exactly_the_cap_is_not_over_it() -> None:
    records = [_allowed(i, 0.1) for i in range(30)]
    report = privacy_spend(records, {"d": {"epsilon": 3.0}})
    assert not report.datasets["d"].over_cap
    since = privacy_spend(records, since="2025-01-01T00:00:10Z")
    assert since.charges == 20


def test_privacy_spend_counts_only_records_that_spent_something() -> None:
    # two charges, then cached answers and dry runs (allowed, cost 0), and a δ-only charge
    records = [_allowed(0, 0.5), _allowed(1, 0.25), *(_allowed(i, 0.0) for i in range(2, 20)), _allowed(20, 0.0, 1e-6)]
    report = privacy_spend(records)
    assert report.charges == 3
    assert report.datasets["d"].epsilon == pytest.approx(0.75) and report.datasets["d"].delta == pytest.approx(1e-6)
    assert [p.seq for p in report.series[("a", "d")]] == [0, 1, 20]
