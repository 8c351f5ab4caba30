"""Labeling-function statistics, the core the HTTP routes call: authorise, validate and price from public facts,
then charge → audit → run the LFs on the engine → release, through `Bastion.run_private`.

The sandbox limits for Python LFs default to `SandboxLimits()`. After the charge the answer's status and shape are
fixed: if running the LFs fails, the same measurements released over the default input (an empty table) are the
answer.
"""

from __future__ import annotations

import math
from typing import Any

from audit.record import Event
from gateway.engines.kind import EngineKind
from gateway.service import Bastion, Context
from gateway.sql.release import refuse_backtracking
from gateway.stores.cache import cache_key
from gateway.tablesources import TableSource, resolve_source, with_classes
from labeling_functions.analysis import compute_lf_stats, compute_lf_stats_default, plan_lf_stats, precheck
from labeling_functions.registry import REGISTRY, Registry
from labeling_functions.sandbox import Progress, SandboxLimits
from policies.errors import InvalidRequest
from policies.schema import Grant, Policy

EVENT = Event.LF_STATS


def lf_stats(
    bastion: Bastion,
    ctx: Context,
    request: dict[str, Any],
    *,
    limits: SandboxLimits | None = None,
    registry: Registry = REGISTRY,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Authorise, validate and price, then charge → audit → run → release through `Bastion.run_private`.
    `progress` gets the fraction of the Python LFs' work done while they run (for the host's log: the caller
    sees nothing of it)."""
    alpha = request.get("alpha", bastion.settings.default_alpha)
    request = dict(request)
    for name in ("epsilon", "alpha"):  # the audit record is strict JSON: keep a NaN or an infinity as text
        if isinstance(request.get(name), float) and not math.isfinite(request[name]):
            request[name] = str(request[name])
    policy, version = bastion.authorize(ctx, request["dataset"], Grant.LABELING, request)
    with bastion.denials_audited(ctx, EVENT, policy.dataset, request):
        source = _source(bastion, policy, request)
        plan = plan_lf_stats(
            with_classes(source, policy) if source is not None else policy,
            lfs=request.get("lfs", []),
            python_lfs=request.get("python_lfs", []),
            epsilon=request["epsilon"],
            alpha=alpha,
            label_model=bool(request.get("label_model", False)),
            registry=registry,
            source=source.tree if source is not None else None,
        )
        refuse_backtracking(bastion.engine, [lf.tree for lf in plan.declarative])
        precheck(plan, bastion.engine)
    version, reader = bastion.reading(ctx, policy.dataset, request.get("version"), EVENT, request)
    chosen = source.request() if source is not None else None
    key = cache_key(
        EVENT,
        ctx.principal.name,
        policy.dataset,
        version,
        policy.fingerprint(),
        plan.normalized(),
        *([chosen] if chosen is not None else []),
    )
    outputs = bastion.settings.outputs_dir
    tables = {"tables": source.public()} if source is not None else {}

    def compute() -> dict[str, Any]:
        stats = compute_lf_stats(plan, reader, limits=limits, outputs_dir=outputs, progress=progress)
        return {**stats, **tables, "version": version}

    def fallback() -> dict[str, Any]:
        return {**compute_lf_stats_default(plan, outputs_dir=outputs), **tables, "version": version}

    return bastion.run_private(
        ctx,
        policy=policy,
        event=EVENT,
        request=request,
        cost=plan.cost,
        key=key,
        compute=compute,
        fallback=fallback,
        dry_run={**plan.dry_run(), **tables, "version": version} if bool(request.get("dry_run", False)) else None,
        kind=EVENT,
        version=version,
    )


def _source(bastion: Bastion, policy: Policy, request: dict[str, Any]) -> TableSource | None:
    """The rows the LFs run over when the request names a private table or a join (`gateway.tablesources`), or
    None for the dataset's own table; registered Python LFs and the label model are refused over them (a Python LF
    is reviewed for the dataset's own columns; the label model's private output is keyed by the rows of one
    table)."""
    source = resolve_source(
        policy,
        table=request.get("table"),
        join=request.get("join"),
        join_on=request.get("join_on"),
        join_private=request.get("join_private"),
        public=bastion.engine.public_table if bastion.engine.kind is EngineKind.DUCKDB else None,
        what="labeling functions",
    )
    if source is None:
        return None
    if request.get("python_lfs"):
        raise InvalidRequest(
            "registered Python LFs run over the dataset's own table only: over a private table or a join, give "
            "declarative LFs (lfs)",
            reason="python_lfs_over_tables",
        )
    if request.get("label_model"):
        raise InvalidRequest(
            "the label model runs over the dataset's own table only (its private output labels that table's rows)",
            reason="label_model_over_tables",
        )
    return source


def registry_listing(bastion: Bastion, ctx: Context, registry: Registry = REGISTRY) -> list[dict[str, Any]]:
    """Registered Python LFs for the datasets on which the caller holds the labeling grant."""
    allowed = {
        name
        for name, (policy, _) in bastion.engine.datasets().items()
        if Grant.LABELING in policy.grants(ctx.principal.role)
    }
    return [entry.public() for entry in registry.entries() if entry.dataset in allowed]
