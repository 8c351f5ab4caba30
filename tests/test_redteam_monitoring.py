"""Red-team pass of DP monitoring reports and LF sets that follow the data: each test is an attack that worked
before its fix (a second charge for one version, a status that depends on one unit's rows, ...), run on
neighbouring feeds or on a gateway whose log or ledger fails at the worst moment."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
from pathlib import Path
from typing import Any

import pytest

from audit.record import Event
from gateway.lfsets import _author_context, catch_up, store_of
from gateway.monitoring import PRINCIPAL, ReportStore, monitor_version
from gateway.service import Bastion
from policies.errors import AuditUnavailable
from tests.conftest import Workspace, build_workspace
from tests.lf.test_lf_sets import BODY, EPSILON, append, batch, feed_workspace


def test_an_lf_set_version_whose_release_record_fails_after_the_charge_is_not_charged_again(tmp_path: Path) -> None:
    """The log fails after the author was charged for a version (the release record cannot be written: 503, nothing
    released). The next catch-up must find that charge under the version's request id and keep the version as
    `interrupted`, not compute it again and charge the author a second time."""
    ws, _ = feed_workspace(tmp_path)
    with ws.app() as client:
        s = client.post("/v1/lf/sets", json=BODY, headers=ws.headers("lf_author")).json()
    v2 = append(ws, batch(tmp_path / "b1.csv", 10_000, 0.1))
    bastion = Bastion(ws.settings, read_only=True)
    real = bastion.audit
    failed: list[str] = []

    def audit(ctx: Any, event: str, **fields: Any) -> dict[str, Any]:
        if event == Event.LF_STATS and fields.get("phase") == "released" and not failed:
            failed.append(event)
            raise AuditUnavailable("the audit log cannot be written")
        return real(ctx, event, **fields)

    try:
        record = store_of(bastion).read(s["id"])
        assert record is not None
        ctx = _author_context(bastion, record, v2)
        assert ctx is not None
        bastion.audit = audit  # type: ignore[method-assign]
        with pytest.raises(AuditUnavailable):
            catch_up(bastion)
        assert failed
        bastion.audit = real  # type: ignore[method-assign]
        catch_up(bastion)  # the log is back
        charges = [c for c in bastion.ledger.history("feed") if c["request_id"] == ctx.request_id]
        spent = bastion.ledger.spent("lena", "feed").epsilon
        history = (store_of(bastion).read(s["id"]) or {})["history"]
    finally:
        bastion.close()
    assert len(charges) == 1  # once for the version, not once per try
    assert spent == pytest.approx(2 * EPSILON)  # the save and the one version
    assert [e["status"] for e in history] == ["computed", "interrupted"]
    assert history[-1]["version"] == v2 and history[-1]["epsilon_spent"] == EPSILON


MONITORED = """\
dataset: feed
privacy_unit: pid
max_rows_per_unit: 2
budget:
  per_principal: {epsilon: 5.0}
  total: {epsilon: 50.0}
columns:
  pid: {type: int, usage: hidden}
  region: {type: category, domain: [north, south]}
  income: {type: decimal, bounds: [0, 100]}
roles:
  analyst: [query]
monitoring: {epsilon: 1.0, cap: {epsilon: 5.0}, alert_rate: 0.05, bins: 2}
"""


def monitored_feed(tmp_path: Path) -> tuple[Workspace, Path, str]:
    """A monitored dataset with an appended batch whose version has no report yet (as after the append itself)."""
    (tmp_path / "feed.yaml").write_text(MONITORED)
    (tmp_path / "b0.csv").write_text("pid,region,income\n" + "".join(f"{i},north,{i % 100}\n" for i in range(200)))
    (tmp_path / "b1.csv").write_text("pid,region,income\n" + "".join(f"{i},south,{i % 90}\n" for i in range(300)))
    ws = build_workspace(tmp_path, [(tmp_path / "feed.yaml", tmp_path / "b0.csv")], {"analyst": "alice"})
    bastion = Bastion(ws.settings, read_only=True)
    try:
        version, added = bastion.engine.append("feed", tmp_path / "b1.csv")
        assert added
    finally:
        bastion.close()
    return ws, tmp_path / "b1.csv", version.version


def monitoring_charges(bastion: Bastion) -> list[dict[str, Any]]:
    return [c for c in bastion.ledger.history("feed") if c["principal"] == PRINCIPAL]


def test_a_report_whose_release_record_fails_after_the_charge_says_it_was_charged_and_is_not_charged_again(
    tmp_path: Path,
) -> None:
    """The log fails after the monitor was charged (503, nothing released). The version's report must not say
    `epsilon: 0` (nothing charged) when the ledger holds the charge, and rerunning the append (which makes the
    report of a version that has none) must not charge the version a second time."""
    ws, source, version = monitored_feed(tmp_path)
    bastion = Bastion(ws.settings, read_only=True)
    real = bastion.audit

    def audit(ctx: Any, event: str, **fields: Any) -> dict[str, Any]:
        if event == Event.MONITORING_REPORT and fields.get("phase") == "released":
            raise AuditUnavailable("the audit log cannot be written")
        return real(ctx, event, **fields)

    try:
        bastion.audit = audit  # type: ignore[method-assign]
        with contextlib.suppress(AuditUnavailable):
            first = monitor_version(bastion, "feed", version, source)
        bastion.audit = real  # type: ignore[method-assign]
        charged = monitoring_charges(bastion)
        assert len(charged) == 1  # charged before the log failed
        stored = ReportStore.of(ws.settings).get("feed", version)
        if stored is not None:  # a report stored for the version must say what it cost
            assert stored["epsilon"] == 1.0 and stored["status"] == "skipped" and "columns" not in stored
        again = monitor_version(bastion, "feed", version, source)  # the rerun of the append
        assert again is not None
        assert len(monitoring_charges(bastion)) == 1  # not charged twice for one version
        assert again["status"] == "skipped" and again["reason"] == "interrupted" and again["epsilon"] == 1.0
    finally:
        bastion.close()
    del first


def test_two_appends_of_one_batch_racing_charge_its_report_once(tmp_path: Path) -> None:
    """Two `bastion append` runs of the same file at once: the second finds the version added and, seeing no report
    yet, makes one too. The version's report must be charged once."""
    ws, source, version = monitored_feed(tmp_path)
    bastions = [Bastion(ws.settings, read_only=True) for _ in range(2)]
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            reports = list(pool.map(lambda b: monitor_version(b, "feed", version, source), bastions))
        charged = monitoring_charges(bastions[0])
    finally:
        for b in bastions:
            b.close()
    assert len(charged) == 1
    assert all(r is not None and r["status"] == "ok" for r in reports)
    assert reports[0] is not None and reports[1] is not None
    assert reports[0]["report_id"] == reports[1]["report_id"]  # one release, shown to both
