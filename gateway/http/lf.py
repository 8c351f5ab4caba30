"""HTTP routes for labeling functions, and the one core function they call.

POST /v1/lf/stats   DP coverage, overlap, conflict and accuracy of a set of LFs (declarative and registered Python)
GET  /v1/lf/registry the registered (reviewed) Python LFs for the datasets you may label

The sandbox limits for Python LFs default to `SandboxLimits()`; a deployment may set `app.state.lf_limits`.
After the charge the answer's status and shape are fixed: if running the LFs fails, the same measurements
released over the default input (an empty table) are the answer.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.http.dependencies import ERRORS, Core, Ctx, Number
from gateway.service import Bastion, Context
from gateway.stores.cache import cache_key
from labeling_functions.analysis import compute_lf_stats, compute_lf_stats_default, plan_lf_stats, precheck
from labeling_functions.registry import REGISTRY, Registry
from labeling_functions.sandbox import SandboxLimits
from policies.errors import GatewayError
from policies.schema import Grant

EVENT = "lf_stats"


class LFSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="unique name of the LF in this request")
    label: str = Field(description="the class it votes for, one of the dataset's labels.classes")
    when: str | None = Field(
        default=None, description="SQL condition (the WHERE expression language; labeling-only columns allowed)"
    )
    keywords: dict[str, Any] | None = Field(
        default=None,
        description='{"column": ..., "any": [words], "case_sensitive": false}: votes when the '
        "column contains any of the words",
    )
    regex: dict[str, Any] | None = Field(
        default=None,
        description='{"column": ..., "pattern": RE2, "ignore_case": false}: votes when the pattern '
        "matches anywhere in the column",
    )
    description: str | None = None


class LFStatsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    lfs: list[LFSpec] = Field(default_factory=list, description="declarative labeling functions")
    python_lfs: list[str] = Field(default_factory=list, description="names of registered Python LFs")
    # Ranges are checked by the planner (400 invalid_request), which also refuses NaN, infinities and values
    # too small or too large to calibrate.
    epsilon: Number = Field(
        description="privacy loss to spend (0.001 to 1000), split equally among the released measurements"
    )
    alpha: Number | None = Field(default=None, description="1 - confidence level, in [1e-9, 1) (default 0.05)")
    label_model: bool = Field(
        default=False,
        description="also fit Snorkel's LabelModel on a DP histogram of the "
        "vote patterns and release summaries of its labels",
    )
    dry_run: bool = Field(default=False, description="report cost and half-widths without spending")


def lf_stats(
    bastion: Bastion,
    ctx: Context,
    body: LFStatsRequest,
    *,
    limits: SandboxLimits | None = None,
    registry: Registry = REGISTRY,
) -> dict[str, Any]:
    """Authorise, validate and price, then charge → audit → run → release through `Bastion.run_private`."""
    alpha = bastion.settings.default_alpha if body.alpha is None else body.alpha
    request = body.model_dump(exclude_none=True)
    for name in ("epsilon", "alpha"):  # the audit record is strict JSON: keep a NaN or an infinity as text
        if isinstance(request.get(name), float) and not math.isfinite(request[name]):
            request[name] = str(request[name])
    policy, version = bastion.authorize(ctx, body.dataset, Grant.LABELING, request)
    try:
        plan = plan_lf_stats(
            policy,
            lfs=[lf.model_dump(exclude_none=True) for lf in body.lfs],
            python_lfs=body.python_lfs,
            epsilon=body.epsilon,
            alpha=alpha,
            label_model=body.label_model,
            registry=registry,
        )
        precheck(plan, bastion.duckdb_cursor("labeling functions"))
    except GatewayError as exc:
        bastion.audit(
            ctx,
            EVENT,
            dataset=policy.dataset,
            request=request,
            decision="denied",
            reason=getattr(exc, "reason", exc.code),
        )
        raise
    key = cache_key(EVENT, ctx.principal.name, policy.dataset, version, policy.fingerprint(), plan.normalized())
    outputs = bastion.settings.outputs_dir

    def compute() -> dict[str, Any]:
        return compute_lf_stats(plan, bastion.duckdb_cursor("labeling functions"), limits=limits, outputs_dir=outputs)

    def fallback() -> dict[str, Any]:
        return compute_lf_stats_default(plan, outputs_dir=outputs)

    return bastion.run_private(
        ctx,
        policy=policy,
        event=EVENT,
        request=request,
        cost=plan.cost,
        key=key,
        compute=compute,
        fallback=fallback,
        dry_run=plan.dry_run() if body.dry_run else None,
        kind=EVENT,
    )


def registry_listing(bastion: Bastion, ctx: Context, registry: Registry = REGISTRY) -> list[dict[str, Any]]:
    """Registered Python LFs for the datasets on which the caller holds the labeling grant."""
    allowed = {
        name
        for name, (policy, _) in bastion.engine.datasets().items()
        if Grant.LABELING in policy.grants(ctx.principal.role)
    }
    return [entry.public() for entry in registry.entries() if entry.dataset in allowed]


router = APIRouter(prefix="/v1/lf", tags=["labeling functions"], responses=ERRORS)


@router.post("/stats", summary="DP coverage, overlap, conflict and accuracy of labeling functions")
def post_lf_stats(body: LFStatsRequest, ctx: Ctx, bastion: Core, request: Request) -> dict[str, Any]:
    return lf_stats(bastion, ctx, body, limits=getattr(request.app.state, "lf_limits", None))


@router.get("/registry", summary="Registered (reviewed) Python labeling functions")
def get_lf_registry(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return registry_listing(bastion, ctx)
