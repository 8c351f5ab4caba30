"""HTTP routes for LF sets that follow the data (the core they call is `gateway.lfsets`).

POST   /v1/lf/sets       save a set (computed at once at the latest version, charged to you)
GET    /v1/lf/sets       your sets
GET    /v1/lf/sets/{id}  one of your sets with its history per version and the changes beyond noise (the versions it
                         missed are computed first)
DELETE /v1/lf/sets/{id}  stop following and remove the set

Another principal's set is answered exactly as a set that does not exist (404 lf_set_not_found).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway.http.dependencies import ERRORS, REQUEST_CONFIG, Core, Ctx, Number
from gateway.http.lf import LFSpec
from gateway.lfsets import catch_up, delete, get, listing, save
from gateway.service import Bastion


class LFSetRequest(BaseModel):
    model_config = REQUEST_CONFIG
    name: str = Field(min_length=1, max_length=100, description="your name for the set")
    dataset: str
    lfs: list[LFSpec] = Field(default_factory=list, description="declarative labeling functions")
    python_lfs: list[str] = Field(default_factory=list, description="names of registered Python LFs")
    epsilon: Number = Field(description="privacy loss of the statistics at each version (0.001 to 1000)")
    cap: Number = Field(description="the most ε the set may spend in total; then it stops following")
    alert_rate: Number | None = Field(
        default=None,
        description="the highest probability that comparing two versions reports a change that is not there, over "
        "all LFs and statistics together, in (0, 0.5] (default 0.05)",
    )


log = logging.getLogger("uvicorn.error")


def catch_up_quietly(bastion: Bastion) -> None:
    """Catch every followed LF set up (at start-up); a failure is logged by its class and left for the next try."""
    try:
        for done in catch_up(bastion):
            log.info("LF set %s: version %s %s", done["id"], done["version"], done["status"])
    except Exception as exc:  # noqa: BLE001 - the gateway serves anyway; a GET of the set tries again
        log.error("LF sets not caught up at start (%s)", type(exc).__name__)


router = APIRouter(prefix="/v1/lf/sets", tags=["labeling functions"], responses=ERRORS)


@router.post("", summary="Save an LF set that is recomputed at every new version of the dataset")
def post_lf_set(body: LFSetRequest, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    return save(bastion, ctx, body.model_dump(exclude_none=True))


@router.get("", summary="Your LF sets")
def get_lf_sets(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return listing(bastion, ctx)


@router.get("/{set_id}", summary="One of your LF sets: statistics per version and the changes beyond noise")
def get_lf_set(set_id: str, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    return get(bastion, ctx, set_id)


@router.delete("/{set_id}", summary="Stop following: remove one of your LF sets")
def delete_lf_set(set_id: str, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    return delete(bastion, ctx, set_id)
