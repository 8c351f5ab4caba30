"""The gateway's core: one object that owns the catalog, ledger, cache, tokens and audit log, and runs every
privileged access through the same sequence: authorise → plan → cache → charge → audit "admitted" → compute →
audit "released" → answer. Routes and the CLI call these methods; nothing else touches private data.

The ledger and the log agree: a charge is marked audited in the ledger once its "admitted" record is durable; a
charge whose record could not be written is recorded as an "orphan_charge" before the next request is admitted
(and at start-up, for a process that died in between); and `check_consistency` refuses to serve on a ledger that
shows less spend than the log (deleted, or restored from an older copy) until `reconcile_ledger` re-charges it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import hashlib
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from audit import report
from audit.errors import AuditWriteError
from audit.record import Event, bound_texts, parse_time
from gateway.engines import open_engine
from gateway.engines.base import Engine
from gateway.engines.kind import EngineKind
from gateway.refusals import RefusalWindows
from gateway.settings import Settings
from gateway.sql.plan import Plan, plan_query
from gateway.sql.price import Pricing, dry_run_accuracy, price
from gateway.sql.release import Release, bind_check, execute
from gateway.stores.base import AuditStore, open_audit_log, open_cache, open_ledger, open_token_store
from gateway.stores.cache import cache_key
from gateway.stores.ledger import LedgerBehind, LedgerCharge, base_dataset, budget_keys
from gateway.stores.tokens import ANONYMOUS_NAME, Principal, TokenRefused, TokenStore
from policies.accountant import (
    DELTA_UNIT,
    EPS_UNIT,
    RHO_UNIT,
    Accounting,
    PrivacyLoss,
    conversion_delta,
    rho_cap,
    selection_delta_cap,
    spend_caps,
    zcdp_epsilon,
)
from policies.errors import (
    AuditUnavailable,
    DatasetNotFound,
    Forbidden,
    GatewayError,
    LedgerUnavailable,
    PublicTableNotFound,
    QueryRejected,
    TooManyRequests,
    VersionNotFound,
    VersionRetired,
)
from policies.schema import Grant, Policy

log = logging.getLogger("bastion")
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Who is asking, from where, under which request id.

    `request_id` is always made by the gateway. `correlation_id` is the client's own label for the request,
    validated by the HTTP layer; it is recorded in audit records and used for nothing else.
    """

    principal: Principal
    source: str = "local"
    request_id: str = ""
    correlation_id: str | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", uuid.uuid4().hex)


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Flight:
    """One request being answered; identical requests that arrive meanwhile wait for its answer."""

    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None  # the released (or cached) answer, once there is one


ORPHAN_CHARGE = Event.ORPHAN_CHARGE
# The actor of a refusal before authentication (no token, or one that does not work); the CLI's admin actions on
# the gateway host are the only records made without a caller that carry ADMIN.
ANONYMOUS = {"principal": ANONYMOUS_NAME, "role": None, "token_id": None}
ADMIN = {"principal": "admin", "role": "admin", "token_id": None}
# The event name of each grant's action: a denial is recorded under the same name as the allowed action.
# Rows of a public table one read returns at most (`GET /v1/datasets/{dataset}/public/{table}`); further pages by
# `offset`.
PUBLIC_PAGE_ROWS = 1_000
MAX_PUBLIC_PAGE_ROWS = 10_000
GRANT_EVENTS = {
    Grant.QUERY: Event.QUERY,
    Grant.SYNTH: Event.SYNTH,
    Grant.LABELING: Event.LF_STATS,
    Grant.EVALUATE: Event.EVALUATE,
}
Expected = dict[tuple[str, str], tuple[int, int, int]]  # (principal, dataset) → (ε units, δ units, ρ units)


class InternalError(GatewayError):
    """A computation failed after the charge and no default-input answer could be made. Its status, code and
    message are the same whatever failed."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"internal error (request {request_id}); the charge stands")


def _epoch(time: str) -> float:
    """A record's time as a Unix time (now, if the record has none)."""
    try:
        return parse_time(time).timestamp()
    except ValueError:
        return dt.datetime.now(dt.UTC).timestamp()


def _costs_under_both(
    plan: Plan,
    policy: Policy,
    *,
    epsilon: float | None,
    accuracy: float | dict[str, float] | None,
    alpha: float,
    delta: float | None,
    pricing: Pricing,
) -> dict[str, Any]:
    """What a request would cost under each accounting (a dry run's `costs`): pure (ε, δ), and zCDP ρ (with δ for
    key selection) with the (ε, δ) it is worth at the policy's δ (ε at half of the per-principal δ, which is what
    the ρ cap is converted at, and that half added to δ). An accounting that cannot price it says why."""
    out: dict[str, Any] = {}
    for accounting in Accounting:
        try:
            p = (
                pricing
                if accounting is pricing.accounting
                else price(plan, epsilon=epsilon, accuracy=accuracy, alpha=alpha, delta=delta, accounting=accounting)
            )
        except GatewayError as exc:
            out[accounting.value] = {"error": exc.message}
            continue
        if accounting is Accounting.PURE:
            out["pure"] = {"epsilon": p.cost.epsilon, "delta": p.cost.delta}
            continue
        d_conv = conversion_delta(policy.budget.per_principal.delta)
        eq = zcdp_epsilon(p.cost.rho, d_conv)
        out["zcdp"] = {
            "rho": p.cost.rho,
            "delta": p.cost.delta,
            "epsilon_equivalent": eq if math.isfinite(eq) else None,
            "delta_equivalent": d_conv + p.cost.delta,
        }
    return out


