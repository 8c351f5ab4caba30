"""The auditor's HTTP API (/v1/audit): filtered events, proofs, exports, privacy spend, verification."""

from __future__ import annotations

import csv
import io
import json

import pytest
from fastapi.testclient import TestClient

from audit.checkpoint import Checkpoint
from audit.keys import Keyring
from audit.log import AuditLog
from audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from audit.record import canonical
from gateway.client import BastionError, Client
from tests.conftest import Workspace

SQL = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex"


def _client(c: TestClient, workspace: Workspace, role: str = "auditor") -> Client:
    return Client("http://testserver", workspace.tokens[role], transport=c._transport)


@pytest.fixture
def busy(workspace: Workspace) -> Workspace:
    """A workspace whose log holds allowed, denied and cached queries by two analysts, and a checkpoint."""
    with workspace.app() as c:
        bastion = c.app.state.bastion
        bob = bastion.tokens.create("bob", "analyst")[0]
        analyst = workspace.headers("analyst")
        assert c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=analyst).status_code == 200
        assert c.post("/v1/query", json={"sql": SQL, "epsilon": 0.5}, headers=analyst).json()["cached"]
        assert (
            c.post("/v1/query", json={"sql": "SELECT MAX(age) FROM visits", "epsilon": 1}, headers=analyst).status_code
            == 400
        )
        bastion.audit_log.checkpoint()
        assert (
            c.post(
                "/v1/query",
                json={"sql": "SELECT COUNT(*) FROM visits", "epsilon": 0.25},
                headers={"Authorization": f"Bearer {bob}"},
            ).status_code
            == 200
        )
        assert (
            c.post(
                "/v1/query", json={"sql": "SELECT AVG(income) FROM visits", "epsilon": 1.0}, headers=analyst
            ).status_code
            == 200
        )
    workspace.tokens["bob"] = bob
    return workspace


