"""DP data monitoring: one report per dataset version, made when the version is registered or appended.

A report counts, in the batch's rows as the version keeps them (after per-unit bounding), the cells of every
monitored column (gateway.engines.monitor): the values that were missing, clamped at the lower or upper bound or
outside the declared domain (decided on the source value, before conversion), and each column's histogram (domain
values, or equal bins over the bounds). The whole count vector is one discrete-Laplace release (OpenDP) of L1
sensitivity k × (monitored columns), charged before it runs to the reserved principal `bastion:monitoring`, whose
per-principal cap is the policy's `monitoring.cap` and whose spend counts against the dataset's total budget.

Alerts are post-processing of the release and of the previous report's (its baseline, the newest earlier version
with a report): a share of flagged values, or a bin's share of the valid values, that changed by more than sampling
and noise explain. Each of a report's m tests is run at level alert_rate / m (Bonferroni), and each test's
threshold adds a normal bound on the sampling difference (rows taken as independent) to a bound on the difference
of the two noises (OpenDP's discrete-Laplace accuracy, split between the two reports): so on an unchanged feed a
report raises any alert with probability at most about `alert_rate` (the noisy denominators are taken as exact).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from audit.record import Event
from gateway.engines.monitor import CellKind, Monitored, monitored
from gateway.engines.versions import now
from policies.accountant import PrivacyLoss
from policies.errors import GatewayError, NotFound
from policies.mechanisms import integer_accuracy, release_integers
from policies.schema import Budgets, Policy

if TYPE_CHECKING:
    from gateway.service import Bastion
    from gateway.settings import Settings

PRINCIPAL = "bastion:monitoring"  # reserved: no token can take a name with a colon
ROLE = "monitoring"
ALPHA = 0.05  # the intervals shown with every share (95%)
_NAMESPACE = uuid.UUID("0b6f4c2e-7d3a-4e51-9a8c-5f2e1d0c3b4a")  # of the request id a version's report is charged under


class ReportNotFound(NotFound):
    code = "report_not_found"


@dataclass(frozen=True)
class ReportStore:
    """Reports as JSON files, `<root>/<dataset>/<version>.json`, written aside and renamed (never half written)."""

    root: Path

    @classmethod
    def of(cls, settings: Settings) -> ReportStore:
        base = settings.shared_dir if settings.shared_dir is not None else settings.workspace
        return cls(base / "monitoring")

    def path(self, dataset: str, version: str) -> Path:
        return self.root / dataset / f"{version}.json"

    def get(self, dataset: str, version: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.path(dataset, version).read_text())
        except FileNotFoundError:
            return None
        return data

    @contextlib.contextmanager
    def locked(self, dataset: str, version: str) -> Iterator[None]:
        """Exclusive, across processes and threads (`flock` on a lock file of its own, released by the kernel if
        the process dies): one report of a version is made at a time."""
        folder = self.root / dataset
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(folder / f".{version}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def put(self, report: dict[str, Any]) -> None:
        path = self.path(report["dataset"], report["version"])
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        aside = path.with_name(f".{path.name}.{os.getpid()}")
        aside.write_text(json.dumps(report, indent=1))
        os.replace(aside, path)


def sensitivity(policy: Policy, columns: list[Monitored]) -> int:
    """L1 sensitivity of the count vector: a unit's at most k kept rows, each in one cell of every column."""
    return policy.max_rows_per_unit * len(columns)


def noise_variance(scale: float) -> float:
    """Variance of OpenDP's discrete Laplace at `scale` (P(x) ∝ exp(-|x| / scale))."""
    q = math.exp(-1.0 / scale)
    return 2.0 * q / (1.0 - q) ** 2


def _pct(x: float) -> str:
    value = 100.0 * x
    return f"{value:.0f}%" if abs(value) >= 10 or value == 0 else f"{value:.1f}%"


def _cells(m: Monitored, counts: list[int], scale: float) -> dict[str, Any]:
    """One column of a report: its cells' noisy counts, shares of the column's rows and 95% half-widths."""
    rows = max(1, sum(max(c, 0) for c in counts))
    valid = max(1, sum(max(counts[i], 0) for i in m.distribution))
    half = integer_accuracy(scale, ALPHA)
    cells = []
    for i, (cell, count) in enumerate(zip(m.cells, counts, strict=True)):
        base = valid if i in m.distribution else rows
        cells.append(
            {
                "kind": cell.kind.value,
                "label": cell.label,
                "count": count,
                "share": max(count, 0) / base,
                "half_width": half / base,
                "of": "valid" if i in m.distribution else "rows",
            }
        )
    return {"name": m.name, "type": m.column.type.value, "rows": rows, "valid": valid, "cells": cells}


