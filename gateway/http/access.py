"""HTTP routes for consented debug access (the core they call is `gateway.access`; approval stays on the host).

POST /v1/access/requests               file a request for rows of named units, with a purpose and a scope
GET  /v1/access/requests/{id}          your request's status, expiry and rows left
GET  /v1/access/requests/{id}/rows     its rows: units whose consent holds now, within the approved cap and time
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, StrictInt, StrictStr

from gateway.access import MAX_PURPOSE, MAX_UNITS, file_request, read_rows, request_status
from gateway.http.dependencies import ERRORS, REQUEST_CONFIG, Core, Ctx


class AccessRequestBody(BaseModel):
    model_config = REQUEST_CONFIG
    dataset: str
    units: list[StrictInt | StrictStr] = Field(
        min_length=1, max_length=MAX_UNITS, description="values of the dataset's privacy unit whose rows you need"
    )
    purpose: str = Field(min_length=1, max_length=MAX_PURPOSE, description="why, e.g. a ticket number and problem")
    scope: str | None = Field(default=None, description="one of the dataset's consent scopes (default: its first)")


router = APIRouter(tags=["access"], responses=ERRORS)


@router.post(
    "/v1/access/requests",
    summary="Request rows of named units for a stated purpose (pending until an admin approves it on the host)",
)
def post_request(body: AccessRequestBody, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    return file_request(bastion, ctx, body.model_dump())


@router.get("/v1/access/requests/{request_id}", summary="Your access request: status, expiry and rows left")
def get_request(request_id: str, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    return request_status(bastion, ctx, request_id)


@router.get(
    "/v1/access/requests/{request_id}/rows",
    summary="Rows of your approved request's units whose consent holds now (not DP; every read audited)",
)
def get_rows(request_id: str, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    return read_rows(bastion, ctx, request_id)
