"""What an auditor asks of a log: filtered events, one event with its inclusion proof, exports, privacy spend.

These functions only read the log directory; none needs the signing key. They read a consistent snapshot
(complete records only) and do not verify the log: run `audit.verify.verify_log` for that.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from audit import checkpoint as ckpt
from audit import keys, storage
from audit.checkpoint import Checkpoint
from audit.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion
from audit.record import format_time

CSV_FIRST = (
    "seq",
    "time",
    "event",
    "phase",
    "actor.principal",
    "actor.role",
    "actor.token_id",
    "source",
    "request_id",
    "dataset",
    "decision",
    "reason",
    "cost.epsilon",
    "cost.delta",
)


def _lines(directory: Path) -> Iterator[bytes]:
    """The complete record lines of the log (a torn final line is left out)."""
    snap = storage.snapshot(directory)
    data = storage.read_prefix(directory / storage.LOG, snap.log_size)
    lines = data.split(b"\n")
    yield from lines[:-1]


def _parse(line: bytes, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"line {number} of {storage.LOG} is not a valid record; run verify_log") from exc
    if not isinstance(record, dict):
        raise ValueError(f"line {number} of {storage.LOG} is not a JSON object; run verify_log")
    return record


def read_records(directory: str | Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(_lines(Path(directory)), start=1):
        yield _parse(line, number)


def _needle(key: str, value: str) -> bytes:
    """The exact bytes `"key":"value"` that a canonical record matching the filter must contain."""
    return json.dumps({key: value}, ensure_ascii=False, separators=(",", ":"))[1:-1].encode()


def principal_of(record: Mapping[str, Any]) -> str | None:
    actor = record.get("actor")
    if isinstance(actor, Mapping):
        principal = actor.get("principal")
        return None if principal is None else str(principal)
    return None if actor is None else str(actor)


def query_events(
    directory: str | Path,
    *,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    actor: str | None = None,
    dataset: str | None = None,
    event: str | None = None,
    decision: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Records in log order matching every given filter: `since` <= time < `until` (datetimes, naive = UTC, or
    ISO strings), `actor` (the principal), `dataset`, `event` and `decision`; then `offset` and `limit`."""
    lo = format_time(since) if since is not None else None
    hi = format_time(until) if until is not None else None
    needles = [
        _needle(k, v)
        for k, v in (("principal", actor), ("dataset", dataset), ("event", event), ("decision", decision))
        if v is not None
    ]
    matches: list[dict[str, Any]] = []
    skipped = 0
    for number, line in enumerate(_lines(Path(directory)), start=1):
        if any(n not in line for n in needles):
            continue
        record = _parse(line, number)
        time = record.get("time", "")
        if (lo is not None and time < lo) or (hi is not None and time >= hi):
            continue
        if actor is not None and principal_of(record) != actor:
            continue
        if any(
            v is not None and record.get(k) != v
            for k, v in (("dataset", dataset), ("event", event), ("decision", decision))
        ):
            continue
        if skipped < offset:
            skipped += 1
            continue
        matches.append(record)
        if limit is not None and len(matches) >= limit:
            break
    return matches


@dataclass
class EventProof:
    """A record with its RFC 6962 inclusion proof against the latest checkpoint.

    `proof` is None when the record is newer than the latest checkpoint. `included` says whether the proof
    verifies against the checkpoint's root, `signed` whether the checkpoint's signature verifies under the
    keyring (None if no checkpoint).
    """

    seq: int
    record: dict[str, Any]
    leaf_hash: str
    checkpoint: Checkpoint | None
    proof: list[str] | None
    included: bool
    signed: bool | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint"] = self.checkpoint.to_dict() if self.checkpoint else None
        return data