def _differs(c1: int, n1: int, s1: float, c0: int, n0: int, s0: float, level: float) -> tuple[bool, float]:
    """Whether c1/n1 and c0/n0 differ beyond what sampling and noise explain at `level` (two-sided), and the
    standardised size of the difference."""
    p1, p0 = max(c1, 0) / n1, max(c0, 0) / n0
    pooled = min(1.0, max(0.0, (max(c1, 0) + max(c0, 0)) / (n1 + n0)))
    sampling = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    z = NormalDist().inv_cdf(1 - level / 4)
    noise = integer_accuracy(s1, level / 4) / n1 + integer_accuracy(s0, level / 4) / n0
    threshold = z * sampling + noise
    return abs(p1 - p0) > threshold, abs(p1 - p0) / threshold if threshold > 0 else math.inf


def _flag_message(name: str, kind: CellKind, label: str, now_: str, was: str) -> str:
    what = {
        CellKind.MISSING: "were missing",
        CellKind.BELOW: f"were clamped at the lower bound {label}",
        CellKind.ABOVE: f"were clamped at the upper bound {label}",
        CellKind.OUTSIDE: "were outside the declared domain",
    }[kind]
    return f"{now_} of {name} values {what} (was {was})"


def assess(report: dict[str, Any], baseline: dict[str, Any] | None, alert_rate: float) -> tuple[int, list[dict]]:
    """The number of tests and the alerts of `report` against `baseline` (both released reports)."""
    if baseline is None:
        return 0, []
    before = {c["name"]: c for c in baseline["columns"]}
    pairs = [(c, before[c["name"]]) for c in report["columns"] if c["name"] in before]
    pairs = [(c, b) for c, b in pairs if [x["label"] for x in c["cells"]] == [x["label"] for x in b["cells"]]]
    tests = sum(
        sum(1 for x in c["cells"] if CellKind(x["kind"]).flag or x["of"] == "valid" and _several(c)) for c, _ in pairs
    )
    if tests == 0:
        return 0, []
    level = alert_rate / tests
    s1, s0 = report["scale"], baseline["scale"]
    alerts: list[dict[str, Any]] = []
    for col, old in pairs:
        name = col["name"]
        worst: tuple[float, int] | None = None
        for i, (x, y) in enumerate(zip(col["cells"], old["cells"], strict=True)):
            kind = CellKind(x["kind"])
            if kind.flag:
                hit, _ = _differs(x["count"], col["rows"], s1, y["count"], old["rows"], s0, level)
                if hit:
                    alerts.append(
                        {
                            "column": name,
                            "kind": kind.value,
                            "cell": x["label"],
                            "share": x["share"],
                            "was": y["share"],
                            "message": _flag_message(
                                name,
                                kind,
                                x["label"],
                                f"{_pct(x['share'])} ± {_pct(x['half_width'])}",
                                f"{_pct(y['share'])} ± {_pct(y['half_width'])}",
                            ),
                        }
                    )
            elif x["of"] == "valid" and _several(col):
                hit, size = _differs(x["count"], col["valid"], s1, y["count"], old["valid"], s0, level)
                if hit and (worst is None or size > worst[0]):
                    worst = (size, i)
        if worst is not None:
            alerts.append(_drift(col, old, worst[1]))
    return tests, alerts


def _several(col: dict[str, Any]) -> bool:
    return sum(1 for x in col["cells"] if x["of"] == "valid") > 1


def _drift(col: dict[str, Any], old: dict[str, Any], i: int) -> dict[str, Any]:
    """The drift alert of a column, worded by its most changed cell (or by a new most frequent value)."""
    x, y = col["cells"][i], old["cells"][i]
    valid = [j for j, c in enumerate(col["cells"]) if c["of"] == "valid"]
    top = max(valid, key=lambda j: col["cells"][j]["share"])
    top_before = max(valid, key=lambda j: old["cells"][j]["share"])
    name = col["name"]
    if top != top_before and x["kind"] == CellKind.VALUE.value:
        x, y = col["cells"][top], old["cells"][top]
        text = f"{name}: {x['label']} is now the most frequent value"
    else:
        direction = "rose" if x["share"] > y["share"] else "fell"
        where = f"values in {x['label']}" if x["kind"] == CellKind.BIN.value else x["label"]
        text = f"{name}: {where} {direction} to"
    now_, was = f"{_pct(x['share'])} ± {_pct(x['half_width'])}", f"{_pct(y['share'])} ± {_pct(y['half_width'])}"
    message = f"{text} ({now_}, was {was})" if "most frequent" in text else f"{text} {now_} of values (was {was})"
    return {
        "column": name,
        "kind": "drift",
        "cell": x["label"],
        "share": x["share"],
        "was": y["share"],
        "message": message,
    }