def _logged_units(charge: report.LoggedCharge) -> tuple[int, int, int]:
    """A logged charge in ledger units (ε, δ, ρ), rounded to nearest: never above what the ledger charged for it
    (the ledger rounds the same cost up), and exact for an orphan record (which states ledger units)."""
    return (
        max(math.ceil(charge.epsilon * EPS_UNIT - 0.5), 0),
        max(math.ceil(charge.delta * DELTA_UNIT - 0.5), 0),
        max(math.ceil(charge.rho * RHO_UNIT - 0.5), 0),
    )


def _json_safe(value: Any) -> Any:
    """A copy of a record's fields that strict JSON in UTF-8 can hold: a non-finite number a client sent (NaN, inf)
    is kept as its text, a lone surrogate in a string as '?'."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes '?'

    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _json_value(value: Any) -> Any:
    """A public table's cell as JSON holds it: dates as ISO 8601 text, a non-finite float as null."""
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def shared_directory(path: Path) -> None:
    """Make the shared directory (mode 0700) if it is missing; warn if others may enter an existing one."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        log.warning("the shared directory %s is open to other users: it holds outputs derived from private rows", path)


class Bastion:
    def __init__(self, settings: Settings, *, read_only: bool = True) -> None:
        self.settings = settings
        self.engine = open_engine(settings, read_only=read_only)
        try:
            settings.workspace.mkdir(parents=True, exist_ok=True)
            if settings.shared_dir is not None:
                shared_directory(settings.shared_dir)
            self.ledger = open_ledger(settings)
            try:
                self.cache = open_cache(settings)
                try:
                    self.tokens: TokenStore = open_token_store(settings)
                    try:
                        self.audit_log: AuditStore = open_audit_log(settings)
                    except BaseException:
                        self.tokens.close()
                        raise
                except BaseException:
                    self.cache.close()
                    raise
            except BaseException:
                self.ledger.close()
                raise
        except BaseException:
            self.engine.close()
            raise
        self._plans: dict[str, tuple[Policy, Plan]] = {}  # SQL text → (the policy it was planned under, plan)
        # Charges this process could not mark in the ledger: unrecorded (orphans due) and audited.
        self._state = threading.Lock()
        self._orphans_due = False
        self._stranded: set[int] = set()
        self._unmarked: set[int] = set()
        limits = settings.limits
        self.refusals = RefusalWindows(limits.refusal_window_seconds, limits.max_refusals, limits.max_sources)
        # Requests being answered now, by cache key: an identical request arriving meanwhile waits for the answer.
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()

    def close(self) -> None:
        aggregates = self.refusals.drain()
        if aggregates:
            try:
                self.audit_log.append_many([self._aggregate_event(a) for a in aggregates])
            except AuditWriteError as exc:
                log.error("counts of refusals before authentication could not be recorded: %s", exc)
        self.engine.close()
        self.ledger.close()
        self.cache.close()
        self.tokens.close()
        try:
            self.audit_log.close()
        except AuditWriteError as exc:
            log.error("audit log could not be closed cleanly: %s", exc)

    # --- audit --------------------------------------------------------------------------------------------

    def audit(self, ctx: Context | None, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record durably, or raise AuditUnavailable (the caller must release nothing)."""
        return self._append([self._event(ctx, event, fields)])[-1]

    @contextlib.contextmanager
    def denials_audited(self, ctx: Context, event: str, dataset: str, request: dict[str, Any]) -> Iterator[None]:
        """Record a refusal raised inside the block (planning and checks before any charge) as the request's denied
        record, under its reason, and raise it on."""
        try:
            yield
        except GatewayError as exc:
            reason = getattr(exc, "reason", None) or exc.details.get("reason") or exc.code  # a detail names it too
            self.audit(ctx, event, dataset=dataset, request=request, decision="denied", reason=reason)
            raise

    @staticmethod
    def _event(ctx: Context | None, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "event": event,
            "actor": ctx.principal.as_actor() if ctx else dict(ADMIN),
            "source": ctx.source if ctx else "cli",
            "request_id": ctx.request_id if ctx else uuid.uuid4().hex,
        }
        if ctx is not None and ctx.correlation_id:
            record["correlation_id"] = ctx.correlation_id
        record.update(bound_texts(_json_safe(fields)))
        return record

    @staticmethod
    def _aggregate_event(fields: dict[str, Any]) -> dict[str, Any]:
        """The record of a closed window of refusals before authentication, counted but not recorded one by one."""
        return {
            "event": Event.AUTHENTICATION,
            "actor": dict(ANONYMOUS),
            "request_id": uuid.uuid4().hex,
            "decision": "denied",
            "reason": "aggregate",
            **fields,
        }

    @staticmethod
    def _orphan_event(charge: LedgerCharge) -> dict[str, Any]:
        """The record standing in for the "admitted" record a charge never got (the charge was made; nothing
        was released under it). A row of a charge on a dataset with periods (key `dataset@period`) is recorded as
        a charge on that dataset in that period, as its "admitted" record would have named it."""
        dataset = base_dataset(charge.dataset)
        return {
            "event": ORPHAN_CHARGE,
            "actor": {"principal": charge.principal, "role": None, "token_id": None},
            "source": "ledger",
            "request_id": charge.request_id,
            "dataset": dataset,
            **({"periods": [charge.dataset[len(dataset) + 1 :]]} if dataset != charge.dataset else {}),
            "decision": "allowed",
            "reason": ORPHAN_CHARGE,
            "phase": "charged",
            "kind": charge.kind,
            "cost": charge.cost.as_dict(),
            "charged_at": dt.datetime.fromtimestamp(charge.ts, dt.UTC).isoformat(),
        }

    def _append(
        self, events: list[dict[str, Any]], *, orphans: Iterable[LedgerCharge] = (), audited: Iterable[int | None] = ()
    ) -> list[dict[str, Any]]:
        """Append `events` durably, after an orphan record for each of `orphans` and for every unrecorded charge
        this process knows of; then mark those charges, and the charges in `audited`, as audited.

        If the log cannot be written, all of them are left unrecorded (the next charge, in any process, claims
        them) and AuditUnavailable is raised.
        """
        due = [*orphans, *self._due_orphans()]
        ids = [c.id for c in due] + list(audited)
        aggregates = self.refusals.closed()
        events = [*(self._aggregate_event(a) for a in aggregates), *events]
        batch = [self._orphan_event(c) for c in due] + events
        if not batch:
            self._mark_audited(ids)
            return []
        try:
            written = self.audit_log.append(batch[0]) if len(batch) == 1 else None
            records = [written] if written is not None else self.audit_log.append_many(batch)
        except AuditWriteError as exc:
            log.error("audit append failed: %s", exc)
            self._unrecorded(ids)
            self.refusals.restore(aggregates)
            raise AuditUnavailable("the audit log cannot be written; nothing was released") from None
        self._mark_audited(ids)
        return records[len(due) + len(aggregates) :]

    def _unrecorded(self, ids: Iterable[int | None]) -> None:
        known = [i for i in ids if i is not None]
        if not known:
            return
        with self._state:
            self._orphans_due = True
            try:
                self.ledger.mark_unrecorded(known)
            except LedgerUnavailable as exc:
                log.error("charges could not be marked unrecorded (%s); retrying later", type(exc).__name__)
                self._stranded.update(known)

    def _mark_audited(self, ids: Iterable[int | None]) -> None:
        """Bookkeeping only (the records are durable): a failure is retried later, and at start-up."""
        known = [i for i in ids if i is not None]
        if not known:
            return
        try:
            self.ledger.mark_audited(known)
        except LedgerUnavailable as exc:
            log.error("charges could not be marked audited (%s); retrying later", type(exc).__name__)
            with self._state:
                self._orphans_due = True
                self._unmarked.update(known)

    def _due_orphans(self) -> list[LedgerCharge]:
        """Unrecorded charges to record now, claimed from the ledger (only after this process saw a failure)."""
        if not self._orphans_due:
            return []
        with self._state:
            try:
                if self._unmarked:
                    self.ledger.mark_audited(self._unmarked)
                    self._unmarked.clear()
                if self._stranded:
                    self.ledger.mark_unrecorded(self._stranded)
                    self._stranded.clear()
                claimed = list(self.ledger.claim_unrecorded())
            except LedgerUnavailable as exc:
                log.error("unrecorded charges cannot be claimed yet (%s)", type(exc).__name__)
                return []
            if not claimed:
                self._orphans_due = False
            return claimed

    # --- the ledger against the log -----------------------------------------------------------------------

    def _logged_charges(self) -> dict[tuple[str, tuple[str, ...]], report.LoggedCharge]:
        """Every charge the audit log shows, by request id and the budgets (ledger keys) it charged (one pass)."""
        try:
            return {
                (c.request_id or f"seq-{c.seq}", c.keys): c
                for c in report.charges(report.charge_records(self.audit_log.snapshot()))
            }
        except (OSError, ValueError, AuditWriteError) as exc:
            raise AuditUnavailable(
                f"the audit log cannot be read to check the budget ledger against it: {exc}"
            ) from None

    @staticmethod
    def _expected(logged: Iterable[report.LoggedCharge]) -> Expected:
        """The spend the log shows per (principal, ledger key): a charge on a dataset with periods counts its whole
        cost in each period it names, as the ledger records it."""
        expected: Expected = {}
        for c in logged:
            units = _logged_units(c)
            for key in c.keys:
                have = expected.get((c.principal, key), (0, 0, 0))
                expected[(c.principal, key)] = (have[0] + units[0], have[1] + units[1], have[2] + units[2])
        return expected

    def check_consistency(self) -> None:
        """At start-up: record every orphan charge, then refuse to serve (LedgerBehind) if, for some principal
        and dataset, the ledger shows less spend than the audit log.

        The log is read before the ledger, so a charge that another live process is making meanwhile can only
        put the ledger ahead. Raises AuditUnavailable if orphan charges cannot be recorded.
        """
        logged = self._logged_charges()
        ids = {request_id for request_id, _ in logged}
        claimed = self.ledger.claim_stale()
        orphans = [c for c in claimed if c.request_id not in ids]
        if orphans:
            self._append([], orphans=orphans, audited=[c.id for c in claimed if c.request_id in ids])
            log.warning("recorded %d orphan charge(s) in the audit log", len(orphans))
        else:
            self._mark_audited(c.id for c in claimed)
        expected = self._expected(
            [
                *logged.values(),
                *(
                    report.LoggedCharge(
                        -1,
                        "",
                        c.request_id,
                        ORPHAN_CHARGE,
                        c.principal,
                        c.dataset,  # the row's own key (`dataset@period` for a period's row)
                        c.cost.epsilon,
                        c.cost.delta,
                        c.cost.rho,
                    )
                    for c in orphans
                ),
            ]
        )
        # Compared key by key: a charge on a dataset with periods is one row per period, each of the whole cost,
        # and the log names its periods, so each period's budget is checked on its own.
        have = self.ledger.totals()
        behind = [
            (key, have.get(key, (0, 0, 0)), want)
            for key, want in sorted(expected.items())
            if any(got < wanted for got, wanted in zip(have.get(key, (0, 0, 0)), want, strict=True))
        ]
        if behind:
            raise LedgerBehind(self._behind_message(behind))

    def _behind_message(self, behind: list[tuple[tuple[str, str], tuple[int, int, int], tuple[int, int, int]]]) -> str:
        def loss(units: tuple[int, int, int]) -> str:
            spent = PrivacyLoss.from_units(*units)
            return f"ε={spent.epsilon:.6g}, δ={spent.delta:.3g}" + (f", ρ={spent.rho:.6g}" if spent.rho else "")

        pairs = "; ".join(f"{p!r} on {d!r}: ledger {loss(got)}, log {loss(want)}" for (p, d), got, want in behind[:5])
        more = f" and {len(behind) - 5} more" if len(behind) > 5 else ""
        return (
            f"the budget ledger {self.ledger.location} is behind the audit log {self.audit_log.location}: it shows "
            f"less privacy spend than the log for {len(behind)} principal/dataset pair(s) ({pairs}{more}). It was "
            "deleted or restored from an older copy, and serving on it would let spent budget be spent again. "
            "Run 'bastion ledger reconcile' on this host to re-charge the missing spend from the log (nothing is "
            "refunded), then start the gateway again."
        )

    def reconcile_ledger(self) -> list[LedgerCharge]:
        """Re-charge from the audit log whatever the ledger is missing (never refunds), record that as an admin
        action, and check consistency. Returns the charges added."""
        logged = self._logged_charges()
        charges = [
            LedgerCharge(
                None,
                _epoch(c.time),
                c.principal,
                key,  # a charge on a dataset with periods is re-charged to each period it named
                max(math.ceil(c.epsilon * EPS_UNIT), 0),
                max(math.ceil(c.delta * DELTA_UNIT), 0),
                request_id,
                "reconciled",
                max(math.ceil(c.rho * RHO_UNIT), 0),
            )
            for (request_id, _), c in logged.items()
            for key in c.keys
        ]
        added = self.ledger.recharge(charges, self._expected(logged.values()))
        summary: dict[tuple[str, str], list[LedgerCharge]] = {}
        for c in added:
            summary.setdefault((c.principal, c.dataset), []).append(c)
        self.audit(
            None,
            Event.LEDGER_RECONCILED,
            decision="allowed",
            reason="ok",
            request={"ledger": self.ledger.location},
            recharged=[
                {
                    "principal": p,
                    "dataset": d,
                    "charges": len(cs),
                    "epsilon": PrivacyLoss.from_units(sum(c.eps_units for c in cs), 0).epsilon,
                    "delta": PrivacyLoss.from_units(0, sum(c.delta_units for c in cs)).delta,
                    **(
                        {"rho": PrivacyLoss.from_units(0, 0, sum(c.rho_units for c in cs)).rho}
                        if any(c.rho_units for c in cs)
                        else {}
                    ),
                }
                for (p, d), cs in sorted(summary.items())
            ],
        )
        self.check_consistency()
        return added

    def authenticate(self, token: str | None) -> Principal:
        return self.tokens.authenticate(token)

    def check_source(self, source: str, path: str, request_id: str, correlation_id: str | None = None) -> None:
        """Refuse (429, counted) a source that used up its refusals before authentication in its window, before
        its token is looked at."""
        if self.refusals.blocked(source):
            error = TooManyRequests(
                f"too many refused requests from this address; wait up to "
                f"{self.settings.limits.refusal_window_seconds:g} s and try again"
            )
            self.refuse_unauthenticated(error, source, path, request_id, correlation_id)
            raise error

    def refuse_unauthenticated(
        self,
        error: GatewayError,
        source: str,
        path: str,
        request_id: str,
        correlation_id: str | None = None,
        **request_fields: str,
    ) -> None:
        """Audit a refusal made before the caller was authenticated: the first of its source's window in full
        (with `request_fields`), later ones counted into the window's aggregate record (see `gateway.refusals`)."""
        # A token with the right secret that no longer works (revoked, rotated, expired) is named by its
        # principal and id (never its secret or hash), with the reason token_revoked, token_rotated or
        # token_expired; any other refusal is anonymous.
        reason = error.reason if isinstance(error, TokenRefused) else error.code
        token_id = error.principal.token_id if isinstance(error, TokenRefused) else None
        if not self.refusals.note(source, reason, token_id):
            return
        fields: dict[str, Any] = {
            "actor": error.principal.as_actor() if isinstance(error, TokenRefused) else dict(ANONYMOUS),
            "request": {"path": path, **request_fields},
            "decision": "denied",
            "reason": reason,
            "source": source,
            "request_id": request_id,
        }
        if correlation_id:
            fields["correlation_id"] = correlation_id
        self.audit(None, Event.AUTHENTICATION, **fields)

    # --- datasets and budgets -----------------------------------------------------------------------------

    def authorize(
        self, ctx: Context, dataset: str, grant: Grant, request: dict[str, Any], event: Event | None = None
    ) -> tuple[Policy, str]:
        """The dataset's policy and version if the caller's role has `grant`; otherwise a denial audited under
        `event` (the action's own event name; by default the grant's)."""
        event = event or GRANT_EVENTS[grant]
        policy, version = self._registered(ctx, dataset, event, request)
        if grant not in policy.grants(ctx.principal.role):
            self.audit(ctx, event, dataset=dataset, request=request, decision="denied", reason="forbidden")
            raise Forbidden(
                f"role {ctx.principal.role!r} has no {grant.value!r} grant on dataset {dataset!r}",
                dataset=dataset,
            )
        return policy, version

    def _registered(self, ctx: Context, dataset: str, event: Event, request: dict[str, Any]) -> tuple[Policy, str]:
        """The dataset's policy and version, or its refusal audited under `event` (an unknown name with the nearest
        name the caller may use)."""
        try:
            return self.engine.policy(dataset)
        except GatewayError as exc:
            self.audit(ctx, event, dataset=dataset, request=request, decision="denied", reason=exc.code)
            if isinstance(exc, DatasetNotFound):
                raise self._dataset_not_found(ctx, dataset, exc) from None
            raise

    def _dataset_not_found(self, ctx: Context, dataset: str, exc: DatasetNotFound) -> DatasetNotFound:
        """`exc` with the nearest name among the datasets the caller is granted (never another dataset's name)."""
        granted = [name for name, (p, _) in self.engine.datasets().items() if p.grants(ctx.principal.role)]
        near = difflib.get_close_matches(dataset.lower(), granted, n=1, cutoff=0.6)
        if near:
            hint = f"did you mean {near[0]!r}? GET /v1/datasets lists the datasets you may use"
        else:
            hint = "GET /v1/datasets lists the datasets you may use"
        return DatasetNotFound(
            f"{exc.message}; {hint}", dataset=dataset, hint=hint, suggestion=near[0] if near else None
        )

    def datasets(self, ctx: Context) -> list[dict[str, Any]]:
        out = []
        for policy, version in self.engine.datasets().values():
            grants = policy.grants(ctx.principal.role)
            if grants:
                out.append({**policy.public_schema(), "version": version, "grants": sorted(g.value for g in grants)})
        return out

    def versions(self, ctx: Context, dataset: str) -> list[dict[str, Any]]:
        """A dataset's versions (public: counters, times and row-count classes) to any principal with a grant on
        it; an unknown dataset or one without a grant is refused as `GET /v1/datasets` would hide it."""
        try:
            policy, _ = self.engine.policy(dataset)
        except DatasetNotFound as exc:
            raise self._dataset_not_found(ctx, dataset, exc) from None
        if not policy.grants(ctx.principal.role):
            raise Forbidden(f"role {ctx.principal.role!r} has no grant on dataset {dataset!r}", dataset=dataset)
        return [v.public() for v in self.engine.versions(dataset)]

    def reading(
        self, ctx: Context, dataset: str, version: str | None, event: str, request: dict[str, Any]
    ) -> tuple[str, Engine]:
        """The version a request reads (`version`, or the latest now) and the engine pinned to it, so that every
        statement of the request reads that one version; a version the dataset lacks or retired is refused here,
        before any charge, and audited under `event`."""
        try:
            chosen = self.engine.version(dataset, version)
            return chosen.version, self.engine.at({dataset: chosen.version})
        except (VersionNotFound, VersionRetired) as exc:
            self.audit(ctx, event, dataset=dataset, request=request, decision="denied", reason=exc.code)
            raise

    def public_table(
        self, ctx: Context, dataset: str, table: str, *, offset: int = 0, limit: int | None = None
    ) -> dict[str, Any]:
        """Rows of a dataset's public table, one page, to any principal with a grant on the dataset; recorded as
        `public_read` before the rows leave (a refusal too); never charged: the rows are public."""
        limit = PUBLIC_PAGE_ROWS if limit is None else limit
        request = {"table": table, "offset": offset, "limit": limit}
        event = Event.PUBLIC_READ
        policy, _ = self._registered(ctx, dataset, event, request)
        if not policy.grants(ctx.principal.role):
            self.audit(ctx, event, dataset=dataset, request=request, decision="denied", reason="forbidden")
            raise Forbidden(f"role {ctx.principal.role!r} has no grant on dataset {dataset!r}", dataset=dataset)
        if table not in policy.public_tables:
            self.audit(ctx, event, dataset=dataset, request=request, decision="denied", reason=PublicTableNotFound.code)
            names = ", ".join(sorted(policy.public_tables)) or "none"
            raise PublicTableNotFound(
                f"dataset {dataset!r} has no public table {table!r}",
                dataset=dataset,
                hint=f"its public tables: {names} (GET /v1/datasets lists them)",
            )
        self.audit(ctx, event, dataset=dataset, request=request, decision="allowed", reason="ok")
        rows = self.engine.public_table(dataset, table)
        page = rows.slice(offset, limit).to_pylist()
        columns = list(policy.public_tables[table].columns)
        end = offset + len(page)
        return {
            "dataset": dataset,
            "table": table,
            "columns": columns,
            "rows": [[_json_value(r[c]) for c in columns] for r in page],
            "offset": offset,
            "limit": limit,
            "total": rows.num_rows,
            "next_offset": end if end < rows.num_rows else None,
        }

    def budget_status(self, principal: str, policy: Policy) -> dict[str, Any]:
        """A principal's spend on a dataset against its cap. Under zCDP the cap is on ρ (converted from the declared
        (ε, δ)) and on the δ that conversion leaves; `spent.epsilon` is then the ε that the ρ spent is worth.

        On a dataset with periods each period has its own budget: `periods` holds each one's status, and the
        dataset's own figures are those of the period with the most spent."""
        if policy.period is None:
            return self._budget_of(policy, self.ledger.spent(principal, policy.dataset))
        each = {
            label: self._budget_of(policy, self.ledger.spent(principal, budget_keys(policy.dataset, [label])[0]))
            for label, _, _ in policy.periods()
        }
        worst = max(each.values(), key=lambda status: status["spent"]["epsilon"])
        return {
            **worst,
            "periods": {
                label: {k: v for k, v in status.items() if k not in {"dataset", "accounting"}}
                for label, status in each.items()
            },
        }

    def _budget_of(self, policy: Policy, spent: PrivacyLoss) -> dict[str, Any]:
        cap = policy.budget.per_principal
        status: dict[str, Any] = {"dataset": policy.dataset, "accounting": policy.accounting.value}
        if policy.accounting is Accounting.ZCDP:
            r_cap, d_cap, d_conv = (
                rho_cap(cap.epsilon, cap.delta),
                selection_delta_cap(cap.delta, policy.accounting),
                conversion_delta(cap.delta),
            )
            return {
                **status,
                "spent": {"epsilon": zcdp_epsilon(spent.rho, d_conv), "delta": spent.delta, "rho": spent.rho},
                "limit": {**cap.model_dump(), "rho": r_cap},
                "remaining": {
                    "epsilon": max(cap.epsilon - zcdp_epsilon(spent.rho, d_conv), 0.0),
                    "delta": max(d_cap - spent.delta, 0.0),
                    "rho": max(r_cap - spent.rho, 0.0),
                },
            }
        return {
            **status,
            "spent": spent.as_dict(),
            "limit": cap.model_dump(),
            "remaining": {"epsilon": max(cap.epsilon - spent.epsilon, 0.0), "delta": max(cap.delta - spent.delta, 0.0)},
        }

    def budgets(self, ctx: Context) -> list[dict[str, Any]]:
        return [
            self.budget_status(ctx.principal.name, policy)
            for policy, _ in self.engine.datasets().values()
            if policy.grants(ctx.principal.role)
        ]

    # --- the privileged sequence --------------------------------------------------------------------------

    def run_private(
        self,
        ctx: Context,
        *,
        policy: Policy,
        event: str,
        request: dict[str, Any],
        cost: PrivacyLoss,
        key: str | None,
        compute: Callable[[], dict[str, Any]],
        fallback: Callable[[], dict[str, Any]] | None = None,
        dry_run: dict[str, Any] | None = None,
        kind: str = "query",
        version: str | None = None,
        periods: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Charge, audit, compute and release one answer; the one path by which private rows reach anybody.

        On a dataset with periods (`Policy.period`) the cost is charged to each of `periods`, and by default (None)
        to every period of the dataset: a path that does not say which periods it reads is charged all of them.
        Every record of the access, and the answer, name the periods charged.

        `compute` returns the JSON-ready answer. `dry_run`, if given, is returned instead (nothing spent).
        A cached answer for `key` is returned at no cost. Identical requests (same `key`) in flight at once are
        coalesced: the first is answered, and the others wait for it and get its answer as a cached answer (no
        charge, no second noise draw); if the first fails, the next one is answered on its own.

        After the charge, what the caller sees depends on public facts only. If `compute` fails (in any way but
        the ledger or the log being unavailable), `fallback` makes the same release from the default input (the
        mechanism applied to an empty table): the caller gets it with the same status and shape, the log says
        reason "fallback" with the error's class. If there is no fallback, or it fails too, the answer is the
        fixed InternalError. Only error classes are logged, never messages: engine messages quote row values.
        """
        base: dict[str, Any] = {"dataset": policy.dataset, "request": request}
        if version is not None:
            base["version"] = version  # every record of the access names the version it read
        if policy.period is not None:
            known = [label for label, _, _ in policy.periods()]
            chosen = known if periods is None else sorted(set(periods))
            if any(p not in known for p in chosen):
                raise AssertionError("a charge names a period the policy does not declare")
            base["periods"] = chosen  # every record of the access names the periods charged
        if key is None or dry_run is not None:
            return self._answer(ctx, policy, event, base, cost, key, compute, fallback, dry_run, kind, None)
        while True:
            with self._flights_lock:
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
            if leader:
                try:
                    return self._answer(ctx, policy, event, base, cost, key, compute, fallback, None, kind, flight)
                finally:
                    with self._flights_lock:
                        del self._flights[key]
                    flight.done.set()
            flight.done.wait()
            if flight.answer is not None:
                return self._cached(ctx, event, base, policy, flight.answer)

    def _answer(
        self,
        ctx: Context,
        policy: Policy,
        event: str,
        base: dict[str, Any],
        cost: PrivacyLoss,
        key: str | None,
        compute: Callable[[], dict[str, Any]],
        fallback: Callable[[], dict[str, Any]] | None,
        dry_run: dict[str, Any] | None,
        kind: str,
        flight: _Flight | None,
    ) -> dict[str, Any]:
        """`run_private` for one request; the released or cached answer is also left in `flight`."""
        hit = self.cache.get(key) if key is not None else None
        if dry_run is not None:
            return self._dry_run(ctx, event, base, policy, dry_run, cached=hit is not None)
        if hit is not None:
            if flight is not None:
                flight.answer = hit
            return self._cached(ctx, event, base, policy, hit)
        try:
            charge = self.ledger.charge(
                principal=ctx.principal.name,
                dataset=policy.dataset,
                cost=cost,
                per_principal=policy.budget.per_principal,
                total=policy.budget.total,
                request_id=ctx.request_id,
                kind=kind,
                accounting=policy.accounting,
                periods=base.get("periods", ()),
            )
        except GatewayError as exc:
            self.audit(
                ctx,
                event,
                **base,
                decision="denied" if exc.status < 500 else "error",
                reason=exc.code,
                cost=cost.as_dict(),
                phase="refused",
            )
            raise
        cost = charge.cost  # as charged: a pure cost on a zCDP dataset with its ρ, which the log must show too
        budget = {"budget_before": charge.principal_before.as_dict(), "budget_after": charge.principal_after.as_dict()}
        admitted = self._event(
            ctx,
            event,
            {**base, "decision": "allowed", "reason": "ok", "phase": "admitted", "cost": cost.as_dict(), **budget},
        )
        # Charge → admitted record (durable, after any orphan records this charge claimed) → marked audited.
        self._append([admitted], orphans=charge.claimed, audited=list(charge.all_ids))
        reason, failure = "ok", {}
        try:
            answer = compute()
        except (AuditUnavailable, LedgerUnavailable):
            raise
        except Exception as exc:
            failure = {"error": type(exc).__name__}
            log.warning("request %s: the computation failed (%s)", ctx.request_id, failure["error"])
            answer = self._fallback(ctx, event, base, cost, budget, failure, fallback)
            reason = "fallback"
        self.audit(
            ctx,
            event,
            **base,
            decision="allowed",
            reason=reason,
            phase="released",
            cost=cost.as_dict(),
            release_digest=digest(answer),
            **budget,
            **failure,
        )
        if flight is not None:
            flight.answer = answer
        if key is not None:
            try:
                self.cache.put(key, ctx.principal.name, answer)
            except Exception as exc:  # noqa: BLE001 - the answer is released and audited; a repeat is charged anew
                log.error("request %s: the release cache cannot be written (%s)", ctx.request_id, type(exc).__name__)
        return {
            **answer,
            "cached": False,
            "dry_run": False,
            "epsilon_spent": cost.epsilon,
            "delta_spent": cost.delta,
            **({"rho_spent": cost.rho} if cost.rho else {}),
            **({"periods": base["periods"]} if "periods" in base else {}),
            "query_id": ctx.request_id,
            "budget": self.budget_status(ctx.principal.name, policy),
        }

    def _cached(
        self, ctx: Context, event: str, base: dict[str, Any], policy: Policy, hit: dict[str, Any]
    ) -> dict[str, Any]:
        """An answer already released to this principal for the same request, again, at no cost."""
        self.audit(
            ctx,
            event,
            **base,
            decision="allowed",
            reason="cached",
            phase="released",
            cost=PrivacyLoss(0.0).as_dict(),
            release_digest=digest(hit),
        )
        return {
            **hit,
            "cached": True,
            "dry_run": False,
            "epsilon_spent": 0.0,
            "delta_spent": 0.0,
            "query_id": ctx.request_id,
            "budget": self.budget_status(ctx.principal.name, policy),
        }

    def _dry_run(
        self, ctx: Context, event: str, base: dict[str, Any], policy: Policy, dry_run: dict[str, Any], cached: bool
    ) -> dict[str, Any]:
        """A dry run: what the request would cost, nothing spent. For a request already answered (`cached`) it
        would cost nothing (the cached answer is returned), and says so. Nothing private is read; whether a request
        of this principal is cached is the principal's own public history."""
        self.audit(
            ctx,
            event,
            **base,
            decision="allowed",
            reason="dry_run",
            phase="released",
            cost=PrivacyLoss(0.0).as_dict(),
            release_digest=None,
            **({"cached": True} if cached else {}),
        )
        answer = {**dry_run, "dry_run": True, "cached": cached}
        if cached:
            answer.update(
                epsilon=0.0,
                delta=0.0,
                notes=[
                    *dry_run.get("notes", []),
                    "this request was already answered: running it costs nothing and returns the same answer again "
                    "(cached); the cost shown is 0 for that reason",
                ],
            )
        return {
            **answer,
            "epsilon_spent": 0.0,
            "delta_spent": 0.0,
            "query_id": ctx.request_id,
            "budget": self.budget_status(ctx.principal.name, policy),
        }

    def _fallback(
        self,
        ctx: Context,
        event: str,
        base: dict[str, Any],
        cost: PrivacyLoss,
        budget: dict[str, Any],
        failure: dict[str, str],
        fallback: Callable[[], dict[str, Any]] | None,
    ) -> dict[str, Any]:
        """The default-input answer, or (audited) the fixed InternalError if there is none."""
        if fallback is not None:
            try:
                return fallback()
            except (AuditUnavailable, LedgerUnavailable):
                raise
            except Exception as exc:
                failure = {**failure, "fallback_error": type(exc).__name__}
                log.error(
                    "request %s: the default-input answer failed too (%s)", ctx.request_id, failure["fallback_error"]
                )
        self.audit(
            ctx,
            event,
            **base,
            decision="error",
            reason="internal_error",
            phase="failed",
            cost=cost.as_dict(),
            **budget,
            **failure,
        )
        raise InternalError(ctx.request_id)

    # --- DP SQL -------------------------------------------------------------------------------------------

    def query(
        self,
        ctx: Context,
        sql: str,
        *,
        epsilon: float | None = None,
        accuracy: float | dict[str, float] | None = None,
        alpha: float | None = None,
        delta: float | None = None,
        dry_run: bool = False,
        quantile_interval: bool = True,
        version: str | None = None,
    ) -> dict[str, Any]:
        alpha = self.settings.default_alpha if alpha is None else alpha
        request = {
            "sql": sql,
            "epsilon": epsilon,
            "accuracy": accuracy,
            "alpha": alpha,
            "delta": delta,
            "dry_run": dry_run,
            **({} if quantile_interval else {"quantile_interval": False}),
            **({"version": version} if version is not None else {}),
        }
        resolved: dict[str, tuple[Policy, str]] = {}

        def resolve(name: str) -> Policy:
            resolved[name] = self.authorize(ctx, name, Grant.QUERY, request)
            return resolved[name][0]

        try:
            self._check_length(sql)
            plan = self._plan(sql, resolve)
            pricing = price(
                plan, epsilon=epsilon, accuracy=accuracy, alpha=alpha, delta=delta, quantile_interval=quantile_interval
            )
        except GatewayError as exc:
            if not resolved and exc.code in {"forbidden", "dataset_not_found"}:
                raise  # already audited by authorize
            self.audit(
                ctx,
                "query",
                dataset=next(iter(resolved), None),
                request=request,
                decision="denied",
                reason=getattr(exc, "reason", exc.code),
            )
            raise
        policy, _ = resolved[plan.dataset]
        version, reader = self.reading(ctx, plan.dataset, version, Event.QUERY, request)
        key = cache_key(
            "query",
            ctx.principal.name,
            plan.dataset,
            version,
            policy.fingerprint(),
            plan.normalized_sql,
            epsilon,
            accuracy,
            alpha,
            pricing.cost.delta,
            *(() if quantile_interval else ("value-only quantiles",)),
        )
        summary = {
            "dataset": plan.dataset,
            "version": version,
            "alpha": alpha,
            "accounting": pricing.accounting.value,
            "epsilon": pricing.cost.epsilon,
            "delta": pricing.cost.delta,
            **({"rho": pricing.cost.rho} if pricing.zcdp else {}),
            "epsilon_per_measurement": pricing.epsilon_per_measurement,
            "warnings": list(plan.warnings),
        }
        dry = None
        if dry_run:
            dry = {
                **summary,
                "columns": plan.output_names,
                "rows": None,
                "intervals": None,
                "flags": None,
                "notes": [],
                "accuracy": dry_run_accuracy(plan, pricing),
                "measurements": [pricing.entry(m) for m in plan.measurements],
                "key_selection": plan.needs_key_selection,
                "costs": _costs_under_both(
                    plan, policy, epsilon=epsilon, accuracy=accuracy, alpha=alpha, delta=delta, pricing=pricing
                ),
            }
            if plan.periods is not None:
                # Each period read is charged the whole cost, against its own budget.
                dry["periods"] = list(plan.periods)
                dry["cost_per_period"] = {label: pricing.cost.as_dict() for label in plan.periods}

        def answer(release: Release) -> dict[str, Any]:
            return {
                **summary,
                "columns": release.columns,
                "rows": release.rows,
                "intervals": release.intervals,
                "flags": release.flags,
                "measurements": release.measurements,
                "notes": release.notes,
            }

        def compute() -> dict[str, Any]:
            return answer(execute(plan, pricing, reader))

        def fallback() -> dict[str, Any]:
            return answer(self._default_release(plan, pricing))

        return self.run_private(
            ctx,
            policy=policy,
            event=Event.QUERY,
            request=request,
            cost=pricing.cost,
            key=key,
            compute=compute,
            fallback=fallback,
            dry_run=dry,
            version=version,
            periods=plan.periods,
        )

    def _check_length(self, sql: str) -> None:
        """Refuse SQL longer than the declared limit before it is parsed (its depth and size are checked later)."""
        limit = self.settings.limits.max_sql_chars
        if len(sql) > limit:
            raise QueryRejected(
                f"the SQL text has {len(sql):,} characters; at most {limit:,} are allowed",
                reason="too_long",
                hint="write a shorter query (an IN list or a CASE with fewer branches, say)",
            )

    def _default_release(self, plan: Plan, pricing: Pricing) -> Release:
        """The plan's release computed on the default input: its mechanisms applied to an empty table."""
        return execute(plan, pricing, self.engine, default_input=True)

    def _plan(self, sql: str, resolve: Callable[[str], Policy]) -> Plan:
        """`plan_query` and the engine's bind check of the plan's statements, reusing the plan of an identical SQL
        text under the same policy object (both are deterministic in the two, and the schema does not change while
        the policy object lives). The dataset is authorised again every time."""
        hit = self._plans.get(sql)
        if hit is not None and resolve(hit[1].dataset) is hit[0]:
            return hit[1]
        public = self.engine.public_table if self.engine.kind is EngineKind.DUCKDB else None
        plan = plan_query(sql, resolve, public)
        bind_check(plan, self.engine)
        if len(self._plans) >= 1024:
            self._plans.clear()
        self._plans[sql] = (plan.dataset_policy, plan)
        return plan

    # --- auditor access -----------------------------------------------------------------------------------

    def audit_access(self, ctx: Context, action: str, **request: Any) -> None:
        """Admit an auditor's read of the audit log, recording it first; any other role is refused (and the
        refusal recorded). If the record cannot be written the read is refused too (AuditUnavailable)."""
        fields = {"request": {"action": action, **{k: v for k, v in request.items() if v is not None}}}
        if ctx.principal.role != "auditor":
            self.audit(ctx, Event.AUDIT_READ, decision="denied", reason="forbidden", **fields)
            raise Forbidden(f"reading the audit log needs role auditor; you are {ctx.principal.role!r}")
        self.audit(ctx, Event.AUDIT_READ, decision="allowed", reason="ok", **fields)

    def budget_caps(self) -> dict[str, dict[str, Any]]:
        """Each dataset's total budget with its per-principal cap, as `audit.report.privacy_spend` takes them."""
        return {
            name: spend_caps(policy.budget.total, policy.budget.per_principal, policy.accounting)
            for name, (policy, _) in self.engine.datasets().items()
        }
