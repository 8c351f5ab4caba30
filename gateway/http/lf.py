"""HTTP routes for labeling functions (the core they call is `gateway.labeling`).

POST /v1/lf/stats   DP coverage, overlap, conflict and accuracy of a set of LFs (declarative and registered Python)
GET  /v1/lf/registry the registered (reviewed) Python LFs for the datasets you may label

The sandbox limits for Python LFs default to `SandboxLimits()`; a deployment may set `app.state.lf_limits`.
The statistics are computed within the request; while Python LFs run for longer than a second, the server logs how
far they are (a fraction of public work: never a count of rows or combinations).
After the charge the answer's status and shape are fixed: if running the LFs fails, the same measurements
released over the default input (an empty table) are the answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, Field

from gateway.http.dependencies import ERRORS, REQUEST_CONFIG, Core, Ctx, Number
from gateway.labeling import lf_stats, registry_listing
from labeling_functions.sandbox import start_worker_server


class LFSpec(BaseModel):
    model_config = REQUEST_CONFIG
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
    model_config = REQUEST_CONFIG
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
    version: str | None = Field(
        default=None,
        max_length=64,
        description="the dataset version to run on (GET /v1/datasets/{dataset}/versions); default: the latest",
    )
    table: str | None = Field(
        default=None,
        max_length=64,
        description="a private table of a dataset of several tables (its `private_tables`; the dataset's own table "
        "by its name): the LFs run over that table's bounded rows, priced at its max_rows_per_unit. Default: the "
        "dataset's own table",
    )
    join: str | None = Field(
        default=None,
        max_length=64,
        description="a public table of the dataset joined on its unique key (with join_on): adds its columns, "
        "sensitivity unchanged; a table without a unique key is refused",
    )
    join_on: str | None = Field(
        default=None,
        max_length=64,
        description="the column of `table` (or of join_private) matched with the public table's unique key",
    )
    join_private: str | None = Field(
        default=None,
        max_length=64,
        description="a further private table (or the dataset's own, by its name) joined with `table` on the "
        "privacy unit: each unit then has at most the product of the two tables' bounds of joined rows, and every "
        "sensitivity is priced at that product (or at the policy's max_joined_rows_per_unit, truncated to it)",
    )


# The server's log (uvicorn's, which `bastion serve` shows at INFO): long Python LF runs report how far they are.
log = logging.getLogger("uvicorn.error")


def _progress(fraction: float) -> None:
    log.info("labeling functions: python LFs %.0f%% done", 100 * fraction)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Start the Python LFs' worker server in the background, so that the first request does not wait for it.
    threading.Thread(target=start_worker_server, name="bastion-lf-server", daemon=True).start()
    yield


router = APIRouter(prefix="/v1/lf", tags=["labeling functions"], responses=ERRORS, lifespan=lifespan)


@router.post("/stats", summary="DP coverage, overlap, conflict and accuracy of labeling functions")
def post_lf_stats(body: LFStatsRequest, ctx: Ctx, bastion: Core, request: Request) -> dict[str, Any]:
    return lf_stats(
        bastion,
        ctx,
        body.model_dump(exclude_none=True),
        limits=getattr(request.app.state, "lf_limits", None),
        progress=_progress,
    )


@router.get("/registry", summary="Registered (reviewed) Python labeling functions")
def get_lf_registry(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return registry_listing(bastion, ctx)