def build_report(
    policy: Policy,
    version: str,
    counts: list[int],
    *,
    scale: float,
    baseline: dict[str, Any] | None,
    report_id: str,
) -> dict[str, Any]:
    """A report from released counts (post-processing only: nothing here reads a private row)."""
    assert policy.monitoring is not None
    columns = monitored(policy, policy.monitoring.bins)
    out: list[dict[str, Any]] = []
    at = 0
    for m in columns:
        out.append(_cells(m, counts[at : at + len(m.cells)], scale))
        at += len(m.cells)
    report: dict[str, Any] = {
        "report_id": report_id,
        "dataset": policy.dataset,
        "version": version,
        "status": "ok",
        "time": now(),
        "baseline": baseline["version"] if baseline is not None else None,
        "epsilon": policy.monitoring.epsilon,
        "sensitivity": sensitivity(policy, columns),
        "scale": scale,
        "alpha": ALPHA,
        "alert_rate": policy.monitoring.alert_rate,
        "columns": out,
    }
    tests, alerts = assess(report, baseline, policy.monitoring.alert_rate)
    report["tests"] = tests
    report["alerts"] = alerts
    return report


def release(policy: Policy, exact: list[int]) -> tuple[list[int], float]:
    """The one OpenDP release of a report: discrete Laplace on the count vector at the policy's ε."""
    assert policy.monitoring is not None
    columns = monitored(policy, policy.monitoring.bins)
    done = release_integers(exact, sensitivity(policy, columns), policy.monitoring.epsilon)
    return done.values, done.scale


def baseline_of(store: ReportStore, versions: list[str], version: str, dataset: str) -> dict[str, Any] | None:
    """The newest report made before `version` (the previous versions', newest first), if any."""
    earlier = versions[: versions.index(version)] if version in versions else []
    for v in reversed(earlier):
        found = store.get(dataset, v)
        if found is not None and found.get("status") == "ok":
            return found
    return None


def request_id(dataset: str, version: str) -> str:
    """The request id a version's report is charged under: one per version, so a charge is found again."""
    return uuid.uuid5(_NAMESPACE, f"{dataset}/{version}").hex


def _charge_of(bastion: Bastion, dataset: str, rid: str) -> float | None:
    """The ε the ledger charged the monitor under `rid`, or None (LedgerUnavailable if it cannot be read)."""
    from gateway.stores.ledger import base_dataset

    # Every ledger key of the dataset: on a dataset with periods a charge is one row per period (`dataset@period`),
    # each of the whole cost.
    for c in bastion.ledger.history():
        if c["request_id"] == rid and c["principal"] == PRINCIPAL and base_dataset(str(c["dataset"])) == dataset:
            return float(str(c["epsilon"]))
    return None


def monitor_version(bastion: Bastion, dataset: str, version: str, source: Path) -> dict[str, Any] | None:
    """Make (charge, compute, release, audit, store) the report of a new version of `dataset` whose batch is
    `source`; None if the policy declares no monitoring. A refused charge (the monitoring cap or the dataset's
    total budget spent) gives a `skipped` report: the version stands, unmonitored.

    A version is charged at most once: its report is made under a lock of its own and charged under a request id
    made from the version, and a version that already has a report gets that report back. If the ledger holds the
    version's charge but no report was stored (the process died, or the log failed after the charge, and nothing
    was released), the report is `skipped` with reason `interrupted` and the ε charged. If the ledger or the log
    fails before any charge, nothing is stored and the error is raised (rerunning the append makes the report)."""
    from gateway.service import Context
    from gateway.stores.tokens import Principal

    policy, _ = bastion.engine.policy(dataset)
    if policy.monitoring is None:
        return None
    mon = policy.monitoring
    store = ReportStore.of(bastion.settings)
    engine: Any = bastion.engine
    with store.locked(dataset, version):
        found = store.get(dataset, version)
        if found is not None:
            return found  # made already (by an append racing this one, say): not charged again
        report_id = uuid.uuid4().hex
        if not hasattr(engine, "profile"):  # monitoring reads batches on DuckDB only (as appends): refused uncharged
            return _skipped(store, report_id, dataset, version, "unsupported_engine")
        rid = request_id(dataset, version)
        spent = _charge_of(bastion, dataset, rid)
        if spent is not None:
            return _skipped(store, report_id, dataset, version, "interrupted", epsilon=spent)
        versions = [v.version for v in engine.versions(dataset)]
        baseline = baseline_of(store, versions, version, dataset)
        charged = policy.model_copy(update={"budget": Budgets(per_principal=mon.cap, total=policy.budget.total)})
        ctx = Context(principal=Principal(name=PRINCIPAL, role=ROLE, token_id=""), source="local", request_id=rid)

        def compute(exact: list[int] | None = None) -> dict[str, Any]:
            if exact is None:
                exact = engine.profile(dataset, source, version, mon.bins)
            noisy, scale = release(policy, exact)
            return build_report(policy, version, noisy, scale=scale, baseline=baseline, report_id=report_id)

        def fallback() -> dict[str, Any]:
            size = sum(len(m.cells) for m in monitored(policy, mon.bins))
            return compute([0] * size)

        try:
            report = bastion.run_private(
                ctx,
                policy=charged,
                event=Event.MONITORING_REPORT,
                request={"report_id": report_id, "version": version},
                cost=PrivacyLoss(mon.epsilon),
                key=None,
                compute=compute,
                fallback=fallback,
                kind="monitoring",
                version=version,
            )
        except GatewayError as exc:
            if exc.status < 500:
                return _skipped(store, report_id, dataset, version, exc.code)  # refused before the charge
            spent = _charge_of(bastion, dataset, rid)
            if spent is None:
                raise  # nothing charged, nothing stored: a rerun makes the report
            return _skipped(store, report_id, dataset, version, "interrupted", epsilon=spent)
        kept = {k: report[k] for k in (*build_keys(), "tests", "alerts") if k in report}
        store.put(kept)
        return kept


