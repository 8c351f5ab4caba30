"""Request dependencies shared by every router: the core object, the caller's context, the error responses."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.service import Bastion, Context
from policies.errors import Unauthorized


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. query_rejected, budget_exhausted")
    message: str
    model_config = ConfigDict(extra="allow")


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request or rejected SQL (with line, column, highlight)"},
    401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
    403: {"model": ErrorResponse, "description": "role or column not granted"},
    404: {"model": ErrorResponse, "description": "unknown dataset"},
    429: {"model": ErrorResponse, "description": "budget_exhausted: the privacy budget would be exceeded"},
    503: {"model": ErrorResponse, "description": "the ledger or the audit log cannot be written; nothing released"},
}


def get_bastion(request: Request) -> Bastion:
    return request.app.state.bastion


def context_for(request: Request, bastion: Bastion, token: str | None) -> Context:
    """Authenticate a token for this request; a refusal is audited before the 401."""
    source = request.client.host if request.client else "unknown"
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex
    try:
        principal = bastion.authenticate(token)
    except Unauthorized:
        bastion.audit(None, "authentication", request={"path": request.url.path}, decision="denied",
                      reason="unauthorized", source=source, request_id=rid)
        raise
    return Context(principal, source=source, request_id=rid)


def get_context(request: Request, bastion: Annotated[Bastion, Depends(get_bastion)]) -> Context:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    return context_for(request, bastion, token)


Ctx = Annotated[Context, Depends(get_context)]
Core = Annotated[Bastion, Depends(get_bastion)]