def get_event(directory: str | Path, seq: int, keyring: keys.Keyring | str | Path | None = None) -> EventProof:
    """Record `seq` with its inclusion proof against the latest checkpoint (and that checkpoint's signature
    checked under `keyring`, by default the keyring of ``directory.parent / "keys"``)."""
    directory = Path(directory)
    ring = keys.Keyring.load(directory.parent / "keys") if keyring is None else keys.Keyring.coerce(keyring)
    snap = storage.snapshot(directory)
    latest = ckpt.last_valid(storage.read_prefix(directory / storage.CHECKPOINTS, snap.checkpoints_size))
    leaves: list[bytes] = []
    line = b""
    sha = hashlib.sha256
    for i, body in enumerate(_lines(directory)):
        leaves.append(sha(b"\x00" + body).digest())
        if i == seq:
            line = body
    if not 0 <= seq < len(leaves):
        raise LookupError(f"no record at position {seq} (the log has {len(leaves)})")
    record = _parse(line, seq + 1)
    signed = None if latest is None else latest.problem(ring) is None
    if latest is None or seq >= latest.tree_size or latest.tree_size > len(leaves):
        return EventProof(seq, record, leaves[seq].hex(), latest, None, False, signed)
    proof = MerkleTree(leaves[: latest.tree_size]).inclusion_proof(seq)
    included = verify_inclusion(leaf_hash(line), seq, latest.tree_size, proof, latest.root)
    return EventProof(seq, record, leaves[seq].hex(), latest, [p.hex() for p in proof], included, signed)


def consistency_proof(directory: str | Path, old: Checkpoint, new: Checkpoint | None = None) -> list[str]:
    """RFC 6962 consistency proof from checkpoint `old` to `new` (default: the latest), both checked to match
    the log and the proof checked to verify; raise ValueError if any check fails."""
    directory = Path(directory)
    if new is None:
        new = ckpt.latest(directory / storage.CHECKPOINTS)
        if new is None:
            raise ValueError("the log has no checkpoint")
    if old.tree_size > new.tree_size:
        raise ValueError("the old checkpoint is larger than the new one")
    leaves = [leaf_hash(body) for _, body in zip(range(new.tree_size), _lines(directory), strict=False)]
    if len(leaves) < new.tree_size:
        raise ValueError(f"the log has {len(leaves)} records, fewer than checkpoint size {new.tree_size}")
    tree = MerkleTree(leaves)
    if tree.root(old.tree_size) != old.root or tree.root() != new.root:
        raise ValueError("a checkpoint does not match the log")
    proof = tree.consistency_proof(old.tree_size)
    if not verify_consistency(old.tree_size, new.tree_size, old.root, new.root, proof):
        raise ValueError("consistency proof does not verify")
    return [p.hex() for p in proof]


def to_jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    """Records as canonical JSON Lines."""
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records)


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            flat.update(_flatten(item, name + "."))
        elif isinstance(item, Mapping | list):
            flat[name] = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        else:
            flat[name] = item
    return flat


def to_csv(records: Iterable[Mapping[str, Any]], *, spreadsheet_safe: bool = True) -> str:
    """Records as CSV, nested fields flattened to dotted columns (``actor.principal``), lists as JSON.

    With `spreadsheet_safe`, text cells starting with ``= + - @`` or a tab/CR get a leading ``'`` so that a
    spreadsheet does not evaluate them as formulas (query text comes from users).
    """
    rows = [_flatten(r) for r in records]
    present = {k for row in rows for k in row}
    columns = [c for c in CSV_FIRST if c in present] + sorted(present.difference(CSV_FIRST))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c), spreadsheet_safe) for c in columns])
    return out.getvalue()


def _cell(value: Any, safe: bool) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if safe and isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


@dataclass
class SpendPoint:
    seq: int
    time: str
    request_id: str | None
    event: str | None
    epsilon: float
    delta: float
    cumulative_epsilon: float
    cumulative_delta: float
    rho: float = 0.0  # charged in ρ (zCDP accounting)
    cumulative_rho: float = 0.0


