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
from gateway.service import Bastion, Context
from gateway.sql.release import refuse_backtracking
from gateway.stores.cache import cache_key
from labeling_functions.analysis import compute_lf_stats, compute_lf_stats_default, plan_lf_stats, precheck
from labeling_functions.registry import REGISTRY, Registry
from labeling_functions.sandbox import Progress, SandboxLimits
from policies.schema import Grant

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
        plan = plan_lf_stats(
            policy,
            lfs=request.get("lfs", []),
            python_lfs=request.get("python_lfs", []),
            epsilon=request["epsilon"],
            alpha=alpha,
            label_model=bool(request.get("label_model", False)),
            registry=registry,
        )
        refuse_backtracking(bastion.engine, [lf.tree for lf in plan.declarative])
        precheck(plan, bastion.engine)
    version, reader = bastion.reading(ctx, policy.dataset, request.get("version"), EVENT, request)
    key = cache_key(EVENT, ctx.principal.name, policy.dataset, version, policy.fingerprint(), plan.normalized())
    outputs = bastion.settings.outputs_dir

    def compute() -> dict[str, Any]:
        stats = compute_lf_stats(plan, reader, limits=limits, outputs_dir=outputs, progress=progress)
        return {**stats, "version": version}

    def fallback() -> dict[str, Any]:
        return {**compute_lf_stats_default(plan, outputs_dir=outputs), "version": version}

    return bastion.run_private(
        ctx,
        policy=policy,
        event=EVENT,
        request=request,
        cost=plan.cost,
        key=key,
        compute=compute,
        fallback=fallback,
        dry_run={**plan.dry_run(), "version": version} if bool(request.get("dry_run", False)) else None,
        kind=EVENT,
        version=version,
    )


def registry_listing(bastion: Bastion, ctx: Context, registry: Registry = REGISTRY) -> list[dict[str, Any]]:
    """Registered Python LFs for the datasets on which the caller holds the labeling grant."""
    allowed = {
        name
        for name, (policy, _) in bastion.engine.datasets().items()
        if Grant.LABELING in policy.grants(ctx.principal.role)
    }
    return [entry.public() for entry in registry.entries() if entry.dataset in allowed]
