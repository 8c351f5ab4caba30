"""Consented debug access (`gateway.access`): no rows without consent, after expiry, beyond the row cap, for the
requester as approver, for another principal, or after a consent is revoked; every path audited; the request's
answer the same for units with and without consent; the auditor page lists the accesses (also in headless
Chromium against a real `bastion serve`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from audit.log import AuditLog
from gateway import access
from gateway.demo import DEMO_ACCESS_POLICY_YAML, write_access_demo
from gateway.service import Bastion
from gateway.settings import Settings
from policies.errors import Conflict, Forbidden
from policies.schema import PolicyError, load_policy, parse_policy
from tests.conftest import BIN, AppClient, Workspace, build_workspace, gateways
from tests.test_auditor_web import BROWSER_ARGS, CHROMIUM, _chromium_or_skip

N_ROWS = 3_000
PURPOSE = "ticket 8812: wrong triage"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    data, policy, _, consenting = write_access_demo(tmp_path_factory.mktemp("access"), n_rows=N_ROWS, seed=5)
    return data, policy, consenting


@pytest.fixture
def ws(tmp_path: Path, source: tuple[Path, Path, list[int]]) -> Workspace:
    data, policy, _ = source
    # The consent file is the test's own copy, so that tests may revoke consent in it.
    local = tmp_path / "src"
    local.mkdir()
    shutil.copy(policy.parent / "consent.csv", local / "consent.csv")
    shutil.copy(policy.parent / "diagnosis_chapters.csv", local / "diagnosis_chapters.csv")
    (local / "visits.yaml").write_text(policy.read_text())
    built = build_workspace(
        tmp_path, [(local / "visits.yaml", data)], {"analyst": "alice", "lf_author": "lena", "auditor": "otto"}
    )
    bastion = Bastion(built.settings, read_only=False)
    try:
        access.load_consent(bastion, load_policy(local / "visits.yaml"), base=local)
        built.tokens["bob"] = bastion.tokens.create("bob", "analyst")[0]
    finally:
        bastion.close()
    return built


@pytest.fixture
def units(source: tuple[Path, Path, list[int]]) -> dict[str, int]:
    """A patient with a valid consent, one whose consent has expired, one without consent, and one unknown."""
    data, _, consenting = source
    patients = sorted(set(pq.read_table(data, columns=["patient_id"])["patient_id"].to_pylist()))
    return {"consenting": consenting[0], "expired": patients[len(consenting)], "none": patients[-1], "unknown": 7}


def _records(ws: Workspace, *events: str) -> list[dict[str, Any]]:
    return [r for r in AuditLog(ws.settings.audit_dir).records() if r["event"] in events]


def _request(c: AppClient, ws: Workspace, units: Sequence[int | str], role: str = "analyst", **extra: Any) -> Any:
    body = {"dataset": "visits", "units": list(units), "purpose": PURPOSE, **extra}
    return c.post("/v1/access/requests", json=body, headers=ws.headers(role))


def _host(ws: Workspace, action: str, request_id: str, **kwargs: Any) -> Any:
    bastion = Bastion(ws.settings)
    try:
        return getattr(access, action)(bastion, request_id, **kwargs)
    finally:
        bastion.close()


def _rows_of(source: tuple[Path, Path, list[int]], unit: int) -> int:
    """The rows of `unit` the bounded table keeps: all its visits, at most max_rows_per_unit (10)."""
    data, _, _ = source
    ids = pq.read_table(data, columns=["patient_id"])["patient_id"].to_pylist()
    return min(ids.count(unit), 10)


def test_consent_needs_a_unit_column_and_declared_scopes() -> None:
    raw = yaml.safe_load(DEMO_ACCESS_POLICY_YAML)
    with pytest.raises(PolicyError, match="consent needs a privacy unit column"):
        parse_policy({**raw, "privacy_unit": "row", "max_rows_per_unit": 1})
    with pytest.raises(PolicyError, match="must be 1-64 letters"):
        parse_policy({**raw, "consent": {**raw["consent"], "scopes": ["two words"]}})
    policy = parse_policy(raw)
    assert policy.public_schema()["consent"] == {"scopes": ["triage_debugging"]}  # no source, no columns
    assert "source" not in str(policy.public_schema()["consent"])


def test_the_request_answer_is_the_same_with_and_without_consent(ws: Workspace, units: dict[str, int]) -> None:
    with ws.app() as c:
        answers = [_request(c, ws, [units[k]]) for k in ("consenting", "expired", "none", "unknown")]
    assert {a.status_code for a in answers} == {200}
    bodies = [a.json() for a in answers]
    varying = {"id", "units", "requested_at", "note"}
    shapes = [{k: v for k, v in b.items() if k not in varying} for b in bodies]
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0]["status"] == "pending" and shapes[0]["rows_left"] is None
    assert [b["units"] for b in bodies] == [[str(units[k])] for k in ("consenting", "expired", "none", "unknown")]
    assert all(b["note"].replace(b["id"], "ID") == bodies[0]["note"].replace(bodies[0]["id"], "ID") for b in bodies)
    records = _records(ws, "access_requested")
    assert [r["access_request"] for r in records] == [b["id"] for b in bodies]
    assert {r["decision"] for r in records} == {"allowed"} and records[0]["request"]["purpose"] == PURPOSE


def test_refusals_of_a_request_are_audited(ws: Workspace, units: dict[str, int]) -> None:
    with ws.app() as c:
        no_grant = _request(c, ws, [units["consenting"]], role="lf_author")
        bad_scope = _request(c, ws, [units["consenting"]], scope="marketing")
        bad_unit = _request(c, ws, ["not-a-number"])
    assert no_grant.status_code == 403 and no_grant.json()["error"]["code"] == "forbidden"
    assert bad_scope.status_code == 400 and "triage_debugging" in bad_scope.json()["error"]["message"]
    assert bad_unit.status_code == 400
    denied = [(r["actor"]["principal"], r["reason"]) for r in _records(ws, "access_requested")]
    assert denied == [("lena", "forbidden"), ("alice", "invalid_request"), ("alice", "invalid_request")]


def test_no_rows_before_approval_for_another_principal_or_for_the_requester_as_approver(
    ws: Workspace, units: dict[str, int]
) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
        pending = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
        assert pending.status_code == 403 and pending.json()["error"]["reason"] == "pending"
        with pytest.raises(Forbidden, match="approver must be someone else"):
            _host(ws, "approve", rid, rows=50, hours=1, approver="alice")
        assert c.get(f"/v1/access/requests/{rid}", headers=ws.headers("analyst")).json()["status"] == "pending"
        _host(ws, "approve", rid, rows=50, hours=1, approver="root")
        bob = {"Authorization": f"Bearer {ws.tokens['bob']}"}
        for path in (f"/v1/access/requests/{rid}", f"/v1/access/requests/{rid}/rows"):
            other = c.get(path, headers=bob)
            assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
        unknown = c.get("/v1/access/requests/acc_0000/rows", headers=ws.headers("analyst"))
        assert unknown.status_code == 404 and unknown.json() == other.json() | {
            "error": {**other.json()["error"], "message": unknown.json()["error"]["message"]}
        }
        mine = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
        assert mine.status_code == 200 and mine.json()["rows_released"] > 0
    reads = [(r["actor"]["principal"], r["decision"], r["reason"]) for r in _records(ws, "access_read")]
    assert reads == [
        ("alice", "denied", "pending"),
        ("bob", "denied", "not_found"),
        ("alice", "denied", "not_found"),
        ("alice", "allowed", "ok"),
    ]
    approvals = [(r["actor"]["principal"], r["decision"], r["reason"]) for r in _records(ws, "access_approved")]
    assert approvals == [("alice", "denied", "self_approval"), ("root", "allowed", "ok")]
    assert [(r["actor"]["principal"], r["decision"]) for r in _records(ws, "access_status")] == [
        ("alice", "allowed"),
        ("bob", "denied"),
    ]


def test_rows_only_of_consented_units_without_hidden_columns(
    ws: Workspace, units: dict[str, int], source: tuple[Path, Path, list[int]]
) -> None:
    asked = [units[k] for k in ("consenting", "expired", "none", "unknown")]
    with ws.app() as c:
        rid = _request(c, ws, asked).json()["id"]
        _host(ws, "approve", rid, rows=1_000, hours=1, approver="root")
        answer = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst")).json()
    assert answer["columns"][0] == "patient_id"
    assert not {"ssn", "visit_id"} & set(answer["columns"])  # hidden columns never
    assert {"triage_label", "triage_note", "age"} <= set(answer["columns"])  # labeling-only ones are released
    got = {row[0] for row in answer["rows"]}
    assert got == {units["consenting"]}
    expected = _rows_of(source, units["consenting"])
    assert answer["rows_released"] == len(answer["rows"]) == expected
    assert answer["rows_left"] == 1_000 - expected
    (read,) = [r for r in _records(ws, "access_read") if r["decision"] == "allowed"]
    assert read["rows_released"] == expected and read["access_request"] == rid
    assert "rows" not in read  # the record counts the rows, it never holds them


def test_the_row_cap_holds_over_all_reads(ws: Workspace, units: dict[str, int]) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
        _host(ws, "approve", rid, rows=3, hours=1, approver="root")
        first = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
        assert first.status_code == 200 and len(first.json()["rows"]) == 3 and first.json()["rows_left"] == 0
        second = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
        assert second.status_code == 403 and second.json()["error"]["reason"] == "row_cap"
        status = c.get(f"/v1/access/requests/{rid}", headers=ws.headers("analyst")).json()
    assert (status["max_rows"], status["rows_released"], status["rows_left"]) == (3, 3, 0)
    reads = [(r["decision"], r["reason"], r.get("rows_released")) for r in _records(ws, "access_read")]
    assert reads == [("allowed", "ok", 3), ("denied", "row_cap", None)]


def test_no_rows_after_expiry_and_the_expiry_is_recorded_once(ws: Workspace, units: dict[str, int]) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
        _host(ws, "approve", rid, rows=100, hours=1 / 3600, approver="root")  # one second
        time.sleep(1.2)
        for _ in range(2):
            late = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
            assert late.status_code == 403 and late.json()["error"]["reason"] == "expired"
        assert c.get(f"/v1/access/requests/{rid}", headers=ws.headers("analyst")).json()["status"] == "expired"
    (expired,) = _records(ws, "access_expired")
    assert expired["access_request"] == rid and expired["actor"]["principal"] == "alice"
    assert expired["rows_released"] == 0
    with pytest.raises(Conflict, match="is expired"):
        _host(ws, "revoke", rid, approver="root")


def test_a_revoked_consent_ends_access_at_the_next_read(ws: Workspace, units: dict[str, int]) -> None:
    consent = ws.settings.workspace.parent / "src" / "consent.csv"
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
        _host(ws, "approve", rid, rows=1_000, hours=1, approver="root")
        before = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst")).json()
        assert before["rows_released"] > 0
        table = pacsv.read_csv(consent, convert_options=pacsv.ConvertOptions(column_types={"expires_at": pa.string()}))
        kept = table.filter(pa.compute.not_equal(table["patient_id"], units["consenting"]))
        pacsv.write_csv(kept, consent)
        reload = subprocess.run(
            [str(BIN), "consent", "reload", "visits"],
            env={**os.environ, "BASTION_WORKSPACE": str(ws.settings.workspace)},
            capture_output=True,
            text=True,
            check=False,
        )  # while the gateway serves
        assert reload.returncode == 0, reload.stderr
        after = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
    assert after.status_code == 200 and after.json()["rows"] == [] and after.json()["rows_released"] == 0
    loaded = _records(ws, "consent_loaded")
    assert [r["reason"] for r in loaded] == ["ok", "ok"] and "rows" not in str(loaded[-1]["request"])
    assert [r.get("rows_released") for r in _records(ws, "access_read")] == [before["rows_released"], 0]


def test_denied_and_revoked_requests_give_no_rows(ws: Workspace, units: dict[str, int]) -> None:
    with ws.app() as c:
        denied = _request(c, ws, [units["consenting"]]).json()["id"]
        revoked = _request(c, ws, [units["consenting"]]).json()["id"]
        _host(ws, "deny", denied, approver="root")
        _host(ws, "approve", revoked, rows=10, hours=1, approver="root")
        _host(ws, "revoke", revoked, approver="root")
        for rid, reason in ((denied, "denied"), (revoked, "revoked")):
            r = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
            assert r.status_code == 403 and r.json()["error"]["reason"] == reason
    with pytest.raises(Conflict, match="is denied"):
        _host(ws, "approve", denied, rows=10, hours=1, approver="root")
    assert [r["access_request"] for r in _records(ws, "access_denied")] == [denied]
    assert [r["access_request"] for r in _records(ws, "access_revoked")] == [revoked]


@pytest.mark.parametrize("name", ["Alice", "ALICE", "alice\u200b", "\u0430lice", "\uff41\uff4c\uff49\uff43\uff45"])
def test_the_requester_cannot_approve_under_a_look_alike_name(ws: Workspace, units: dict[str, int], name: str) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
    with pytest.raises((Forbidden, access.AccessError)):
        _host(ws, "approve", rid, rows=5, hours=1, approver=name)
    with ws.app() as c:
        assert c.get(f"/v1/access/requests/{rid}", headers=ws.headers("analyst")).json()["status"] == "pending"
    assert not [r for r in _records(ws, "access_approved") if r["decision"] == "allowed"]


def _cli(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BASTION_WORKSPACE": str(ws.settings.workspace)}
    return subprocess.run([str(BIN), "access", *args], env=env, capture_output=True, text=True, check=False)


def test_host_commands_refuse_the_requester_and_record_the_approver(ws: Workspace, units: dict[str, int]) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
    self_approval = _cli(ws, "approve", rid, "--rows", "5", "--hours", "1", "--as", "alice")
    assert self_approval.returncode != 0 and "approver must be someone else" in self_approval.stderr
    ok = _cli(ws, "approve", rid, "--rows", "5", "--hours", "2", "--as", "carol")
    assert ok.returncode == 0, ok.stderr
    listed = _cli(ws, "list", "--json")
    assert '"approver": "carol"' in listed.stdout and '"status": "approved"' in listed.stdout
    (approved,) = [r for r in _records(ws, "access_approved") if r["decision"] == "allowed"]
    assert approved["actor"] == {"principal": "carol", "role": "admin", "token_id": None}
    assert approved["request"]["max_rows"] == 5 and approved["request"]["requester"] == "alice"


def test_the_host_listing_shows_control_characters_of_a_purpose_as_escapes(
    ws: Workspace, units: dict[str, int]
) -> None:
    # A requester's purpose must not drive the approver's terminal: clear it, recolour it, rewrite a line (\r) or
    # reorder it (a bidi override).
    purpose = "ticket 1 \x1b[2J\x1b]52;c;cm0gLXJm\x07\x9b31m\rapproved by root\u202e"
    with ws.app() as c:
        assert _request(c, ws, [units["consenting"]], purpose=purpose).status_code == 200
    listed = _cli(ws, "list")
    assert listed.returncode == 0, listed.stderr
    assert not {"\x1b", "\x07", "\x9b", "\r", "\u202e"} & set(listed.stdout)
    assert "\\x1b[2J" in listed.stdout and "\\u202e" in listed.stdout


def test_the_default_approver_is_the_os_account_not_the_user_environment_variable(
    ws: Workspace, units: dict[str, int]
) -> None:
    import pwd

    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
    env = {**os.environ, "BASTION_WORKSPACE": str(ws.settings.workspace), "USER": "carol", "LOGNAME": "carol"}
    done = subprocess.run(
        [str(BIN), "access", "approve", rid, "--rows", "5", "--hours", "1"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (approved,) = [r for r in _records(ws, "access_approved") if r["decision"] == "allowed"]
    assert approved["actor"]["principal"] == pwd.getpwuid(os.getuid()).pw_name != "carol"


def _access_row(html: str) -> str:
    found = re.search(r'<tr class="access" data-request="[^"]+">(.*?)</tr>', html, re.S)
    assert found is not None
    return found.group(1)


def test_the_auditor_page_lists_accesses(ws: Workspace, units: dict[str, int]) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"], units["none"]]).json()["id"]
        _host(ws, "approve", rid, rows=4, hours=1, approver="root")
        c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))
        c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst"))  # refused: the cap is used up
        page = c.get("/audit", headers=ws.headers("auditor")).text
        filtered = c.get("/v1/audit/events", params={"event": "access_read"}, headers=ws.headers("auditor"))
        listed = c.get("/v1/audit/access", headers=ws.headers("auditor"))
        refused = c.get("/v1/audit/access", headers=ws.headers("analyst"))
    row = _access_row(page)
    for cell in (rid, "alice", PURPOSE, "triage_debugging", "approved", "root"):
        assert cell in row
    assert re.search(r'class="num rows-released"[^>]*>4<', row)
    assert "1 reads" in row
    assert filtered.status_code == 200 and len(filtered.json()["events"]) == 2
    (summary,) = listed.json()
    assert (summary["access_request"], summary["requester"], summary["approver"]) == (rid, "alice", "root")
    assert (summary["purpose"], summary["rows_released"], summary["reads"], summary["refused_reads"]) == (
        PURPOSE,
        4,
        1,
        1,
    )
    assert refused.status_code == 403


def test_the_auditor_summary_tells_another_principals_probe_from_the_requesters_refused_read(
    ws: Workspace, units: dict[str, int]
) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
        bob = {"Authorization": f"Bearer {ws.tokens['bob']}"}
        assert c.get(f"/v1/access/requests/{rid}/rows", headers=bob).status_code == 404
        assert c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst")).status_code == 403  # pending
        (summary,) = c.get("/v1/audit/access", headers=ws.headers("auditor")).json()
    assert summary["refused_reads"] == 1  # alice's own, refused as pending
    assert summary["refusals"] == ["access_read by bob: not_found"]


@pytest.fixture
def server(ws: Workspace) -> Iterator[str]:
    with gateways(1, "--workspace", str(ws.settings.workspace)) as (url,):
        yield url


@pytest.mark.slow
def test_the_auditor_page_lists_accesses_in_headless_chromium(
    ws: Workspace, units: dict[str, int], server: str, tmp_path: Path
) -> None:
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    alice = {"Authorization": f"Bearer {ws.tokens['analyst']}"}
    body = {"dataset": "visits", "units": [units["consenting"]], "purpose": PURPOSE}
    rid = httpx.post(f"{server}/v1/access/requests", json=body, headers=alice, timeout=60).json()["id"]
    approved = _cli(ws, "approve", rid, "--rows", "3", "--hours", "1", "--as", "carol")  # while the gateway serves
    assert approved.returncode == 0, approved.stderr
    rows = httpx.get(f"{server}/v1/access/requests/{rid}/rows", headers=alice, timeout=60).json()
    assert rows["rows_released"] == 3
    shot = Path(os.environ.get("BASTION_ACCESS_SCREENSHOT", tmp_path / "access.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")), args=BROWSER_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"{server}/audit")
            page.fill("#token", ws.tokens["auditor"])
            page.click("#sign-in")
            page.wait_for_selector("#access-table")
            row = page.locator(f'#access-table tr.access[data-request="{rid}"]')
            assert row.count() == 1
            assert row.locator("td.requester").inner_text() == "alice"
            assert row.locator("td.approver").inner_text() == "carol"
            assert row.locator("td.purpose").inner_text() == PURPOSE
            assert row.locator("td.rows-released").inner_text() == "3"
            page.locator("#access").screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 5_000


def test_registration_loads_consent_and_refuses_a_bad_consent_source_first(
    tmp_path: Path, source: tuple[Path, Path, list[int]]
) -> None:
    data, policy, consenting = source
    local = tmp_path / "src"
    local.mkdir()
    shutil.copy(policy.parent / "diagnosis_chapters.csv", local / "diagnosis_chapters.csv")
    (local / "visits.yaml").write_text(policy.read_text())
    pacsv.write_csv(pa.table({"patient_id": [1], "scope": ["triage_debugging"]}), local / "consent.csv")  # no expiry
    env = {**os.environ, "BASTION_WORKSPACE": str(tmp_path / "ws")}

    def register() -> subprocess.CompletedProcess[str]:
        args = [str(BIN), "register", str(local / "visits.yaml"), "--source", str(data)]
        return subprocess.run(args, env=env, capture_output=True, text=True, check=False)

    refused = register()
    assert refused.returncode == 1 and "expires_at" in refused.stderr
    assert not (tmp_path / "ws" / "private" / "private.duckdb").exists()  # nothing registered
    shutil.copy(policy.parent / "consent.csv", local / "consent.csv")
    done = register()
    assert done.returncode == 0, done.stderr
    ws = Workspace(Settings.load(tmp_path / "ws"), {})
    (loaded,) = _records(ws, "consent_loaded")
    assert loaded["request"]["source"] == str((local / "consent.csv").resolve())
    bastion = Bastion(ws.settings)
    try:
        now = access._now()
        assert access.consented_units(bastion, "visits", "triage_debugging", [str(u) for u in consenting], now) == [
            str(u) for u in consenting
        ]
    finally:
        bastion.close()


def test_concurrent_reads_never_release_more_than_the_cap(ws: Workspace, units: dict[str, int]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gateway.service import Context
    from gateway.stores.tokens import Principal

    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
    _host(ws, "approve", rid, rows=3, hours=1, approver="root")
    bastion = Bastion(ws.settings)
    try:
        alice = bastion.authenticate(ws.tokens["analyst"])
        assert isinstance(alice, Principal)

        def read(_: int) -> int:
            try:
                return len(access.read_rows(bastion, Context(alice), rid)["rows"])
            except access.AccessClosed:
                return 0

        with ThreadPoolExecutor(4) as pool:
            released = list(pool.map(read, range(8)))
    finally:
        bastion.close()
    assert sum(released) == 3
    reads = _records(ws, "access_read")
    assert sum(r.get("rows_released", 0) for r in reads) == 3 and len(reads) == 8


def test_a_name_given_to_a_new_owner_does_not_inherit_its_grants(ws: Workspace, units: dict[str, int]) -> None:
    """alice's tokens are revoked and the name is given to someone else (`token create` of a name with no token in
    use): her approved and pending requests end then (audited `access_revoked`, reason `new_owner`), so the new
    alice reads nothing; another token of a name in use (`--add`) ends nothing."""
    from gateway.cli.main import _issue_token

    with ws.app() as c:
        approved = _request(c, ws, [units["consenting"]]).json()["id"]
        pending = _request(c, ws, [units["consenting"]]).json()["id"]
        _host(ws, "approve", approved, rows=10, hours=1, approver="root")
        bastion = Bastion(ws.settings)
        try:
            extra = _issue_token(bastion, "alice", "analyst", add=True)  # the same owner: nothing ends
            assert c.get(
                f"/v1/access/requests/{approved}/rows", headers={"Authorization": f"Bearer {extra}"}
            ).is_success
            for record in bastion.tokens.list():
                if record.name == "alice" and record.revoked is None:
                    bastion.tokens.revoke(record.token_id)
            new_owner = _issue_token(bastion, "alice", "analyst")
        finally:
            bastion.close()
        headers = {"Authorization": f"Bearer {new_owner}"}
        for rid in (approved, pending):
            r = c.get(f"/v1/access/requests/{rid}/rows", headers=headers)
            assert r.status_code == 403 and r.json()["error"]["reason"] == "revoked"
    ended = [(r["access_request"], r["reason"]) for r in _records(ws, "access_revoked")]
    assert sorted(ended) == sorted([(approved, "new_owner"), (pending, "new_owner")])


def test_a_read_after_an_append_reads_one_version_and_its_record_names_it(
    ws: Workspace, units: dict[str, int], source: tuple[Path, Path, list[int]], tmp_path: Path
) -> None:
    """Consented rows are read at one version, the latest when the read is admitted, and the read's record says
    which (as every other access's record does)."""
    data, _, _ = source
    table = pq.read_table(data).slice(0, 20)
    table = table.set_column(table.schema.get_field_index("visit_id"), "visit_id", pa.array(range(10**9, 10**9 + 20)))
    batch = tmp_path / "batch.parquet"
    pq.write_table(table, batch)
    with ws.app() as c:
        bastion: Bastion = c.app.state.bastion
        first = bastion.engine.policy("visits")[1]
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
        _host(ws, "approve", rid, rows=1_000, hours=1, approver="root")
        before = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst")).json()
        appended, added = bastion.engine.append("visits", batch)
        assert added
        after = c.get(f"/v1/access/requests/{rid}/rows", headers=ws.headers("analyst")).json()
    assert before["rows"] and all(r in after["rows"] for r in before["rows"])  # rows kept stay kept
    reads = [r for r in _records(ws, "access_read") if r["decision"] == "allowed"]
    assert [r["version"] for r in reads] == [first, appended.version]