@dataclass
class DatasetSpend:
    dataset: str
    epsilon: float = 0.0
    delta: float = 0.0
    cap_epsilon: float | None = None
    cap_delta: float | None = None
    remaining_epsilon: float | None = None
    remaining_delta: float | None = None
    over_cap: bool = False
    # Under zCDP accounting (caps with "accounting": "zcdp") the ledger caps ρ and the δ key selection may spend,
    # and over_cap is judged on those: ε charged is then each request's nominal ε, whose sum is no cap's measure.
    accounting: str = "pure"
    rho: float = 0.0
    cap_rho: float | None = None
    remaining_rho: float | None = None
    principals: dict[str, dict[str, float]] = field(default_factory=dict)
    principals_over_cap: list[str] = field(default_factory=list)
    # A dataset with periods: each period is a budget of its own (the caps apply to each), and its spend is here
    # per period (the same fields as the dataset's, each principal's spend under `principals`); the dataset's own
    # figures are then those of the period with the most spent, and it is over its cap if any period is.
    periods: dict[str, dict[str, Any]] | None = None


@dataclass
class SpendReport:
    """Privacy spend: a cumulative series per (principal, dataset) and totals per dataset."""

    series: dict[tuple[str, str], list[SpendPoint]]
    datasets: dict[str, DatasetSpend]
    charges: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "charges": self.charges,
            "series": [
                {"principal": p, "dataset": d, "points": [asdict(x) for x in pts]}
                for (p, d), pts in sorted(self.series.items())
            ],
            "datasets": {name: asdict(spend) for name, spend in sorted(self.datasets.items())},
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _over(used: float, cap: float | None) -> bool:
    """Spent more than `cap`, beyond float rounding of the sum."""
    return cap is not None and used > cap and not math.isclose(used, cap, rel_tol=1e-9, abs_tol=1e-15)


