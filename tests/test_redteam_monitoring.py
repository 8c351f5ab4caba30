"""Red-team pass of DP monitoring reports and LF sets that follow the data: each test is an attack that worked
before its fix (a second charge for one version, a status that depends on one unit's rows, ...), run on
neighbouring feeds or on a gateway whose log or ledger fails at the worst moment."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from sqlglot import exp

from audit.record import Event
from gateway.engines.duckdb import bounded_table
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


WORST = """\
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
  day: {type: date, bounds: [2020-01-01, 2020-12-31]}
  flag: {type: bool}
roles:
  analyst: [query]
monitoring: {epsilon: 1.0, cap: {epsilon: 5.0}, alert_rate: 0.05, bins: 2}
"""
HEADER = "pid,region,income,day,flag\n"
CROWD = [
    f"{i},{('north', 'south')[i % 2]},{i % 100},2020-0{1 + i % 9}-1{i % 9},{('true', 'false')[i % 3 == 0]}\n"
    for i in range(300)
]
# Unit 7777: k rows in the registration, then rows of every bad kind in the batch (all beyond k: none kept).
# Unit 8888: only in the batch, 9 rows in three spellings of its id, outside / above / below / unreadable values.
U_REG = ["7777,north,10,2020-01-01,true\n"] * 2
U_BATCH = ["7777,west,1e9,1999-01-01,maybe\n", "7777,,x,,\n", "07777,south,nan,2031-02-02,1\n"] * 2
V_BATCH = [" 8888,west,1e9,2031-01-01,maybe\n", "8888,,-5,garbage,\n", "8888.0,north,inf,2020-06-01,0\n"] * 3


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_neighbouring_feeds_change_each_report_by_at_most_k_times_the_columns(tmp_path: Path, suffix: str) -> None:
    """Held: two feeds that differ in two units' rows (one at k from the registration whose batch rows are all
    dropped, one new in the batch with more than k rows in several id spellings and every kind of bad value). The
    exact counts (before noise) of each version differ by at most k × columns in L1 per differing unit, and every
    kept row (as the version's bounded table holds it) is counted once in each monitored column."""
    exact: dict[str, list[list[int]]] = {}
    for name, extra in (("with", True), ("without", False)):
        root = tmp_path / name
        root.mkdir()
        (root / "feed.yaml").write_text(WORST)
        files = []
        for i, lines in enumerate([CROWD + (U_REG if extra else []), CROWD + (U_BATCH + V_BATCH if extra else [])]):
            text = root / f"b{i}.csv"
            text.write_text(HEADER + "".join(lines))
            if suffix == "parquet":
                table = pa_csv.read_csv(text, convert_options=pa_csv.ConvertOptions(column_types=TEXT))
                pq.write_table(table, root / f"b{i}.parquet")
            files.append(root / f"b{i}.{suffix}")
        ws = build_workspace(root, [(root / "feed.yaml", files[0])], {"analyst": "alice"})
        bastion = Bastion(ws.settings, read_only=True)
        try:
            bastion.engine.append("feed", files[1])
            versions = bastion.engine.versions("feed")
            engine: Any = bastion.engine
            exact[name] = [engine.profile("feed", f, v.version, 2) for f, v in zip(files, versions, strict=True)]
            kept = [kept_rows(bastion, v) for v in versions]
        finally:
            bastion.close()
        columns = 4
        assert [sum(e) for e in exact[name]] == [columns * kept[0], columns * (kept[1] - kept[0])]
    k, columns = 2, 4
    registration, batch_ = (
        sum(abs(a - b) for a, b in zip(x, y, strict=True)) for x, y in zip(exact["with"], exact["without"], strict=True)
    )
    assert registration == k * columns  # unit 7777's two rows
    assert batch_ == k * columns  # unit 8888's two kept rows; 7777's batch rows are all dropped


TEXT = {c: pa.string() for c in ("pid", "region", "income", "day", "flag")}


def kept_rows(bastion: Bastion, version: Any) -> int:
    """The rows of `version`'s bounded table (all versions up to it)."""
    engine: Any = bastion.engine
    table = engine._table("feed", version, bounded_table("feed"))
    query = exp.select(exp.Count(this=exp.Star())).from_(table).sql(dialect="duckdb")
    ((count,),) = engine.connect().execute(query).fetchall()
    return int(count)


def test_on_a_dataset_with_periods_a_charged_report_is_still_found_and_not_charged_again(tmp_path: Path) -> None:
    """With periods the ledger keeps a charge under `dataset@period` keys. The version's charge must still be found
    (the log failed after it): the rerun keeps it `interrupted`, charged once in every period."""
    policy = MONITORED.replace("  income:", "  day: {type: date, bounds: [2020-01-01, 2020-03-31]}\n  income:")
    policy += "period: {column: day, every: month}\n"
    (tmp_path / "feed.yaml").write_text(policy)
    head = "pid,region,income,day\n"
    (tmp_path / "b0.csv").write_text(head + "".join(f"{i},north,{i % 100},2020-0{1 + i % 3}-15\n" for i in range(90)))
    (tmp_path / "b1.csv").write_text(head + "".join(f"{i},south,{i % 90},2020-0{1 + i % 3}-16\n" for i in range(90)))
    ws = build_workspace(tmp_path, [(tmp_path / "feed.yaml", tmp_path / "b0.csv")], {"analyst": "alice"})
    bastion = Bastion(ws.settings, read_only=True)
    real = bastion.audit

    def audit(ctx: Any, event: str, **fields: Any) -> dict[str, Any]:
        if event == Event.MONITORING_REPORT and fields.get("phase") == "released":
            raise AuditUnavailable("the audit log cannot be written")
        return real(ctx, event, **fields)

    try:
        version, _ = bastion.engine.append("feed", tmp_path / "b1.csv")
        bastion.audit = audit  # type: ignore[method-assign]
        first = monitor_version(bastion, "feed", version.version, tmp_path / "b1.csv")
        bastion.audit = real  # type: ignore[method-assign]
        again = monitor_version(bastion, "feed", version.version, tmp_path / "b1.csv")
        charged = [c for c in bastion.ledger.history() if c["principal"] == PRINCIPAL]
    finally:
        bastion.close()
    assert first is not None and first["status"] == "skipped" and first["reason"] == "interrupted"
    assert again == first
    assert sorted(str(c["dataset"]) for c in charged) == ["feed@2020-01", "feed@2020-02", "feed@2020-03"]


def test_on_a_dataset_with_periods_an_lf_set_version_charged_before_a_failure_is_not_charged_again(
    tmp_path: Path,
) -> None:
    """The LF-set twin: the author's charge of a version is found under the `dataset@period` keys."""
    policy = (
        "dataset: feed\nprivacy_unit: uid\nmax_rows_per_unit: 1\n"
        "budget: {per_principal: {epsilon: 1000}, total: {epsilon: 10000}}\n"
        "columns:\n  uid: {type: int, usage: hidden}\n  note: {type: text, usage: labeling}\n"
        "  day: {type: date, bounds: [2020-01-01, 2020-02-29]}\n"
        "roles: {lf_author: [labeling]}\nlabels: {classes: [x, y]}\nperiod: {column: day, every: month}\n"
    )
    (tmp_path / "feed.yaml").write_text(policy)
    rows = "".join(f"{i},{('aaa', 'bbb')[i % 2]},2020-0{1 + i % 2}-10\n" for i in range(200))
    (tmp_path / "b0.csv").write_text("uid,note,day\n" + rows)
    (tmp_path / "b1.csv").write_text("uid,note,day\n" + rows.replace("-10\n", "-11\n"))
    ws = build_workspace(tmp_path, [(tmp_path / "feed.yaml", tmp_path / "b0.csv")], {"lf_author": "lena"})
    with ws.app() as client:
        s = client.post("/v1/lf/sets", json=BODY, headers=ws.headers("lf_author")).json()
    assert "id" in s, s
    v2 = append(ws, tmp_path / "b1.csv")
    bastion = Bastion(ws.settings, read_only=True)
    real = bastion.audit

    def audit(ctx: Any, event: str, **fields: Any) -> dict[str, Any]:
        if event == Event.LF_STATS and fields.get("phase") == "released":
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
        bastion.audit = real  # type: ignore[method-assign]
        catch_up(bastion)
        charges = [c for c in bastion.ledger.history() if c["request_id"] == ctx.request_id]
        history = (store_of(bastion).read(s["id"]) or {})["history"]
    finally:
        bastion.close()
    assert sorted(str(c["dataset"]) for c in charges) == ["feed@2020-01", "feed@2020-02"]  # once per period
    assert [e["status"] for e in history] == ["computed", "interrupted"]
    assert history[-1]["epsilon_spent"] == EPSILON
