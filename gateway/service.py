"""The gateway's core: one object that owns the catalog, ledger, cache, tokens and audit log, and runs every
privileged access through the same sequence: authorise → plan → cache → charge → audit "admitted" → compute →
audit "released" → answer. Routes and the CLI call these methods; nothing else touches private data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from audit.log import AuditLog, AuditWriteError
from gateway.auth import Principal, TokenStore
from gateway.cache import ReleaseCache, cache_key
from gateway.catalog import Catalog
from gateway.executor import dry_run_accuracy, execute, price
from gateway.planner import Plan, plan_query
from gateway.settings import Settings
from policies.accountant import PrivacyLoss
from policies.errors import (
    AuditUnavailable,
    Forbidden,
    GatewayError,
)
from policies.ledger import Ledger
from policies.schema import Grant, Policy

log = logging.getLogger("bastion")
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Who is asking, from where, under which request id."""

    principal: Principal
    source: str = "local"
    request_id: str = ""

    def __post_init__(self) -> None:
        if not self.request_id:
            object.__setattr__(self, "request_id", uuid.uuid4().hex)


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Bastion:
    def __init__(self, settings: Settings, *, read_only: bool = True) -> None:
        self.settings = settings
        self.catalog = Catalog(settings.database, settings.bounding_key, read_only=read_only)
        settings.workspace.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(settings.ledger)
        self.cache = ReleaseCache(settings.cache)
        self.tokens = TokenStore(settings.tokens)
        self.audit_log = AuditLog(settings.audit_dir, key_dir=settings.keys_dir)
        self._plans: dict[str, tuple[Policy, Plan]] = {}  # SQL text → (the policy it was planned under, plan)

    def close(self) -> None:
        self.catalog.close()
        closer = getattr(self.audit_log, "close", None)
        if closer is not None:
            try:
                closer()
            except AuditWriteError:
                log.exception("audit log could not be closed cleanly")

    # --- audit --------------------------------------------------------------------------------------------

    def audit(self, ctx: Context | None, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record durably, or raise AuditUnavailable (the caller must release nothing)."""
        record: dict[str, Any] = {
            "event": event,
            "actor": ctx.principal.as_actor() if ctx else {"principal": "admin", "role": "admin", "token_id": None},
            "source": ctx.source if ctx else "cli",
            "request_id": ctx.request_id if ctx else uuid.uuid4().hex,
            **fields,
        }
        try:
            return self.audit_log.append(record)
        except AuditWriteError as exc:
            log.error("audit append failed: %s", exc)
            raise AuditUnavailable("the audit log cannot be written; nothing was released") from None

    def authenticate(self, token: str | None) -> Principal:
        return self.tokens.authenticate(token)

    # --- datasets and budgets -----------------------------------------------------------------------------

    def authorize(self, ctx: Context, dataset: str, grant: Grant, request: dict[str, Any]) -> tuple[Policy, str]:
        """The dataset's policy and version if the caller's role has `grant`; audited denial otherwise."""
        try:
            policy, version = self.catalog.policy(dataset)
        except GatewayError as exc:
            self.audit(ctx, grant.value, dataset=dataset, request=request, decision="denied", reason=exc.code)
            raise
        if grant not in policy.grants(ctx.principal.role):
            self.audit(ctx, grant.value, dataset=dataset, request=request, decision="denied", reason="forbidden")
            raise Forbidden(
                f"role {ctx.principal.role!r} has no {grant.value!r} grant on dataset {dataset!r}",
                dataset=dataset,
            )
        return policy, version

    def datasets(self, ctx: Context) -> list[dict[str, Any]]:
        out = []
        for policy, version in self.catalog.datasets().values():
            grants = policy.grants(ctx.principal.role)
            if grants:
                out.append({**policy.public_schema(), "version": version,
                            "grants": sorted(g.value for g in grants)})
        return out

    def budget_status(self, principal: str, policy: Policy) -> dict[str, Any]:
        spent = self.ledger.spent(principal, policy.dataset)
        cap = policy.budget.per_principal
        return {
            "dataset": policy.dataset,
            "spent": spent.as_dict(),
            "limit": cap.model_dump(),
            "remaining": {"epsilon": max(cap.epsilon - spent.epsilon, 0.0), "delta": max(cap.delta - spent.delta, 0.0)},
        }

    def budgets(self, ctx: Context) -> list[dict[str, Any]]:
        return [
            self.budget_status(ctx.principal.name, policy)
            for policy, _ in self.catalog.datasets().values()
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
        dry_run: dict[str, Any] | None = None,
        kind: str = "query",
    ) -> dict[str, Any]:
        """Charge, audit, compute and release one answer; the one path by which private rows reach anybody.

        `compute` returns the JSON-ready answer. `dry_run`, if given, is returned instead (nothing spent).
        A cached answer for `key` is returned at no cost.
        """
        base = {"dataset": policy.dataset, "request": request}
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.audit(ctx, event, **base, decision="allowed", reason="cached", phase="released",
                           cost=PrivacyLoss(0.0).as_dict(), release_digest=digest(hit))
                return {**hit, "cached": True, "dry_run": False, "epsilon_spent": 0.0, "delta_spent": 0.0,
                        "query_id": ctx.request_id, "budget": self.budget_status(ctx.principal.name, policy)}
        if dry_run is not None:
            self.audit(ctx, event, **base, decision="allowed", reason="dry_run", phase="released",
                       cost=PrivacyLoss(0.0).as_dict(), release_digest=None)
            return {**dry_run, "dry_run": True, "cached": False, "epsilon_spent": 0.0, "delta_spent": 0.0,
                    "query_id": ctx.request_id, "budget": self.budget_status(ctx.principal.name, policy)}
        try:
            charge = self.ledger.charge(
                principal=ctx.principal.name,
                dataset=policy.dataset,
                cost=cost,
                per_principal=policy.budget.per_principal,
                total=policy.budget.total,
                request_id=ctx.request_id,
                kind=kind,
            )
        except GatewayError as exc:
            self.audit(ctx, event, **base, decision="denied" if exc.status < 500 else "error", reason=exc.code,
                       cost=cost.as_dict(), phase="refused")
            raise
        budget = {"budget_before": charge.principal_before.as_dict(), "budget_after": charge.principal_after.as_dict()}
        self.audit(ctx, event, **base, decision="allowed", reason="ok", phase="admitted", cost=cost.as_dict(), **budget)
        try:
            answer = compute()
        except GatewayError as exc:
            self.audit(ctx, event, **base, decision="error", reason=exc.code, phase="failed", cost=cost.as_dict(),
                       **budget)
            raise
        except Exception:
            log.exception("request %s failed", ctx.request_id)
            self.audit(ctx, event, **base, decision="error", reason="internal_error", phase="failed",
                       cost=cost.as_dict(), **budget)
            raise GatewayError(f"internal error (request {ctx.request_id}); the charge stands") from None
        self.audit(ctx, event, **base, decision="allowed", reason="ok", phase="released", cost=cost.as_dict(),
                   release_digest=digest(answer), **budget)
        if key is not None:
            self.cache.put(key, ctx.principal.name, answer)
        return {**answer, "cached": False, "dry_run": False, "epsilon_spent": cost.epsilon,
                "delta_spent": cost.delta, "query_id": ctx.request_id,
                "budget": self.budget_status(ctx.principal.name, policy)}

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
    ) -> dict[str, Any]:
        alpha = self.settings.default_alpha if alpha is None else alpha
        request = {"sql": sql, "epsilon": epsilon, "accuracy": accuracy, "alpha": alpha, "delta": delta,
                   "dry_run": dry_run}
        resolved: dict[str, tuple[Policy, str]] = {}

        def resolve(name: str) -> Policy:
            resolved[name] = self.authorize(ctx, name, Grant.QUERY, request)
            return resolved[name][0]

        try:
            plan = self._plan(sql, resolve)
            pricing = price(plan, epsilon=epsilon, accuracy=accuracy, alpha=alpha, delta=delta)
        except GatewayError as exc:
            if not resolved and exc.code in {"forbidden", "dataset_not_found"}:
                raise  # already audited by authorize
            self.audit(ctx, "query", dataset=next(iter(resolved), None), request=request, decision="denied",
                       reason=getattr(exc, "reason", exc.code))
            raise
        policy, version = resolved[plan.dataset]
        key = cache_key("query", ctx.principal.name, plan.dataset, version, policy.fingerprint(),
                        plan.normalized_sql, epsilon, accuracy, alpha, pricing.cost.delta)
        summary = {
            "dataset": plan.dataset,
            "alpha": alpha,
            "epsilon": pricing.cost.epsilon,
            "delta": pricing.cost.delta,
            "epsilon_per_measurement": pricing.epsilon_per_measurement,
        }
        dry = None
        if dry_run:
            dry = {**summary, "columns": plan.output_names, "rows": None, "intervals": None, "notes": [],
                   "accuracy": dry_run_accuracy(plan, pricing),
                   "measurements": [{"measurement": m.label, "epsilon": pricing.epsilon_per_measurement,
                                     "sensitivity": pricing.d_in[m]} for m in plan.measurements],
                   "key_selection": plan.needs_key_selection}

        def compute() -> dict[str, Any]:
            release = execute(plan, pricing, self.catalog.connect())
            return {**summary, "columns": release.columns, "rows": release.rows, "intervals": release.intervals,
                    "measurements": release.measurements, "notes": release.notes}

        return self.run_private(ctx, policy=policy, event="query", request=request, cost=pricing.cost, key=key,
                                compute=compute, dry_run=dry)

    def _plan(self, sql: str, resolve: Callable[[str], Policy]) -> Plan:
        """`plan_query`, reusing the plan of an identical SQL text under the same policy object (planning is
        deterministic in both and costs about a millisecond). The dataset is authorised again every time."""
        hit = self._plans.get(sql)
        if hit is not None and resolve(hit[1].dataset) is hit[0]:
            return hit[1]
        plan = plan_query(sql, resolve)
        if len(self._plans) >= 1024:
            self._plans.clear()
        self._plans[sql] = (plan.policy, plan)
        return plan

    # --- auditor access -----------------------------------------------------------------------------------

    def audit_access(self, ctx: Context, action: str, **request: Any) -> None:
        """Admit an auditor's read of the audit log, recording it first; any other role is refused (and the
        refusal recorded). If the record cannot be written the read is refused too (AuditUnavailable)."""
        fields = {"request": {"action": action, **{k: v for k, v in request.items() if v is not None}}}
        if ctx.principal.role != "auditor":
            self.audit(ctx, "audit_read", decision="denied", reason="forbidden", **fields)
            raise Forbidden(f"reading the audit log needs role auditor; you are {ctx.principal.role!r}")
        self.audit(ctx, "audit_read", decision="allowed", reason="ok", **fields)

    def budget_caps(self) -> dict[str, dict[str, Any]]:
        """Each dataset's total budget with its per-principal cap, as `audit.report.privacy_spend` takes them."""
        return {
            name: {**policy.budget.total.model_dump(), "per_principal": policy.budget.per_principal.model_dump()}
            for name, (policy, _) in self.catalog.datasets().items()
        }