@dataclass(frozen=True)
class LoggedCharge:
    """One charge as the log shows it: the first record of a request that is allowed and carries a cost."""

    seq: int
    time: str
    request_id: str | None
    event: str | None
    principal: str
    dataset: str
    epsilon: float
    delta: float
    rho: float = 0.0  # a charge in ρ (zCDP accounting)
    # A charge on a dataset with periods: the periods it was charged to, each its whole cost (None: no periods).
    periods: tuple[str, ...] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The budgets (the ledger's keys) it was charged to: the dataset, or `dataset@period` for each period (an
        empty list of periods is a charge under the dataset's own key)."""
        if not self.periods:
            return (self.dataset,)
        return tuple(sorted({f"{self.dataset}{PERIOD_SEPARATOR}{p}" for p in self.periods}))


PERIOD_SEPARATOR = "@"  # as the ledger's keys: a dataset's name has no `@`


def charges(
    records: Iterable[Mapping[str, Any]],
    *,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
) -> Iterator[LoggedCharge]:
    """The charges the records show, once per ``request_id`` (a request's "admitted" and "released" records, or
    an "orphan_charge" record standing in for its "admitted" one, carry the same charge). A charge on a dataset with
    periods names them (``periods``); its orphan records are one per period, each once."""
    lo = format_time(since) if since is not None else None
    hi = format_time(until) if until is not None else None
    seen: set[str] = set()
    for record in records:
        cost = record.get("cost")
        if record.get("decision") != "allowed" or not isinstance(cost, Mapping):
            continue
        time = str(record.get("time", ""))
        if (lo is not None and time < lo) or (hi is not None and time >= hi):
            continue
        eps, delta = _number(cost.get("epsilon", 0.0)), _number(cost.get("delta", 0.0))
        rho = _number(cost.get("rho", 0.0))
        if eps is None or delta is None:
            continue
        listed = record.get("periods")
        periods = tuple(str(p) for p in listed) if isinstance(listed, list) else None
        request_id = record.get("request_id")
        if request_id is not None:
            # The same request's records name the same periods; an orphan record per period is a charge each.
            once = json.dumps([str(request_id), str(record.get("dataset")), periods])
            if once in seen:
                continue
            seen.add(once)
        yield LoggedCharge(
            int(record.get("seq", -1)),
            time,
            None if request_id is None else str(request_id),
            record.get("event"),
            principal_of(record) or "?",
            str(record.get("dataset")),
            eps,
            delta,
            rho or 0.0,
            periods,
        )


_CHARGE_NEEDLES = (b'"decision":"allowed"', b'"cost":{')


def charge_records(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a log directory that can carry a charge (allowed, with a cost), parsing only those."""
    for number, line in enumerate(_lines(Path(directory)), start=1):
        if all(n in line for n in _CHARGE_NEEDLES):
            yield _parse(line, number)


def privacy_spend(
    source: str | Path | Iterable[Mapping[str, Any]],
    caps: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
) -> SpendReport:
    """ε, δ and ρ charged per principal per dataset over time, and per dataset in total.

    `source` is a log directory or an iterable of records. A charge is a record with ``decision == "allowed"``
    and a ``cost`` holding ``epsilon`` and/or ``delta``; it is counted once per ``request_id`` (see `charges`).
    Costs add up by basic composition, as charged. `caps` maps a dataset to ``{"epsilon": .., "delta": ..}``
    (its total budget), optionally with ``"per_principal": {"epsilon": .., "delta": ..}``; totals report what
    remains and who went over. A dataset under zCDP accounting has caps with ``"accounting": "zcdp"`` and ``"rho"``
    (the ρ cap; ``"delta"`` is then the δ key selection may spend, and the same keys under ``per_principal``): its
    over-cap verdicts are in ρ and δ, as the ledger's.

    A charge on a dataset with periods (its records name ``periods``) is charged its whole cost in each period,
    and each period is a budget under the dataset's caps: the totals are then per period (`DatasetSpend.periods`),
    as the ledger keeps them. The series stays one per (principal, dataset): each request's cost, once.
    """
    records = charge_records(source) if isinstance(source, str | Path) else source
    series: dict[tuple[str, str], list[SpendPoint]] = defaultdict(list)
    # dataset → budget (a period's label, or None: the dataset's own) → principal → costs
    costs: dict[str, dict[str | None, dict[str, list[tuple[float, float, float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    count = 0
    for c in charges(records, since=since, until=until):
        if c.epsilon == 0 and c.delta == 0 and c.rho == 0:  # a cached answer or a dry run: nothing was spent
            continue
        for label in c.periods or (None,):  # each period a charge names was charged its whole cost
            costs[c.dataset][label][c.principal].append((c.epsilon, c.delta, c.rho))
        points = series[(c.principal, c.dataset)]
        cum_eps = (points[-1].cumulative_epsilon if points else 0.0) + c.epsilon
        cum_delta = (points[-1].cumulative_delta if points else 0.0) + c.delta
        cum_rho = (points[-1].cumulative_rho if points else 0.0) + c.rho
        points.append(
            SpendPoint(c.seq, c.time, c.request_id, c.event, c.epsilon, c.delta, cum_eps, cum_delta, c.rho, cum_rho)
        )
        count += 1
    datasets: dict[str, DatasetSpend] = {}
    for name in sorted(set(costs) | set(caps or {})):
        cap = (caps or {}).get(name, {})
        budgets = costs.get(name, {})
        labels = sorted(label for label in budgets if label is not None)
        if not labels:
            datasets[name] = _budget_spend(name, budgets.get(None, {}), cap)
            continue
        # A charge under the dataset's own key (a WHERE that reads no period) is a budget of its own too.
        each = {label: _budget_spend(name, budgets[label], cap) for label in labels}
        every = [*each.values(), *([_budget_spend(name, budgets[None], cap)] if None in budgets else [])]
        loss = "rho" if cap.get("accounting") == "zcdp" else "epsilon"
        worst = max(every, key=lambda b: (getattr(b, loss), b.delta))
        spend = datasets[name] = DatasetSpend(**{**asdict(worst), "principals": dict(worst.principals)})
        spend.over_cap = any(b.over_cap for b in every)
        spend.principals_over_cap = sorted({p for b in every for p in b.principals_over_cap})
        spend.periods = {
            label: {k: v for k, v in asdict(b).items() if k not in {"dataset", "accounting", "periods"}}
            for label, b in each.items()
        }
    return SpendReport(dict(series), datasets, count)


def _budget_spend(
    name: str, by_principal: Mapping[str, list[tuple[float, float, float]]], cap: Mapping[str, Any]
) -> DatasetSpend:
    """The spend on one budget (a dataset, or one period of it) against its caps."""
    spend = DatasetSpend(name)
    for principal, mine in by_principal.items():
        spend.principals[principal] = {
            "epsilon": math.fsum(e for e, _, _ in mine),
            "delta": math.fsum(d for _, d, _ in mine),
            "rho": math.fsum(r for _, _, r in mine),
        }
    spend.epsilon = math.fsum(e for mine in by_principal.values() for e, _, _ in mine)
    spend.delta = math.fsum(d for mine in by_principal.values() for _, d, _ in mine)
    spend.rho = math.fsum(r for mine in by_principal.values() for _, _, r in mine)
    if not cap:
        return spend
    spend.cap_epsilon, spend.cap_delta = _number(cap.get("epsilon")), _number(cap.get("delta"))
    if spend.cap_epsilon is not None:
        spend.remaining_epsilon = spend.cap_epsilon - spend.epsilon
    if spend.cap_delta is not None:
        spend.remaining_delta = spend.cap_delta - spend.delta
    zcdp = cap.get("accounting") == "zcdp"
    if zcdp:
        spend.accounting = "zcdp"
        spend.cap_rho = _number(cap.get("rho"))
        if spend.cap_rho is not None:
            spend.remaining_rho = spend.cap_rho - spend.rho
    loss = "rho" if zcdp else "epsilon"
    spend.over_cap = _over(getattr(spend, loss), _number(cap.get(loss))) or _over(spend.delta, spend.cap_delta)
    per = cap.get("per_principal")
    if isinstance(per, Mapping):
        pl, pd = _number(per.get(loss)), _number(per.get("delta"))
        spend.principals_over_cap = sorted(
            p for p, used in spend.principals.items() if _over(used[loss], pl) or _over(used["delta"], pd)
        )
    return spend


ACCESS_EVENTS = (
    "access_requested",
    "access_approved",
    "access_denied",
    "access_revoked",
    "access_expired",
    "access_read",
)


@dataclass
class AccessSummary:
    """One consented access request as the log tells it: who asked for which units and why, who decided, and how
    many rows its reads released."""

    access_request: str
    dataset: str | None
    requester: str | None
    units: list[Any]
    purpose: str | None
    scope: str | None
    requested_at: str | None
    status: str = "pending"
    approver: str | None = None
    decided_at: str | None = None
    max_rows: int | None = None
    expires_at: str | None = None
    reads: int = 0
    rows_released: int = 0
    refused_reads: int = 0
    # refused decisions (e.g. self_approval by an approver) and other principals' reads of the request's id
    refusals: list[str] = field(default_factory=list)


def access_summary(records: Iterable[Mapping[str, Any]]) -> list[AccessSummary]:
    """Every access request the records show, newest first (records without a request id, such as a read of an
    unknown request, are left out: they are in the event list)."""
    found: dict[str, AccessSummary] = {}
    for r in records:
        event, rid = r.get("event"), r.get("access_request")
        if event not in ACCESS_EVENTS or not isinstance(rid, str):
            continue
        raw = r.get("request")
        request: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        actor = principal_of(r)
        allowed = r.get("decision") == "allowed"
        if event == "access_requested":
            if allowed:
                found[rid] = AccessSummary(
                    rid,
                    r.get("dataset"),
                    actor,
                    list(request.get("units") or []),
                    request.get("purpose"),
                    request.get("scope"),
                    r.get("time"),
                )
            continue
        entry = found.get(rid)
        if entry is None:
            continue
        if not allowed:
            if event == "access_read" and actor == entry.requester:
                entry.refused_reads += 1  # another principal's read of the id is a probe, listed as a refusal
            else:
                entry.refusals.append(f"{event} by {actor}: {r.get('reason')}")
            continue
        if event == "access_approved":
            entry.status, entry.approver, entry.decided_at = "approved", actor, r.get("time")
            entry.max_rows, entry.expires_at = request.get("max_rows"), request.get("expires_at")
        elif event == "access_denied":
            entry.status, entry.approver, entry.decided_at = "denied", actor, r.get("time")
        elif event == "access_revoked":
            entry.status = f"revoked by {actor}"
        elif event == "access_expired":
            entry.status = "expired"
        elif event == "access_read":
            entry.reads += 1
            entry.rows_released += int(r.get("rows_released") or 0)
    return sorted(found.values(), key=lambda e: e.requested_at or "", reverse=True)