def test_events_filters_and_paging(busy: Workspace) -> None:
    with busy.app() as c, _client(c, busy) as auditor:
        everything = auditor.audit_events(limit=10_000)
        assert [r["seq"] for r in everything] == list(range(len(everything)))
        alice = auditor.audit_events(actor="alice", event="query")
        assert alice and {r["actor"]["principal"] for r in alice} == {"alice"}
        assert {r["event"] for r in alice} == {"query"}
        denied = auditor.audit_events(actor="alice", decision="denied")
        assert [r["reason"] for r in denied] == ["min_max"]
        assert auditor.audit_events(dataset="visits", actor="bob")[0]["cost"]["epsilon"] == 0.25
        assert auditor.audit_events(dataset="no_such_dataset") == []
        middle = everything[len(everything) // 2]["time"]
        late = auditor.audit_events(since=middle, limit=10_000)
        early = auditor.audit_events(until=middle, limit=10_000)
        assert late[0]["time"] >= middle and all(r["time"] < middle for r in early)
        assert len(late) + len(early) >= len(everything)
        page = c.get("/v1/audit/events", params={"limit": 2, "offset": 1}, headers=busy.headers("auditor")).json()
        assert [r["seq"] for r in page["events"]] == [1, 2] and page["next_offset"] == 3
        bad = c.get("/v1/audit/events", params={"since": "yesterday"}, headers=busy.headers("auditor"))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
        # A filter is an exact match on a field, never a pattern or an expression.
        assert auditor.audit_events(actor="%") == [] and auditor.audit_events(actor='alice" OR 1=1') == []


def test_every_read_is_itself_recorded(busy: Workspace) -> None:
    with busy.app() as c, _client(c, busy) as auditor:
        auditor.audit_events(actor="alice")
        auditor.audit_verify()
        auditor.audit_spend()
    reads = [r for r in AuditLog(busy.settings.audit_dir).records() if r["event"] == "audit_read"]
    assert [(r["request"]["action"], r["decision"], r["actor"]["principal"]) for r in reads] == [
        ("events", "allowed", "otto"),
        ("verify", "allowed", "otto"),
        ("spend", "allowed", "otto"),
    ]
    assert reads[0]["request"]["actor"] == "alice" and reads[0]["request"]["limit"] == 100


def test_event_with_inclusion_proof(busy: Workspace) -> None:
    with busy.app() as c, _client(c, busy) as auditor:
        cp = Checkpoint.from_dict(auditor.audit_checkpoint())  # covers everything so far
        proved = auditor.audit_event(3)
        assert proved["seq"] == 3 and proved["included"] and proved["signed"]
        line = canonical(proved["record"])
        assert proved["leaf_hash"] == leaf_hash(line).hex()
        ck = proved["checkpoint"]
        assert ck["tree_size"] >= cp.tree_size
        assert verify_inclusion(
            leaf_hash(line),
            3,
            ck["tree_size"],
            [bytes.fromhex(h) for h in proved["proof"]],
            bytes.fromhex(ck["root_hash"]),
        )
        with pytest.raises(BastionError) as missing:
            auditor.audit_event(10**6)
        assert missing.value.status == 404


def test_export_jsonl_is_the_log_and_csv_is_spreadsheet_safe(busy: Workspace) -> None:
    with busy.app() as c, _client(c, busy) as auditor:
        c.post("/v1/query", json={"sql": "=cmd|' /C calc'!A0", "epsilon": 1}, headers=busy.headers("analyst"))
        jsonl = auditor.audit_export("jsonl")
        text = auditor.audit_export("csv", event="query")
        r = c.get("/v1/audit/export", params={"format": "csv"}, headers=busy.headers("auditor"))
        assert r.headers["content-type"].startswith("text/csv") and "attachment" in r.headers["content-disposition"]
        bad = c.get("/v1/audit/export", params={"format": "xml"}, headers=busy.headers("auditor"))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    lines = (busy.settings.audit_dir / "audit.jsonl").read_text().splitlines()
    exported = jsonl.splitlines()
    # After the export: the records of the CSV export, of the second CSV read and of the refused format.
    assert exported == lines[: len(exported)] and len(exported) >= len(lines) - 3
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and {row["event"] for row in rows} == {"query"}
    assert list(rows[0])[:3] == ["seq", "time", "event"]
    formula = [row for row in rows if "calc" in row.get("request.sql", "")]
    assert formula and formula[0]["request.sql"].startswith("'=")


def test_spend_per_principal_and_against_caps(busy: Workspace) -> None:
    with busy.app() as c, _client(c, busy) as auditor:
        spend = auditor.audit_spend()
        visits_only = auditor.audit_spend(dataset="visits", actor="alice")
        budget = c.get("/v1/budget", headers=busy.headers("analyst")).json()
    series = {(s["principal"], s["dataset"]): s["points"] for s in spend["series"]}
    alice = series[("alice", "visits")]
    # The cached repeat costs nothing; admitted and released records of one request count once.
    assert [p["epsilon"] for p in alice if p["epsilon"] > 0] == [0.5, 1.0]
    assert alice[-1]["cumulative_epsilon"] == pytest.approx(1.5)
    assert series[("bob", "visits")][-1]["cumulative_epsilon"] == pytest.approx(0.25)
    visits = spend["datasets"]["visits"]
    assert visits["epsilon"] == pytest.approx(1.75) and visits["cap_epsilon"] == 100.0
    assert visits["remaining_epsilon"] == pytest.approx(98.25) and not visits["over_cap"]
    assert visits["principals"]["alice"]["epsilon"] == pytest.approx(1.5)
    ledger = next(b for b in budget if b["dataset"] == "visits")
    assert ledger["spent"]["epsilon"] == pytest.approx(visits["principals"]["alice"]["epsilon"])
    assert "pums" in spend["datasets"] and spend["datasets"]["pums"]["epsilon"] == 0
    assert {s["principal"] for s in visits_only["series"]} == {"alice"}
    assert list(visits_only["datasets"]) == ["visits"]


def test_verify_checkpoints_and_consistency(busy: Workspace) -> None:
    with busy.app() as c, _client(c, busy) as auditor:
        status = auditor.audit_verify()
        assert status["ok"] and status["verdict"] == "OK" and status["status"] == "ok"
        first = auditor.audit_latest_checkpoint()
        assert first["signed"] and first["tree_size"] > 0
        c.post(
            "/v1/query", json={"sql": "SELECT COUNT(*) AS n FROM pums", "epsilon": 0.1}, headers=busy.headers("analyst")
        )
        second = auditor.audit_checkpoint()
        assert second["tree_size"] > first["tree_size"]
        assert auditor.audit_latest_checkpoint()["root_hash"] == second["root_hash"]
        proof = auditor.audit_consistency(first["tree_size"], second["tree_size"])
        default = auditor.audit_consistency(first["tree_size"])
        assert proof["proof"] == default["proof"]
        with pytest.raises(BastionError) as unknown:
            auditor.audit_consistency(first["tree_size"] + 1, second["tree_size"])
        assert unknown.value.status == 404
    assert verify_consistency(
        first["tree_size"],
        second["tree_size"],
        bytes.fromhex(first["root_hash"]),
        bytes.fromhex(second["root_hash"]),
        [bytes.fromhex(h) for h in proof["proof"]],
    )
    ring = Keyring.load(busy.settings.keys_dir)
    assert (
        Checkpoint.from_dict(
            {k: second[k] for k in ("schema_version", "tree_size", "root_hash", "time", "key_id", "signature")}
        ).problem(ring)
        is None
    )


def test_no_checkpoint_yet_is_404(workspace: Workspace) -> None:
    with workspace.app() as c:
        r = c.get("/v1/audit/checkpoints/latest", headers=workspace.headers("auditor"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_unauthenticated_reads_are_refused_and_recorded(workspace: Workspace) -> None:
    with workspace.app() as c:
        assert c.get("/v1/audit/events").status_code == 401
        assert c.get("/v1/audit/verify", headers={"Authorization": "Bearer bst_x_y"}).status_code == 401
        # The login cookie of the auditor page is not a credential for the API.
        c.cookies.set("bastion_audit", workspace.tokens["auditor"])
        assert c.get("/v1/audit/events").status_code == 401
    records = AuditLog(workspace.settings.audit_dir).records()
    denied = [r for r in records if r["event"] == "authentication"]
    # The first refusal of the source's window in full, the later ones counted when the window closes (here, at
    # shutdown).
    assert [r["request"]["path"] for r in denied[:1]] == ["/v1/audit/events"]
    assert [(r["reason"], r["count"], r["reasons"]) for r in denied[1:]] == [("aggregate", 2, {"unauthorized": 2})]
    assert not any(r["event"] == "audit_read" for r in records)
    assert all(workspace.tokens["auditor"] not in json.dumps(r) for r in records)