def _skipped(
    store: ReportStore, report_id: str, dataset: str, version: str, reason: str, *, epsilon: float = 0.0
) -> dict[str, Any]:
    """The report of a version that was not monitored (nothing released; nothing charged, or for an `interrupted`
    one the ε that was charged), stored so readers see why."""
    skipped = {
        "report_id": report_id,
        "dataset": dataset,
        "version": version,
        "status": "skipped",
        "reason": reason,
        "time": now(),
        "epsilon": epsilon,
        "alerts": [],
    }
    with contextlib.suppress(OSError):
        store.put(skipped)
    return skipped


def build_keys() -> tuple[str, ...]:
    return (
        "report_id",
        "dataset",
        "version",
        "status",
        "time",
        "baseline",
        "epsilon",
        "sensitivity",
        "scale",
        "alpha",
        "alert_rate",
        "columns",
    )


def read_report(store: ReportStore, dataset: str, version: str) -> dict[str, Any]:
    """A stored report (ReportNotFound if the version has none)."""
    found = store.get(dataset, version)
    if found is None:
        raise ReportNotFound(
            f"version {version!r} of dataset {dataset!r} has no monitoring report",
            dataset=dataset,
            hint="reports are made for versions registered or appended while the policy declares monitoring",
        )
    return found


def report_for(bastion: Bastion, ctx: Any, dataset: str, version: str) -> dict[str, Any]:
    """A version's report to a principal whose role has the `query` grant on the dataset (it is a DP release,
    readable like a query answer; a retired version's report too). Refusals and reads are audited."""
    from policies.errors import VersionNotFound
    from policies.schema import Grant

    request = {"action": "read", "version": version}
    bastion.authorize(ctx, dataset, Grant.QUERY, request, event=Event.MONITORING_REPORT)
    if version not in {v.version for v in bastion.engine.versions(dataset)}:
        bastion.audit(
            ctx,
            Event.MONITORING_REPORT,
            dataset=dataset,
            request=request,
            decision="denied",
            reason="version_not_found",
        )
        raise VersionNotFound(
            f"dataset {dataset!r} has no version {version!r}",
            dataset=dataset,
            hint=f"GET /v1/datasets/{dataset}/versions lists its versions",
        )
    try:
        found = read_report(ReportStore.of(bastion.settings), dataset, version)
    except ReportNotFound as exc:
        bastion.audit(
            ctx, Event.MONITORING_REPORT, dataset=dataset, request=request, decision="denied", reason=exc.code
        )
        raise
    bastion.audit(
        ctx,
        Event.MONITORING_REPORT,
        dataset=dataset,
        request={**request, "report_id": found["report_id"]},
        decision="allowed",
        reason="ok",
    )
    return found


def chart(column: dict[str, Any], width: int = 360, bar: int = 16) -> dict[str, Any]:
    """A column's cells as horizontal bars (SVG geometry, computed here so the template only draws)."""
    cells = column["cells"]
    top = max([c["share"] + c["half_width"] for c in cells] + [1e-9])
    rows = []
    for i, c in enumerate(cells):
        y = i * (bar + 4)
        rows.append(
            {
                **c,
                "y": y,
                "w": round(width * c["share"] / top, 1),
                "lo": round(width * max(0.0, c["share"] - c["half_width"]) / top, 1),
                "hi": round(width * min(1.0, c["share"] + c["half_width"]) / top, 1),
                "text": f"{_pct(c['share'])} ± {_pct(c['half_width'])}",
            }
        )
    return {"name": column["name"], "type": column["type"], "rows": rows, "height": len(cells) * (bar + 4), "bar": bar}
